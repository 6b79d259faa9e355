"""Inputs that look wrong but have one sensible meaning (docs/bad_input.md, "Handled, not refused")."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, VOCAB, bert_config, gpt2_config, tokenizer
from transformers import BertModel

import drone_hf
from drone_hf.hub.measure import measure_speed
from drone_hf.modules.low_rank_linear import DroneLinear
from drone_hf.utils.positions import usable_positions


def fresh_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(bert_config()).eval()  # 128 positions


def test_max_length_above_the_model_positions_is_capped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("transformers.drone_hf.compress")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        texts = [" ".join(["word"] * 400) + f" {i}" for i in range(4)]  # ~400 tokens each
        cfg = drone_hf.DroneConfig(dataset=texts, num_samples=4, max_length=1000, tokenizer=tokenizer(),
                                   allocation="uniform")  # all 4 texts calibrate (greedy would hold one out)
        model = drone_hf.compress(fresh_bert(), cfg, show_progress=False)
    finally:
        logger.removeHandler(handler)
    assert any("max_length=1000 exceeds the model's 128 positions; calibrating at 128" in r for r in records)
    calibration = model.config.quantization_config.calibration
    assert calibration["max_length"] == 128
    assert calibration["num_tokens"] == 4 * 128  # every text truncated to the model's limit


def tiny_roberta(positions: int = 66):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=positions, pad_token_id=1)).eval()


def test_usable_positions_counts_tokens_not_table_rows() -> None:
    """RoBERTa-style tables number positions from padding_idx + 1: 66 rows hold 64 tokens."""
    from transformers import GPT2LMHeadModel

    assert usable_positions(fresh_bert()) == 128  # BERT: positions from 0
    assert usable_positions(tiny_roberta()) == 64
    assert usable_positions(GPT2LMHeadModel(gpt2_config(n_positions=96))) == 96  # GPT-2's own config key
    assert usable_positions(torch.nn.Linear(2, 2)) is None  # no config: no limit known


def test_max_length_above_roberta_style_positions_is_capped_where_tokens_fit() -> None:
    texts = [" ".join(["word"] * 400) + f" {i}" for i in range(4)]
    cfg = drone_hf.DroneConfig(dataset=texts, num_samples=4, max_length=1000, tokenizer=tokenizer(),
                               allocation="uniform")
    model = drone_hf.compress(tiny_roberta(), cfg, show_progress=False)  # at 66 tokens: IndexError in the forward
    calibration = model.config.quantization_config.calibration
    assert calibration["max_length"] == 64 and calibration["num_tokens"] == 4 * 64
    dense = tiny_roberta()
    with pytest.raises(ValueError, match="seq_len=65 exceeds the model's 64 positions"):
        measure_speed(dense, model, batch_size=1, seq_len=65, repeats=1, warmup=0)
    assert measure_speed(dense, model, batch_size=1, seq_len=64, repeats=1, warmup=0).dense_latency_ms > 0


def test_a_tokenizer_without_pad_token_gives_the_same_factors() -> None:
    """drone-hf pads itself (EOS id or 0) and masks padding out: the statistics cannot depend on it."""
    with_pad = tokenizer()
    with_pad.pad_token = "[MASK]"  # a pad id (103) unlike the 0 drone-hf falls back to
    without_pad = tokenizer()
    without_pad.pad_token = None
    assert without_pad.pad_token_id is None and with_pad.pad_token_id not in (0, None)
    texts = CALIBRATION_TEXTS  # different lengths: batches do contain padding
    a = drone_hf.compress(
        fresh_bert(), drone_hf.DroneConfig(dataset=texts, num_samples=8, batch_size=4, tokenizer=with_pad),
        show_progress=False,
    )
    b = drone_hf.compress(
        fresh_bert(), drone_hf.DroneConfig(dataset=texts, num_samples=8, batch_size=4, tokenizer=without_pad),
        show_progress=False,
    )
    la = {n: m for n, m in a.named_modules() if isinstance(m, DroneLinear)}
    lb = {n: m for n, m in b.named_modules() if isinstance(m, DroneLinear)}
    assert la.keys() == lb.keys() and la
    for name in la:
        wa, wb = la[name].merged_weight(), lb[name].merged_weight()
        assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-6 * float(wa.abs().max())), name
    assert a.config.quantization_config.calibration == b.config.quantization_config.calibration
