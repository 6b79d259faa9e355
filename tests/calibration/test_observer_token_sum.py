"""The token sum ``Σx`` that attention compression needs, next to the Gram: streamed over padded
batches, it must equal the sum over every text's own unpadded forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model helpers
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer  # noqa: E402
from transformers import BertModel  # noqa: E402

from drone_hf.calibration import GramObserver, collect_grams, tokenize_batches  # noqa: E402

f64 = torch.float64


def test_observer_accumulates_token_sums_in_float64() -> None:
    obs = GramObserver(3, "x")
    a, b = torch.randn(4, 3), torch.randn(2, 3)
    for t in (a, b):
        obs.add(GramObserver.batch_product(t), t.shape[0], token_sum=GramObserver.batch_sum(t))
    assert obs.token_sum.dtype == f64 and obs.num_tokens == obs.summed_tokens == 6 and obs.has_token_sum
    torch.testing.assert_close(obs.token_sum, torch.cat([a, b]).double().sum(0), rtol=1e-6, atol=1e-6)


def test_batches_without_a_sum_keep_the_old_behaviour_and_say_so() -> None:
    obs = GramObserver(2)
    x = torch.randn(5, 2)
    obs.add(GramObserver.batch_product(x), 5)  # the pre-existing call form
    assert obs.token_sum is None and not obs.has_token_sum and obs.num_tokens == 5
    obs.add(GramObserver.batch_product(x), 5, token_sum=GramObserver.batch_sum(x))
    assert not obs.has_token_sum  # covers 5 of 10 tokens: never mistaken for the full sum


def test_pipeline_token_sums_equal_unpadded_references() -> None:
    torch.manual_seed(0)
    model = BertModel(bert_config()).double().eval()
    tok = tokenizer()
    attention = model.encoder.layer[1].attention.self
    layers = {"query": attention.query, "value": attention.value}
    data = tokenize_batches(CALIBRATION_TEXTS, tok, 64, 3)  # padded, length-sorted batches
    observers = collect_grams(model, layers, data, {"query": 32, "value": 32}, show_progress=False)
    rows = []
    hook = layers["query"].register_forward_hook(lambda m, a, o: rows.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for text in CALIBRATION_TEXTS:
            model(**tok(text, return_tensors="pt"))
    hook.remove()
    x = torch.cat(rows)
    for obs in observers.values():  # query and value share the input (and its one product)
        assert obs.has_token_sum and obs.num_tokens == x.shape[0]
        torch.testing.assert_close(obs.token_sum, x.sum(0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(obs.gram, x.T @ x, rtol=1e-10, atol=1e-10)


def test_pipeline_skips_token_sums_when_not_asked_and_grams_are_unchanged() -> None:
    """``token_sums=False`` (what compress passes without attention compression): no sums kept,
    the same Grams bit for bit."""
    torch.manual_seed(0)
    model = BertModel(bert_config()).double().eval()
    tok = tokenizer()
    attention = model.encoder.layer[1].attention.self
    layers = {"query": attention.query, "value": attention.value}
    data = tokenize_batches(CALIBRATION_TEXTS, tok, 64, 3)
    widths = {"query": 32, "value": 32}
    with_sums = collect_grams(model, layers, data, widths, show_progress=False)
    without = collect_grams(model, layers, data, widths, show_progress=False, token_sums=False)
    for name, obs in without.items():
        assert obs.token_sum is None and not obs.has_token_sum
        assert obs.num_tokens == with_sums[name].num_tokens
        assert torch.equal(obs.gram, with_sums[name].gram)
