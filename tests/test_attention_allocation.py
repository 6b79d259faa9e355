"""Per-layer attention ranks from the score-error spectra (``compress_attention`` with a non-uniform allocation).

``attention_rank`` becomes an average: the total query/key width of the uniform choice is split over
the modules greedily. Checked against brute force on synthetic spectra, and end to end on a tiny
model: equal total width, a sum of squared score errors no larger than the uniform choice's, and an
exact reload of the mixed ranks.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from attention_models import HEADS, output_of
from tiny_models import CALIBRATION_TEXTS, bert_config, sample_inputs, tokenizer
from transformers import AutoModel, BertModel

import drone_hf
from drone_hf import DroneConfig
from drone_hf.attention_stage import allocate_attention_ranks
from drone_hf.modules.attention import drone_attention_modules

TOKENIZER = tokenizer()


def spectrum(rng: random.Random, d: int) -> list[float]:
    """Relative errors at k = 0..d of a random head spectrum (sorted singular energies)."""
    energies = sorted((rng.random() ** 3 for _ in range(d)), reverse=True)
    total = sum(energies)
    return [(sum(energies[k:]) / total) ** 0.5 for k in range(d + 1)]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_brute_force_on_synthetic_spectra(seed) -> None:
    rng = random.Random(seed)
    d, heads = 6, {"a": 2, "b": 2, "c": 2}
    errors = {n: spectrum(rng, d) for n in heads}
    budget = 2 * rng.randint(3, 3 * d)
    got = allocate_attention_ranks(errors, heads, budget)
    assert sum(heads[n] * k for n, k in got.items()) <= budget and all(1 <= k <= d for k in got.values())
    best = min(
        sum(errors[n][k] ** 2 for n, k in zip(heads, ks, strict=True))
        for ks in itertools.product(range(1, d + 1), repeat=len(heads))
        if sum(heads[n] * k for n, k in zip(heads, ks, strict=True)) <= budget
    )
    assert sum(errors[n][k] ** 2 for n, k in got.items()) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_budget_below_rank_one_everywhere_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot give every one of the 2 modules rank 1"):
        allocate_attention_ranks({"a": [1.0, 0.5, 0.0], "b": [1.0, 0.5, 0.0]}, {"a": 4, "b": 4}, 7)


def compress(allocation: str):
    torch.manual_seed(0)
    model = BertModel(bert_config(num_hidden_layers=4)).eval()
    cfg = DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=len(CALIBRATION_TEXTS), batch_size=3, tokenizer=TOKENIZER,
        compress_attention=True, attention_rank=3, target_modules=["query", "key"], allocation=allocation,
    )
    return drone_hf.compress(model, cfg, show_progress=False)


def test_greedy_allocation_beats_uniform_at_equal_width_and_reloads(tmp_path) -> None:
    uniform, greedy = compress("uniform"), compress("greedy")
    qu, qg = uniform.config.quantization_config, greedy.config.quantization_config
    assert set(qu.attention_ranks.values()) == {3}
    width = sum(HEADS * k for k in qg.attention_ranks.values())
    assert width <= sum(HEADS * k for k in qu.attention_ranks.values()) == 4 * HEADS * 3
    assert sum(e**2 for e in qg.attention_errors.values()) <= sum(e**2 for e in qu.attention_errors.values()) + 1e-12
    assert len(set(qg.attention_ranks.values())) > 1  # the spectra differ, so the ranks do
    modules = drone_attention_modules(greedy)
    assert {drone_hf.modules.canonical_name(greedy, n): m.qk_rank for n, m in modules.items()} == qg.attention_ranks

    inputs = sample_inputs()
    greedy.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.attention_ranks == qg.attention_ranks
    torch.testing.assert_close(output_of(reloaded, inputs), output_of(greedy, inputs), rtol=0, atol=0)
