"""Tiny randomly initialised models of every family with query-key (attention) compression.

Built in code with the packaged MiniLM WordPiece tokenizer's vocabulary (pad id 0), so no Hub access
is needed. 4 heads of width 8 over hidden size 32, two layers.
"""

from __future__ import annotations

import torch
from tiny_models import VOCAB, bert_config, gpt2_config
from torch import nn
from transformers import (
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2LMHeadModel,
    MPNetConfig,
    MPNetModel,
    RobertaConfig,
    RobertaModel,
)

HEADS, HEAD_DIM = 4, 8


def roberta_config(**kw) -> RobertaConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=140, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )
    return RobertaConfig(**(base | kw))


def distilbert_config(**kw) -> DistilBertConfig:
    base = dict(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=HEADS, hidden_dim=64, max_position_embeddings=128, pad_token_id=0
    )
    return DistilBertConfig(**(base | kw))


def mpnet_config(**kw) -> MPNetConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=140, pad_token_id=0,
    )
    return MPNetConfig(**(base | kw))


#: family -> (model class, config factory); every family QK compression supports.
FAMILIES = {
    "bert": (BertModel, bert_config),
    "roberta": (RobertaModel, roberta_config),
    "distilbert": (DistilBertModel, distilbert_config),
    "mpnet": (MPNetModel, mpnet_config),
    "gpt2": (GPT2LMHeadModel, gpt2_config),
}


def build(family: str, seed: int = 0) -> nn.Module:
    cls, make = FAMILIES[family]
    torch.manual_seed(seed)
    return cls(make()).eval()


def output_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of an LM, else the last hidden state, with padded positions zeroed (they are junk)."""
    with torch.no_grad():
        out = model(**inputs)
    value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value * inputs["attention_mask"][..., None]
