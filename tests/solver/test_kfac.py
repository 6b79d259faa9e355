"""Loss-aware DRONE (``method="drone-kfac"``): the closed form reaches the optimum of its weighted
objective, reduces to DRONE when the output metric is isotropic, reports the true errors of the
factors it returns, and its statistics (output-gradient Grams) are those of the loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import drone_hf
from drone_hf.calibration.data import tokenize_batches
from drone_hf.calibration.output_gradients import collect_output_grams
from drone_hf.solver import decompose, decompose_compensated, decompose_kfac, decompose_kfac_compensated
from tests.tiny_models import CALIBRATION_TEXTS, save_tiny, tokenizer

f64 = torch.float64


def problem(m: int = 12, n: int = 10, tokens: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=f64)
    x = torch.randn(n, n, generator=g, dtype=f64) @ (
        torch.randn(n, tokens, generator=g, dtype=f64) * torch.logspace(0, 1.5, n, dtype=f64)[:, None])
    a = torch.randn(m, m, generator=g, dtype=f64) * torch.logspace(0, 1, m, dtype=f64)
    return w, x, a @ a.T  # H: full rank, strongly anisotropic


def damped_root(h: torch.Tensor, damp: float) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(h)
    lam = lam.clamp_min(0) + damp * float(lam.clamp_min(0).mean())
    return (vec * lam.sqrt()) @ vec.T


@pytest.mark.parametrize("damp", [0.1, 1.0])
def test_reaches_the_optimum_of_the_weighted_objective(damp):
    w, x, h = problem()
    dec = decompose_kfac(w, x @ x.T, h, damp=damp)
    hs = damped_root(h, damp)
    sigma2 = torch.linalg.svdvals(hs @ w @ x) ** 2  # Eckart-Young: the best rank-k leaves the tail
    drone = decompose(w, x @ x.T)
    for k in range(1, 10):
        f = dec.factors(k)
        achieved = float(((hs @ (w - f.up @ f.down) @ x) ** 2).sum())
        optimum = float(sigma2[k:].sum())
        assert achieved == pytest.approx(optimum, rel=1e-8, abs=1e-9 * float(sigma2.sum()))
        reported = float(dec.curvature_squared_errors[k])
        assert reported == pytest.approx(optimum, rel=1e-8, abs=1e-9 * float(sigma2.sum()))
        # DRONE's factors are optimal for the unweighted error, not for this one
        fd = drone.factors(k)
        assert float(((hs @ (w - fd.up @ fd.down) @ x) ** 2).sum()) >= achieved * (1 - 1e-9)
    # ... and the other way round: on the plain output error DRONE wins
    k = 4
    plain = lambda f: float(((w - f.up @ f.down) @ x).norm())  # noqa: E731
    assert plain(drone.factors(k)) <= plain(dec.factors(k)) * (1 + 1e-9)
    assert plain(drone.factors(k)) < plain(dec.factors(k)) * 0.999  # anisotropic H: a real difference


def test_reported_errors_are_those_of_the_returned_factors():
    w, x, h = problem(seed=1)
    dec = decompose_kfac(w, x @ x.T, h)
    rel = dec.relative_errors()
    for k in (1, 3, 7, 10):
        f = dec.factors(k)
        direct = float(((w - f.up @ f.down) @ x).norm() / (w @ x).norm())
        assert float(rel[k]) == pytest.approx(direct, rel=1e-7, abs=1e-10)
        assert f.relative_error == pytest.approx(direct, rel=1e-7, abs=1e-10)


def test_isotropic_output_metric_is_drone():
    w, x, _ = problem(seed=2)
    g = x @ x.T
    for h in (3.5 * torch.eye(12, dtype=f64), torch.zeros(12, 12, dtype=f64)):
        dec, drone = decompose_kfac(w, g, h, damp=0.5), decompose(w, g)
        for k in (1, 5, 9):
            a, b = dec.factors(k), drone.factors(k)
            torch.testing.assert_close(a.up @ a.down, b.up @ b.down)
    # a zero H (the loss never reached the layer) predicts nothing: greedy then probes instead
    assert dec.predicted_loss(3) is None and dec.curvature_squared_errors is None


def test_large_damping_approaches_drone():
    w, x, h = problem(seed=3)
    a, b = decompose_kfac(w, x @ x.T, h, damp=1e9).factors(4), decompose(w, x @ x.T).factors(4)
    torch.testing.assert_close(a.up @ a.down, b.up @ b.down, rtol=1e-5, atol=1e-6)


def test_predicted_loss_is_the_scaled_discarded_curvature():
    w, x, h = problem(seed=4)
    dec = decompose_kfac(w, x @ x.T, h, loss_scale=0.25)
    assert dec.predicted_loss(0) == pytest.approx(0.25 * float(dec.curvature_squared_errors[0]))
    losses = [dec.predicted_loss(k) for k in range(11)]
    assert all(a >= b for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] == pytest.approx(0, abs=1e-9)


# --- compensated form (sequential="compensated") ------------------------------------------------


def compensated_problem(seed: int = 5, noise: float = 0.4):
    w, x, h = problem(seed=seed)
    x_hat = x + noise * float(x.std()) * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100),
                                                      dtype=f64)
    return w, x, x_hat, h


def compensated_stats(w, x, x_hat):
    return x_hat @ x_hat.T, x @ x_hat.T, float((w @ x).square().sum())


@pytest.mark.parametrize("damp", [0.1, 1.0])
def test_compensated_form_reaches_the_optimum_of_the_weighted_compensated_objective(damp):
    """min ||H_δ^{1/2} (W X - W' X̂)|| computed another way: with Q an orthonormal basis of X̂'s row
    space (full row rank here), W' X̂ ranges over all Z Qᵀ with rank(Z) <= k, so the optimum is the
    part of A = H_δ^{1/2} W X outside that space plus the Eckart-Young tail of A Q."""
    w, x, x_hat, h = compensated_problem()
    dec = decompose_kfac_compensated(w, *compensated_stats(w, x, x_hat), h, kfac_damp=damp)
    hs = damped_root(h, damp)
    a = hs @ w @ x
    q, _ = torch.linalg.qr(x_hat.T)
    irreducible = float((a - (a @ q) @ q.T).square().sum())
    sigma2 = torch.linalg.svdvals(a @ q) ** 2
    assert irreducible > 1e-3 * float((a * a).sum())  # the inputs really changed
    norm = float((w @ x).norm())
    for k in range(1, 10):
        f = dec.factors(k)
        achieved = float((hs @ (w @ x - f.up @ f.down @ x_hat)).square().sum())
        optimum = irreducible + float(sigma2[k:].sum())
        assert achieved == pytest.approx(optimum, rel=1e-8)
        # the truncation's own (reducible) part is what curvature_squared_errors reports
        assert float(dec.curvature_squared_errors[k]) == pytest.approx(float(sigma2[k:].sum()), rel=1e-7,
                                                                         abs=1e-9 * float(sigma2.sum()))
        # the recorded error is that of the returned factors on the compensated objective, unweighted
        direct = float((w @ x - f.up @ f.down @ x_hat).norm()) / norm
        assert float(dec.relative_errors()[k]) == pytest.approx(direct, rel=1e-8)
        assert f.relative_error == pytest.approx(direct, rel=1e-8)
    assert float(dec.relative_errors()[0]) == pytest.approx(1.0)


def test_compensated_form_on_unchanged_inputs_is_kfac_and_isotropic_metric_is_compensated_drone():
    w, x, x_hat, h = compensated_problem(seed=6)
    g = x @ x.T
    same = decompose_kfac_compensated(w, g, g, float((w @ x).square().sum()), h)
    kfac = decompose_kfac(w, g, h)
    iso = decompose_kfac_compensated(w, *compensated_stats(w, x, x_hat), 2.0 * torch.eye(12, dtype=f64))
    drone = decompose_compensated(w, *compensated_stats(w, x, x_hat))
    for k in (1, 4, 9):
        a, b = same.factors(k), kfac.factors(k)
        torch.testing.assert_close(a.up @ a.down, b.up @ b.down)
        c, d = iso.factors(k), drone.factors(k)
        torch.testing.assert_close(c.up @ c.down, d.up @ d.down)
        assert c.relative_error == pytest.approx(d.relative_error, rel=1e-9)


@pytest.mark.parametrize("damp", [0, -1.0, float("nan"), True, "0.1"])
def test_bad_damping_is_refused_with_the_fix(damp):
    w, x, h = problem()
    with pytest.raises(ValueError, match="kfac_damp"):
        decompose_kfac(w, x @ x.T, h, damp=damp)
    with pytest.raises(ValueError, match="kfac_damp=.*must be a finite number > 0"):
        drone_hf.DroneConfig(method="drone-kfac", kfac_damp=damp)


def test_shape_mismatch_and_plain_decompose_are_refused():
    w, x, h = problem()
    with pytest.raises(ValueError, match=r"out_gram has shape \(11, 11\).*expected \(12, 12\)"):
        decompose_kfac(w, x @ x.T, h[:11, :11])
    with pytest.raises(ValueError, match="decompose_kfac"):
        decompose(w, x @ x.T, method="drone-kfac")
    with pytest.raises(ValueError, match="compress_attention"):
        drone_hf.DroneConfig(method="drone-kfac", compress_attention=True)
    with pytest.raises(ValueError, match=r"damp=0.01 is DRONE's input ridge.*set damp=0 and use kfac_damp"):
        drone_hf.DroneConfig(method="drone-kfac", damp=0.01)


# --- statistics ----------------------------------------------------------------------------------
def test_output_grams_are_the_loss_gradient_grams_and_ignore_padding(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama-gqa-lm", tmp_path / "d")).eval()
    tok = tokenizer()
    layers = {"o": model.model.layers[0].self_attn.o_proj, "down": model.model.layers[1].mlp.down_proj}
    texts = CALIBRATION_TEXTS[:4]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = collect_output_grams(model, layers, tokenize_batches(texts, tok, 64, 4), fisher="empirical")
    padded = stats.observers
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # reference: one text at a time (no padding), the gradient of its summed next-token loss w.r.t.
    # the layer's output, taken with autograd directly
    for name, layer in layers.items():
        ref, count = torch.zeros_like(padded[name].gram), 0
        for t in texts:
            ids = tok([t], return_tensors="pt")["input_ids"]
            seen: dict = {}
            handle = layer.register_forward_hook(lambda mod, a, out, seen=seen: seen.__setitem__("y", out))
            layer.weight.requires_grad_(True)
            try:
                with torch.enable_grad():
                    logits = model(input_ids=ids).logits
                    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                    (g,) = torch.autograd.grad(loss, [seen["y"]])
            finally:
                handle.remove()
                layer.weight.requires_grad_(flags[next(n for n, p in model.named_parameters() if p is layer.weight)])
            g = g[0].to(f64)
            ref += g.T @ g
            count += g.shape[0]
        assert padded[name].num_tokens == count
        # one loss term per predicted token: the scale of the predicted mean-loss increase
        assert stats.loss_terms == count - len(texts)
        assert stats.loss_scale(name) == pytest.approx(1 / (2 * (count - len(texts)) * count))
        # float32 gradients, summed in another order with padding: a relative error δ in each token's
        # gradient moves entry (i, j) by up to 2δ·sqrt(G_ii G_jj) (Cauchy-Schwarz), which dwarfs the
        # small entries of a Gram (an AMD CPU's kernels put one at 1.5e-4 of itself). δ = 5e-6 here; a
        # padding token that leaked in, or a missed mask, moves entries by O(1) of themselves.
        scale = torch.sqrt(torch.outer(ref.diagonal(), ref.diagonal()))
        excess = (padded[name].gram - ref).abs() - (1e-4 * ref.abs() + 1e-5 * scale)
        assert float(excess.max()) <= 0, (name, float(excess.max()))
        assert float(torch.linalg.eigvalsh(padded[name].gram)[0]) > -1e-8 * float(ref.abs().max())


def test_a_model_without_logits_is_refused(tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(save_tiny("bert", tmp_path / "b"))
    with pytest.raises(ValueError, match="method='drone-kfac' needs a loss.*returns no logits"):
        drone_hf.compress(model, method="drone-kfac", dataset=CALIBRATION_TEXTS, tokenizer=tokenizer(),
                          show_progress=False)


# --- end to end ----------------------------------------------------------------------------------
def test_greedy_allocation_uses_the_predicted_loss_and_no_probe(tmp_path, monkeypatch):
    import drone_hf.planner as planner

    def no_probe(*a, **k):
        raise AssertionError("drone-kfac must not probe sensitivities")

    monkeypatch.setattr(planner, "fisher_sensitivities", no_probe)
    monkeypatch.setattr(planner, "probe_sensitivities", no_probe)
    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama-gqa-lm", tmp_path / "d")).eval()
    cfg = drone_hf.DroneConfig(param_ratio=0.6, method="drone-kfac", kfac_damp=0.5, dataset=CALIBRATION_TEXTS * 8,
                               tokenizer=tokenizer(), num_samples=48, max_length=32)
    drone_hf.compress(model, cfg, show_progress=False)
    rec = model.config.quantization_config
    res = rec.allocation_result
    assert res["sensitivity"] == "kfac" and res["predicted_loss_increase"] > 0
    assert res["targeted_param_ratio"] <= 0.6 + 1e-9 and rec.kfac_damp == 0.5
    assert "measured_loss_increase" in res
    model.save_pretrained(tmp_path / "c")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert again.config.quantization_config.kfac_damp == 0.5 and again.config.quantization_config.ranks == rec.ranks


def test_a_sequence_classifier_has_one_loss_term_per_text(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(save_tiny("bert-seq-cls", tmp_path / "c")).eval()
    layer = model.bert.encoder.layer[0].output.dense
    stats = collect_output_grams(model, {"d": layer}, tokenize_batches(CALIBRATION_TEXTS[:6], tokenizer(), 32, 3))
    obs = stats.observers["d"]
    assert stats.loss_terms == 6 and obs.num_tokens > 6  # pseudo-labels: one term per text, gradients per token
    assert stats.loss_scale("d") == pytest.approx(1 / (2 * 6 * obs.num_tokens))
    assert float(obs.gram.trace()) > 0


# --- kfac_fisher="true": labels drawn from the model ---------------------------------------------


def _confident_classifier(tmp_path):
    """The tiny 3-label BERT classifier with its head scaled up, so its predictions are confident and
    the argmax (empirical) and sampled (true) Fisher differ clearly."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(save_tiny("bert-seq-cls", tmp_path / "c")).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    return model


def test_true_fisher_converges_to_the_gauss_newton_curvature(tmp_path):
    """At the logits (the classifier head's output) the true Fisher of one text is ``diag(p) - ppᵀ``:
    the mean of the sampled-label Grams over many seeds reaches it, the argmax Gram does not."""
    model = _confident_classifier(tmp_path)
    data = tokenize_batches(CALIBRATION_TEXTS[:6], tokenizer(), 32, 3)
    head = {"head": model.classifier}
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(**b).logits.double(), -1) for b in data.batches])
    gauss_newton = sum(torch.diag(q) - torch.outer(q, q) for q in p)
    assert float(p.max(-1).values.min()) > 0.6  # confident: the two Fishers must differ
    draws = 400
    mean = sum(collect_output_grams(model, head, data, fisher="true", seed=s).observers["head"].gram
               for s in range(draws)) / draws
    rel = lambda a: float((a - gauss_newton).norm() / gauss_newton.norm())  # noqa: E731
    # 400 draws: blocks of 400 seeds land at 0.005-0.07 from it (sampling error); argmax is 0.72 away
    assert rel(mean) < 0.1
    argmax = collect_output_grams(model, head, data, fisher="empirical").observers["head"].gram
    assert rel(argmax) > 0.5
    # the argmax Gram is the exact Σ (p - e_argmax)(p - e_argmax)ᵀ
    e = torch.nn.functional.one_hot(p.argmax(-1), 3).double()
    torch.testing.assert_close(argmax, (p - e).T @ (p - e), rtol=1e-5, atol=1e-9)


