"""BERT and RoBERTa self-attention (``BertSelfAttention``, ``RobertaSelfAttention``).

Both keep ``query``/``key``/``value`` as separate ``nn.Linear`` layers and call transformers'
attention interface with ``scaling = head_dim ** -0.5``; the replacement keeps their forward
signature (``hidden_states, attention_mask, past_key_values, **kwargs``), the decoder KV cache and
the checkpoint names ``query``/``key``/``value``. Cross-attention modules are left alone: their keys
read a different input than their queries, so one input Gram does not describe the scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules.attention import DroneAttention
from .base import AttentionAdapter, carry_children, copy_padded_qk, weight_of


class DroneBertSelfAttention(DroneAttention):
    """``BertSelfAttention`` with ``qk_rank``-wide query/key heads (same forward signature)."""

    family = "bert"

    def __init__(
        self,
        config: Any,
        qk_rank: int,
        is_causal: bool = False,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        heads = config.num_attention_heads
        head_dim = int(config.hidden_size / heads)
        super().__init__(
            num_heads=heads, head_dim=head_dim, qk_rank=qk_rank, in_features=config.hidden_size,
            scaling=head_dim**-0.5, device=device, dtype=dtype,
        )
        self.config = config
        # the original's public attributes, for code that reads them
        self.num_attention_heads = heads
        self.attention_head_size = head_dim
        self.all_head_size = heads * head_dim
        self.value = nn.Linear(config.hidden_size, self.all_head_size, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_decoder = config.is_decoder
        self.is_causal = is_causal
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.models.bert.modeling_bert import eager_attention_forward

        input_shape = hidden_states.shape[:-1]
        query_layer = self.query_states(hidden_states)
        key_layer = self.key_states(hidden_states)
        value_layer = self.split_heads(self.value(hidden_states), self.head_dim)
        key_layer, value_layer = self.cached_key_values(key_layer, value_layer, cache, past_key_values)
        attn_output, attn_weights = self.attend(
            self.config, eager_attention_forward, query_layer, key_layer, value_layer, attention_mask,
            dropout=0.0 if not self.training else self.dropout.p, **kwargs,
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


class BertLikeAdapter(AttentionAdapter):
    """Self-attention with separate ``query``/``key``/``value`` linear layers (BERT, RoBERTa)."""

    family = "bert"
    model_types = ("bert", "roberta")
    absorbed = ("query", "key")
    carried = ("value",)

    def source_classes(self) -> tuple[type, ...]:
        from transformers.models.bert.modeling_bert import BertSelfAttention
        from transformers.models.roberta.modeling_roberta import RobertaSelfAttention

        return (BertSelfAttention, RobertaSelfAttention)

    def num_heads(self, module: nn.Module) -> int:
        return int(module.num_attention_heads)

    def qk_weights(self, module: nn.Module):
        return module.query.weight, module.query.bias, module.key.weight, module.key.bias

    def input_layer(self, module: nn.Module) -> nn.Module:
        return module.query

    def new_module(self, original: nn.Module, qk_rank: int, model_config: Any) -> DroneAttention:
        p = weight_of(original.query)
        new = DroneBertSelfAttention(
            original.config, qk_rank, is_causal=original.is_causal, layer_idx=original.layer_idx,
            device=p.device, dtype=p.dtype,
        )
        return carry_children(self, original, new)

    def restore(self, module: DroneAttention) -> nn.Module:
        cls = module.source_class or self.source_classes()[0]
        p = weight_of(module.query_proj)
        with torch.device(p.device):
            dense = cls(module.config, is_causal=module.is_causal, layer_idx=module.layer_idx).to(p.dtype)
        copy_padded_qk(module, dense.query, dense.key)
        dense.value = module.value
        dense.train(module.training)
        return dense
