"""MPNet self-attention (``MPNetSelfAttention``: ``q``/``k``/``v``/``o``, relative position bias).

MPNet adds a learned relative-position bias to the scores *after* the query-key product, so the
product itself is position-free and DRONE's query-key compression applies unchanged: the bias is
added to the compressed scores exactly as before. The original computes eager attention; the
replacement runs SDPA with the bias folded into the additive mask, and the eager form when
attention weights are requested (``output_attentions=True``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules.attention import DroneAttention
from .base import AttentionAdapter, carry_children, copy_padded_qk, weight_of


class DroneMPNetSelfAttention(DroneAttention):
    """``MPNetSelfAttention`` with ``qk_rank``-wide query/key heads (same forward signature)."""

    family = "mpnet"
    query_name = "q"
    key_name = "k"
    records_attentions = False  # MPNet's encoder collects the weights from the return values

    def __init__(
        self, config: Any, qk_rank: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        heads = config.num_attention_heads
        head_dim = int(config.hidden_size / heads)
        super().__init__(
            num_heads=heads, head_dim=head_dim, qk_rank=qk_rank, in_features=config.hidden_size,
            scaling=head_dim**-0.5, device=device, dtype=dtype,
        )
        self.config = config
        self.num_attention_heads = heads
        self.attention_head_size = head_dim
        self.all_head_size = heads * head_dim
        self.v = nn.Linear(config.hidden_size, self.all_head_size, device=device, dtype=dtype)
        self.o = nn.Linear(config.hidden_size, config.hidden_size, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_causal = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:
        q, k = self.query_states(hidden_states), self.key_states(hidden_states)
        v = self.split_heads(self.v(hidden_states), self.head_dim)
        if output_attentions:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
            if position_bias is not None:
                scores = scores + position_bias
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = self.dropout(nn.functional.softmax(scores, dim=-1))
            c = torch.matmul(probs, v).transpose(1, 2)
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            if self.qk_layout != "narrow":
                q, k = self._pad(q, self.head_dim), self._pad(k, self.head_dim)
            c, _ = sdpa_attention_forward(
                self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                scaling=self.scaling, is_causal=False, position_bias=position_bias,
            )
        o = self.o(c.reshape(*hidden_states.shape[:-1], self.all_head_size))
        return (o, probs) if output_attentions else (o,)


class MPNetAdapter(AttentionAdapter):
    family = "mpnet"
    model_types = ("mpnet",)
    absorbed = ("q", "k")
    carried = ("v", "o")

    def source_classes(self) -> tuple[type, ...]:
        from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

        return (MPNetSelfAttention,)

    def num_heads(self, module: nn.Module) -> int:
        return int(module.num_attention_heads)

    def qk_weights(self, module: nn.Module):
        return module.q.weight, module.q.bias, module.k.weight, module.k.bias

    def input_layer(self, module: nn.Module) -> nn.Module:
        return module.q

    def new_module(self, original: nn.Module, qk_rank: int, model_config: Any) -> DroneAttention:
        p = weight_of(original.q)
        new = DroneMPNetSelfAttention(model_config, qk_rank, device=p.device, dtype=p.dtype)
        new.dropout.p = original.dropout.p
        return carry_children(self, original, new)

    def restore(self, module: DroneAttention) -> nn.Module:
        cls = module.source_class or self.source_classes()[0]
        p = weight_of(module.query_proj)
        with torch.device(p.device):
            dense = cls(module.config).to(p.dtype)
        copy_padded_qk(module, dense.q, dense.k)
        dense.v, dense.o = module.v, module.o
        dense.train(module.training)
        return dense
