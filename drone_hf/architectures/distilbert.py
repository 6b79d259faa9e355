"""DistilBERT self-attention (``DistilBertSelfAttention``: ``q_lin``/``k_lin``/``v_lin``/``out_lin``).

The module applies its output projection itself; the replacement keeps that, the forward signature
(``hidden_states, attention_mask, **kwargs``) and the checkpoint names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules.attention import DroneAttention
from .base import AttentionAdapter, carry_children, copy_padded_qk, weight_of


class DroneDistilBertSelfAttention(DroneAttention):
    """``DistilBertSelfAttention`` with ``qk_rank``-wide query/key heads (same forward signature)."""

    family = "distilbert"
    query_name = "q_lin"
    key_name = "k_lin"

    def __init__(
        self, config: Any, qk_rank: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        head_dim = config.dim // config.n_heads
        super().__init__(
            num_heads=config.n_heads, head_dim=head_dim, qk_rank=qk_rank, in_features=config.dim,
            scaling=head_dim**-0.5, device=device, dtype=dtype,
        )
        self.config = config
        self.n_heads = config.n_heads
        self.dim = config.dim
        self.attention_head_size = head_dim
        self.v_lin = nn.Linear(config.dim, config.dim, device=device, dtype=dtype)
        self.out_lin = nn.Linear(config.dim, config.dim, device=device, dtype=dtype)
        self.dropout = nn.Dropout(p=config.attention_dropout)
        self.is_causal = False

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.models.distilbert.modeling_distilbert import eager_attention_forward

        input_shape = hidden_states.shape[:-1]
        value = self.split_heads(self.v_lin(hidden_states), self.head_dim)
        attn_output, attn_weights = self.attend(
            self.config, eager_attention_forward, self.query_states(hidden_states), self.key_states(hidden_states),
            value, attention_mask, dropout=0.0 if not self.training else self.dropout.p, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_lin(attn_output), attn_weights


class DistilBertAdapter(AttentionAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    absorbed = ("q_lin", "k_lin")
    carried = ("v_lin", "out_lin")

    def source_classes(self) -> tuple[type, ...]:
        from transformers.models.distilbert.modeling_distilbert import DistilBertSelfAttention

        return (DistilBertSelfAttention,)

    def num_heads(self, module: nn.Module) -> int:
        return int(module.n_heads)

    def qk_weights(self, module: nn.Module):
        return module.q_lin.weight, module.q_lin.bias, module.k_lin.weight, module.k_lin.bias

    def input_layer(self, module: nn.Module) -> nn.Module:
        return module.q_lin

    def new_module(self, original: nn.Module, qk_rank: int, model_config: Any) -> DroneAttention:
        p = weight_of(original.q_lin)
        new = DroneDistilBertSelfAttention(original.config, qk_rank, device=p.device, dtype=p.dtype)
        return carry_children(self, original, new)

    def restore(self, module: DroneAttention) -> nn.Module:
        cls = module.source_class or self.source_classes()[0]
        p = weight_of(module.query_proj)
        with torch.device(p.device):
            dense = cls(module.config).to(p.dtype)
        copy_padded_qk(module, dense.q_lin, dense.k_lin)
        dense.v_lin, dense.out_lin = module.v_lin, module.out_lin
        dense.train(module.training)
        return dense
