"""GPT-2 self-attention (``GPT2Attention``: fused ``c_attn`` ``Conv1D``, causal mask, KV cache).

``c_attn`` computes queries, keys and values in one ``Conv1D`` ([n, 3·n] weight, stored in x out).
QK compression splits it: ``query`` and ``key`` become ``k``-wide ``nn.Linear`` projections and the
value slice becomes its own ``nn.Linear`` ``value`` (exact copy), so checkpoints of a compressed
GPT-2 have ``attn.query``/``attn.key``/``attn.value`` instead of ``attn.c_attn``. Because the linear
stage only sees the fused ``c_attn``, the value is factored by the attention stage itself (at the
uniform ``param_ratio`` rank) when ``c_attn`` was a linear target. The score scale keeps GPT-2's
options (``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``); the causal mask and the KV
cache (narrow keys, full values) work as in the original. Cross-attention modules are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules.attention import DroneAttention
from ..modules.low_rank_linear import DroneLinear
from .base import AttentionAdapter, carry_children, weight_of


class DroneGPT2Attention(DroneAttention):
    """``GPT2Attention`` (self-attention) with ``qk_rank``-wide query/key heads and a split value."""

    family = "gpt2"

    def __init__(
        self,
        config: Any,
        qk_rank: int,
        scaling: float,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        embed_dim = config.hidden_size
        heads = config.num_attention_heads
        super().__init__(
            num_heads=heads, head_dim=embed_dim // heads, qk_rank=qk_rank, in_features=embed_dim,
            scaling=scaling, device=device, dtype=dtype,
        )
        self.config = config
        self.embed_dim = embed_dim
        self.split_size = embed_dim
        self.layer_idx = layer_idx
        self.is_cross_attention = False
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.value = nn.Linear(embed_dim, embed_dim, device=device, dtype=dtype)
        self.c_proj = nn.Linear(embed_dim, embed_dim, device=device, dtype=dtype)  # replaced by the carried Conv1D
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.is_causal = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Any = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, eager_attention_forward

        if encoder_hidden_states is not None:
            raise ValueError(
                "This DRONE-compressed GPT-2 attention is a self-attention layer; cross-attention layers are never "
                "compressed, so encoder_hidden_states cannot reach it."
            )
        query_states = self.query_states(hidden_states)
        key_states = self.key_states(hidden_states)
        value_states = self.split_heads(self.value(hidden_states), self.head_dim)
        key_states, value_states = self.cached_key_values(key_states, value_states, cache, past_key_values)
        dropout = self.attn_dropout.p if self.training else 0.0
        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            # GPT-2's float32 eager variant works at any query/key width (it reads dk from the query)
            attn_output, attn_weights = GPT2Attention._upcast_and_reordered_attn(
                self, query_states, key_states, value_states, attention_mask
            )
        else:
            attn_output, attn_weights = self.attend(
                self.config, eager_attention_forward, query_states, key_states, value_states, attention_mask,
                dropout=dropout, **kwargs,
            )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        attn_output = self.resid_dropout(self.c_proj(attn_output))
        return attn_output, attn_weights


def _dense_linear(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([out, in] weight, bias) of an ``nn.Linear`` or a ``DroneLinear`` (merged)."""
    if isinstance(layer, DroneLinear):
        return layer.merged_weight().detach(), layer.bias
    return layer.weight.detach(), layer.bias


class GPT2Adapter(AttentionAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    absorbed = ("c_attn",)
    carried = ("c_proj",)
    extra = ("value",)

    def source_classes(self) -> tuple[type, ...]:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        return (GPT2Attention,)

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) and not module.is_cross_attention

    def num_heads(self, module: nn.Module) -> int:
        return int(module.num_heads)

    def qk_weights(self, module: nn.Module):
        d = module.embed_dim
        w, b = module.c_attn.weight, module.c_attn.bias  # Conv1D: [in, 3·d]
        return w[:, :d].T, b[:d], w[:, d : 2 * d].T, b[d : 2 * d]

    def input_layer(self, module: nn.Module) -> nn.Module:
        return module.c_attn

    def new_module(self, original: nn.Module, qk_rank: int, model_config: Any) -> DroneAttention:
        p = weight_of(original.c_attn)
        new = DroneGPT2Attention(
            original.config, qk_rank, scaling=original.scaling, layer_idx=original.layer_idx,
            device=p.device, dtype=p.dtype,
        )
        new.value = self.extra_layers(original)["value"]
        return carry_children(self, original, new)

    def extra_layers(self, original: nn.Module) -> dict[str, nn.Module]:
        d = original.embed_dim
        p = weight_of(original.c_attn)
        value = nn.Linear(d, d, device=p.device, dtype=p.dtype)
        with torch.no_grad():  # the value slice of c_attn, exactly (a no-op on the meta device)
            value.weight.copy_(original.c_attn.weight[:, 2 * d :].T)
            value.bias.copy_(original.c_attn.bias[2 * d :])
        value.train(original.training)
        return {"value": value}

    def restore(self, module: DroneAttention) -> nn.Module:
        cls = module.source_class or self.source_classes()[0]
        p = weight_of(module.query_proj)
        with torch.device(p.device):
            dense = cls(module.config, is_cross_attention=False, layer_idx=module.layer_idx).to(p.dtype)
        wq, bq = module.padded_projection("query")
        wk, bk = module.padded_projection("key")
        wv, bv = _dense_linear(module.value)
        bv = torch.zeros_like(bq) if bv is None else bv.detach()
        with torch.no_grad():
            dense.c_attn.weight.copy_(torch.cat([wq, wk, wv.to(wq.dtype)], dim=0).T)
            dense.c_attn.bias.copy_(torch.cat([bq, bk, bv.to(bq.dtype)]))
        dense.c_proj = module.c_proj
        dense.scaling = module.scaling
        dense.train(module.training)
        return dense
