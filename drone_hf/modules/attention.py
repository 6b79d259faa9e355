"""``DroneAttention``: the base of self-attention modules whose query/key heads are ``k`` wide.

DRONE's query-key compression (:mod:`drone_hf.solver.attention`) replaces each head's query and key
projections by rank-``k`` ones (``k < head width``) whose products reproduce the attention scores as
closely as possible on the calibration data. Values, the output projection and the softmax scale
(``1/sqrt(head width)`` of the original model) do not change, so only the query and key widths do.

One subclass per architecture family (``drone_hf/architectures/``) keeps the forward signature and
checkpoint names of the module it replaces (``query``/``key`` for BERT, ``q_lin``/``k_lin`` for
DistilBERT...), so a saved model's keys map one to one and the surrounding model code is unchanged.
This base holds what they share: the narrow projections, head splitting and the attention call.

The attention call honours the model's attention implementation (``config._attn_implementation``):
``"eager"`` runs the family's own eager function at width ``k`` (the ``L x L`` score product shrinks
with ``k``); anything else runs transformers' SDPA path (``torch.nn.functional.scaled_dot_product_attention``
with the explicit original scale; masks, causal flag and KV caches as the original). SDPA *accepts*
query/key widths different from the value width, but on CPU (torch 2.13) that falls back to the
unfused math kernel, measured 2-5x slower than the fused kernel at equal widths. So by default
(``qk_layout="auto"``) queries and keys are zero-padded to the value width right before SDPA: the
padded columns add exactly zero to every score, the fused kernel runs, and the projections keep
their ``k/d`` cost. ``qk_layout="narrow"`` keeps the narrow width inside SDPA (for backends with an
efficient kernel for unequal widths); see ``benchmarks/attention.py`` for measurements.

``output_attentions=True``: transformers collects attention weights with forward hooks it attaches
to modules of the *original* class (``_can_record_outputs``), which a replacement is not. Each
:class:`DroneAttention` therefore carries its own hook that hands its weights (the softmax of the
``k``-wide scores, i.e. what the compressed model really attends with) to the same collector. As
for the dense model, weights exist only with ``attn_implementation="eager"``; under SDPA transformers
warns and returns none, exactly as it does for the original modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

#: Values of :attr:`DroneAttention.qk_layout`.
QK_LAYOUTS = ("auto", "padded", "narrow")


class DroneAttention(nn.Module):
    """Self-attention with query/key heads of width ``qk_rank`` (values keep ``head_dim``).

    Args:
        num_heads: attention heads ``H``.
        head_dim: the original head width ``d`` (value width; the softmax scale stays ``scaling``).
        qk_rank: per-head query/key width ``k``, ``1 <= k <= d``.
        in_features: width of the hidden states the projections read.
        scaling: the original score scale (``d ** -0.5`` for most families; GPT-2 may also divide
            by the layer index).
        relative_error: relative score error on the calibration data it was built with
            (``None`` when unknown, e.g. rebuilt from a checkpoint without that record).
        device, dtype: where to allocate the projections (``"meta"`` for a skeleton).

    Subclasses set :attr:`family`, :attr:`query_name` and :attr:`key_name` (the checkpoint names of
    the projections) and implement ``forward`` with the signature of the module they replace.
    """

    family: ClassVar[str] = ""
    query_name: ClassVar[str] = "query"
    key_name: ClassVar[str] = "key"
    #: Whether the family's model collects attention weights through transformers' output recorder
    #: (``_can_record_outputs``), so the replacement must hand them over itself (module docstring).
    records_attentions: ClassVar[bool] = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        qk_rank: int,
        in_features: int,
        scaling: float,
        relative_error: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(qk_rank, bool) or not isinstance(qk_rank, int) or not 1 <= qk_rank <= head_dim:
            raise ValueError(
                f"qk_rank={qk_rank!r} is not valid for attention heads of width {head_dim}: use an integer in "
                f"[1, {head_dim}]."
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_rank = qk_rank
        self.scaling = scaling
        self.relative_error = relative_error
        #: How queries/keys enter SDPA: see the module docstring. A runtime knob, never saved.
        self.qk_layout = "auto"
        #: The class this module replaced (for :meth:`to_original`); set by the adapter.
        self.source_class: type | None = None
        setattr(self, self.query_name, nn.Linear(in_features, num_heads * qk_rank, device=device, dtype=dtype))
        setattr(self, self.key_name, nn.Linear(in_features, num_heads * qk_rank, device=device, dtype=dtype))
        if self.records_attentions:
            self.register_forward_hook(_record_attention_weights)

    # --- projections -----------------------------------------------------------------------------
    @property
    def query_proj(self) -> nn.Linear:
        return getattr(self, self.query_name)

    @property
    def key_proj(self) -> nn.Linear:
        return getattr(self, self.key_name)

    def split_heads(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """[B, L, H·width] -> [B, H, L, width]."""
        return x.view(*x.shape[:-1], -1, width).transpose(1, 2)

    def query_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, H, L, k] narrow queries."""
        return self.split_heads(self.query_proj(hidden_states), self.qk_rank)

    def key_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, H, L, k] narrow keys."""
        return self.split_heads(self.key_proj(hidden_states), self.qk_rank)

    def load_projections(
        self, query_weight: torch.Tensor, query_bias: torch.Tensor, key_weight: torch.Tensor, key_bias: torch.Tensor
    ) -> None:
        """Copy solved projections ([H·k, n] weights, [H·k] biases, any float dtype) into the module."""
        with torch.no_grad():
            for layer, w, b in ((self.query_proj, query_weight, query_bias), (self.key_proj, key_weight, key_bias)):
                if tuple(w.shape) != tuple(layer.weight.shape):
                    raise ValueError(
                        f"projection of shape {tuple(w.shape)} does not fit {tuple(layer.weight.shape)} "
                        f"({self.num_heads} heads x rank {self.qk_rank})."
                    )
                layer.weight.copy_(w.to(layer.weight.dtype))
                layer.bias.copy_(b.to(layer.bias.dtype))

    def padded_projection(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The query (``which="query"``) or key projection zero-padded to full heads: ([H·d, n], [H·d]).

        Zero rows add nothing to any score, so a dense module with these weights (and the same
        scale) computes exactly the same attention: what :meth:`to_original` uses.
        """
        layer = self.query_proj if which == "query" else self.key_proj
        h, k, d = self.num_heads, self.qk_rank, self.head_dim
        w = layer.weight.detach().reshape(h, k, -1)
        b = layer.bias.detach().reshape(h, k)
        w_full = w.new_zeros(h, d, w.shape[-1])
        b_full = b.new_zeros(h, d)
        w_full[:, :k] = w
        b_full[:, :k] = b
        return w_full.reshape(h * d, -1), b_full.reshape(h * d)

    def cached_key_values(
        self, key: torch.Tensor, value: torch.Tensor, cache: Any, past_key_values: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values after the KV cache's update (as given when there is none).

        transformers >= 5.25 passes the cache as ``cache=``, earlier 5.x as ``past_key_values=``: a
        layer that read only one of them would see no cache from the other and attend to the new
        tokens alone. An encoder-decoder cache holds this self-attention's part separately."""
        from transformers.cache_utils import EncoderDecoderCache

        cache = cache if cache is not None else past_key_values
        if cache is None:
            return key, value
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        return cache.update(key, value, self.layer_idx)

    # --- attention -------------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))

    def attend(
        self,
        config: Any,
        eager: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run attention on [B, H, L, k] queries/keys and [B, H, L, d] values; returns
        ([B, L, H, d] output, weights or ``None``) like transformers' attention functions.

        ``eager`` is the family's eager function, used when the model runs ``"eager"`` attention.
        Every other implementation goes through transformers' SDPA function (flash-attention
        kernels outside SDPA need equal widths, so they are not used here).
        """
        implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        if implementation == "eager":
            return eager(self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.qk_layout != "narrow" and query.shape[-1] != value.shape[-1]:
            # zero columns add nothing to q·k; equal widths let SDPA use its fused kernel
            width = max(value.shape[-1], query.shape[-1])
            query, key = self._pad(query, width), self._pad(key, width)
        return sdpa_attention_forward(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )

    # --- bookkeeping -----------------------------------------------------------------------------
    @property
    def dense_qk_parameters(self) -> int:
        """Query + key weight parameters of the module it replaced (``2·n·H·d``, biases excluded)."""
        return 2 * self.query_proj.in_features * self.num_heads * self.head_dim

    @property
    def qk_parameters(self) -> int:
        """Query + key weight parameters now (``2·n·H·k``)."""
        return 2 * self.query_proj.in_features * self.num_heads * self.qk_rank

    def extra_repr(self) -> str:
        err = "" if self.relative_error is None else f", relative_error={self.relative_error:.4f}"
        return f"heads={self.num_heads}, head_dim={self.head_dim}, qk_rank={self.qk_rank}{err}"

    def _get_name(self) -> str:  # shows as "drone.<Family>Attention" in print(model)
        return f"drone.{type(self).__name__.removeprefix('Drone')}"


def _record_attention_weights(module: nn.Module, args: Any, output: Any) -> None:
    """Give this module's attention weights (output index 1) to transformers' active output collector
    when the caller asked for ``output_attentions``; what the hook transformers attaches to the original
    class would have done (``transformers.utils.output_capturing``)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without the output recorder collects weights from return values
        return
    collected = _active_collector.get()
    if collected is None or "attentions" not in collected:
        return
    if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
        collected["attentions"].append(output[1])


def drone_attention_modules(model: nn.Module) -> dict[str, DroneAttention]:
    """Full name -> every :class:`DroneAttention` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DroneAttention)}


def set_qk_layout(model: nn.Module, layout: str) -> None:
    """Set how every compressed attention of ``model`` feeds SDPA (``"auto"``, ``"padded"``, ``"narrow"``).

    ``"auto"``/``"padded"`` zero-pad queries and keys to the value width so SDPA's fused kernels
    run (faster on CPU, measured); ``"narrow"`` keeps the ``k``-wide score product inside SDPA.
    Results are identical up to float round-off.
    """
    if layout not in QK_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: use one of {list(QK_LAYOUTS)}.")
    for module in drone_attention_modules(model).values():
        module.qk_layout = layout