# --- kfac_fisher="exact": the true Fisher's expectation over every class -------------------------


def test_exact_fisher_is_the_gauss_newton_curvature_with_no_sampling_error(tmp_path):
    """At the logits the exact Fisher is ``Σ_x diag(p) - ppᵀ`` to round-off: what the 400-draw mean
    of ``"true"`` above only approaches; one prediction per text, so one term and one row each."""
    model = _confident_classifier(tmp_path)
    data = tokenize_batches(CALIBRATION_TEXTS[:6], tokenizer(), 32, 3)
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(**b).logits.double(), -1) for b in data.batches])
    gauss_newton = sum(torch.diag(q) - torch.outer(q, q) for q in p)
    stats = collect_output_grams(model, {"head": model.classifier}, data, fisher="exact")
    torch.testing.assert_close(stats.observers["head"].gram, gauss_newton, rtol=1e-5, atol=1e-9)
    assert stats.loss_terms == 6 and stats.observers["head"].num_tokens == 6
    assert all(p.grad is None for p in model.parameters())


def test_exact_fisher_inside_the_encoder_matches_a_per_text_autograd_reference(tmp_path):
    """Inside the encoder every token's output gradient comes from its own text's loss: the exact
    Gram over padded batches equals ``Σ_x Σ_c p_c(x) Σ_t g_c,t g_c,tᵀ`` computed text by text, with
    each token counted once (not once per class)."""
    model = _confident_classifier(tmp_path)
    tok = tokenizer()
    texts = CALIBRATION_TEXTS[:5]
    layer = model.bert.encoder.layer[-1].output.dense
    stats = collect_output_grams(model, {"d": layer}, tokenize_batches(texts, tok, 32, 3), fisher="exact")
    seen: dict = {}
    handle = layer.register_forward_hook(lambda mod, a, out: seen.__setitem__("y", out))
    layer.weight.requires_grad_(True)
    reference, tokens = torch.zeros(layer.out_features, layer.out_features, dtype=f64), 0
    try:
        with torch.enable_grad():
            for text in texts:
                ids = tok([text], return_tensors="pt", truncation=True, max_length=32)
                log_p = torch.log_softmax(model(**ids).logits.double(), -1)[0]
                for c in range(log_p.shape[0]):
                    (g,) = torch.autograd.grad(-log_p[c], [seen["y"]], retain_graph=True)
                    g = g[0].double()
                    reference += float(log_p[c].detach().exp()) * g.T @ g
                tokens += int(ids["input_ids"].shape[1])
    finally:
        handle.remove()
        layer.weight.requires_grad_(False)
    torch.testing.assert_close(stats.observers["d"].gram, reference, rtol=2e-3,
                               atol=1e-6 * float(reference.abs().max()))
    assert stats.observers["d"].num_tokens == tokens and stats.loss_terms == len(texts)


