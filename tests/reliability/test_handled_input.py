"""Inputs that look wrong but have one sensible meaning (docs/bad_input.md, "Handled, not refused")."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer
from transformers import BertModel

import drone_hf
from drone_hf.modules.low_rank_linear import DroneLinear


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