def assert_same_ranks_other_factors(first, second) -> None:
    """Two compressions at one uniform budget that differ only in ``kfac_fisher``: a factored layer
    has the same rank in both, and other factors (the Fisher changed what it keeps)."""
    name = next(iter(first.config.quantization_config.ranks))
    a, b = first.base_model.get_submodule(name), second.base_model.get_submodule(name)
    assert a.down.weight.shape == b.down.weight.shape and not torch.allclose(a.down.weight, b.down.weight)


def test_kfac_fisher_exact_compresses_round_trips_and_differs_from_one_draw(tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = save_tiny("bert-seq-cls", tmp_path / "d")
    common = dict(param_ratio=0.5, allocation="uniform", method="drone-kfac", dataset=CALIBRATION_TEXTS * 4,
                  tokenizer=tokenizer(), num_samples=16, max_length=32)
    exact = drone_hf.compress(AutoModelForSequenceClassification.from_pretrained(folder).eval(),
                              drone_hf.DroneConfig(kfac_fisher="exact", **common), show_progress=False)
    drawn = drone_hf.compress(AutoModelForSequenceClassification.from_pretrained(folder).eval(),
                              drone_hf.DroneConfig(kfac_fisher="true", **common), show_progress=False)
    rec = exact.config.quantization_config
    assert rec.kfac_fisher == "exact"
    assert_same_ranks_other_factors(exact, drawn)
    exact.save_pretrained(tmp_path / "c")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c")
    assert again.config.quantization_config.kfac_fisher == "exact"
    ids = tokenizer()(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, exact(**ids).logits)


def test_true_fisher_of_a_causal_lm_uses_the_drawn_next_tokens(tmp_path):
    """For a causal LM, ``fisher="true"`` replaces each next token by a draw from the model: the Gram
    is exactly that of the gradients of the summed loss at the drawn tokens (autograd reference);
    the same seed draws the same labels, another seed others."""
    from drone_hf.calibration.fisher import _sampled
    from drone_hf.calibration.output_gradients import _batch_seed

    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama-gqa-lm", tmp_path / "d")).eval()
    data = tokenize_batches(CALIBRATION_TEXTS[:4], tokenizer(), 32, 4)
    layer = model.model.layers[-1].mlp.down_proj
    target = {"down": layer}
    gram = collect_output_grams(model, target, data, fisher="true", seed=7).observers["down"].gram
    (batch,) = data.batches
    seen: dict = {}
    handle = layer.register_forward_hook(lambda mod, a, out: seen.__setitem__("y", out))
    layer.weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(**batch).logits.float()
            mask = batch["attention_mask"].bool()
            keep = mask[:, 1:] & mask[:, :-1]
            pred = logits[:, :-1][keep]
            drawn = _sampled(pred, _batch_seed(7, 0))
            loss = torch.nn.functional.cross_entropy(pred, drawn, reduction="sum")
            (g,) = torch.autograd.grad(loss, [seen["y"]])
    finally:
        handle.remove()
        layer.weight.requires_grad_(False)
    assert not torch.equal(drawn, batch["input_ids"][:, 1:][keep])  # not the data's next tokens
    g = g[mask].double()
    torch.testing.assert_close(gram, g.T @ g, rtol=1e-4, atol=1e-9 * float((g.T @ g).abs().max()))
    again = collect_output_grams(model, target, data, fisher="true", seed=7).observers["down"].gram
    other = collect_output_grams(model, target, data, fisher="true", seed=8).observers["down"].gram
    empirical = collect_output_grams(model, target, data, fisher="empirical").observers["down"].gram
    assert torch.equal(gram, again) and not torch.allclose(gram, other) and not torch.allclose(gram, empirical)


def test_kfac_fisher_true_compresses_and_round_trips(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama-gqa-lm", tmp_path / "d")).eval()
    common = dict(param_ratio=0.5, allocation="uniform", method="drone-kfac", dataset=CALIBRATION_TEXTS * 4,
                  tokenizer=tokenizer(), num_samples=16, max_length=32)
    true = drone_hf.compress(model, drone_hf.DroneConfig(**common), show_progress=False)  # the default
    empirical = drone_hf.compress(AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval(),
                                  drone_hf.DroneConfig(kfac_fisher="empirical", **common), show_progress=False)
    rec = true.config.quantization_config
    assert rec.kfac_fisher == "true" and empirical.config.quantization_config.kfac_fisher == "empirical"
    assert_same_ranks_other_factors(true, empirical)
    true.save_pretrained(tmp_path / "c")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert again.config.quantization_config.kfac_fisher == "true"
    empirical.save_pretrained(tmp_path / "e")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "e").config.quantization_config.kfac_fisher == "empirical"
    ids = tokenizer()(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, true(**ids).logits)


def test_a_record_written_before_kfac_fisher_existed_reads_back_as_empirical(tmp_path):
    """The default changed to the true Fisher after checkpoints that never named it were written
    with the empirical one: such a record (a checkpoint's quantization_config) must keep saying
    what made it, while a fresh config without the key takes the default."""
    model = AutoModelForCausalLM.from_pretrained(save_tiny("llama-gqa-lm", tmp_path / "d")).eval()
    drone_hf.compress(model, drone_hf.DroneConfig(param_ratio=0.5, allocation="uniform", method="drone-kfac",
                                                  kfac_fisher="empirical", dataset=CALIBRATION_TEXTS * 4,
                                                  tokenizer=tokenizer(), num_samples=16, max_length=32),
                      show_progress=False)
    model.save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization_config"].pop("kfac_fisher") == "empirical"
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert again.config.quantization_config.kfac_fisher == "empirical"
    assert drone_hf.DroneConfig.from_dict({"method": "drone-kfac"}).kfac_fisher == "true"
    assert drone_hf.DroneConfig(method="drone-kfac").kfac_fisher == "true"
