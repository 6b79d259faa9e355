"""Peer methods (ASVD, FWSVD, SVD-LLM): their defining math, DRONE's optimality over them, and the
end-to-end compress -> save -> reload path for every method."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import drone_hf
from drone_hf.calibration.activation_stats import collect_abs_means
from drone_hf.calibration.data import tokenize_batches
from drone_hf.calibration.fisher import collect_row_fisher
from drone_hf.solver import METHODS, CholeskyError, decompose, decompose_peer
from drone_hf.solver.peers import decompose_asvd, decompose_fwsvd, decompose_svdllm, pair_squared_errors
from tests.tiny_models import CALIBRATION_TEXTS, save_tiny, tokenizer

f64 = torch.float64


def problem(m: int = 12, n: int = 10, tokens: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=f64)
    # correlated, unevenly scaled inputs so data-awareness matters
    x = torch.randn(n, tokens, generator=g, dtype=f64) * torch.logspace(0, 1.5, n, dtype=f64)[:, None]
    x = torch.randn(n, n, generator=g, dtype=f64) @ x
    return w, x


def true_error(w, fact, x) -> float:
    return float(((w - fact.up @ fact.down) @ x).norm())


def test_methods_list_has_every_peer():
    assert METHODS == ("drone", "svd", "asvd", "fwsvd", "svdllm", "drone-kfac")


# --- ASVD ------------------------------------------------------------------------------------
def test_asvd_equals_svd_when_activations_are_uniform():
    w, x = problem()
    g = x @ x.T
    svd = decompose(w, g, method="svd")
    asvd = decompose_asvd(w, g, torch.full((w.shape[1],), 3.7, dtype=f64))
    for k in (1, 4, 9):
        torch.testing.assert_close(asvd.factors(k).up @ asvd.factors(k).down, svd.factors(k).up @ svd.factors(k).down)
    torch.testing.assert_close(asvd.relative_errors(), svd.relative_errors())


def test_asvd_is_the_published_map_back_and_scale_invariant():
    w, x = problem()
    g = x @ x.T
    s = x.abs().mean(dim=1)
    dec = decompose_asvd(w, g, s, alpha=0.5)
    scale = s.sqrt()
    u, sig, vh = torch.linalg.svd(w * scale, full_matrices=False)
    k = 4
    published = (u[:, :k] * sig[:k]) @ vh[:k] / scale  # U_k Σ_k P_kᵀ S⁻¹
    f = dec.factors(k)
    torch.testing.assert_close(f.up @ f.down, published, rtol=1e-9, atol=1e-10)
    assert f.relative_error == pytest.approx(true_error(w, f, x) / float((w @ x).norm()), rel=1e-9)
    # scaling every activation by a constant changes nothing
    again = decompose_asvd(w, g * 49.0, s * 7.0, alpha=0.5).factors(k)
    torch.testing.assert_close(again.up @ again.down, f.up @ f.down, rtol=1e-9, atol=1e-10)
    # alpha = 0 is plain SVD; alpha changes the result otherwise
    zero = decompose_asvd(w, g, s, alpha=0.0).factors(k)
    svd = decompose(w, g, method="svd").factors(k)
    torch.testing.assert_close(zero.up @ zero.down, svd.up @ svd.down)
    other = decompose_asvd(w, g, s, alpha=1.0).factors(k)
    assert not torch.allclose(other.up @ other.down, f.up @ f.down)


def test_asvd_dead_channel_is_finite():
    w, x = problem()
    x[3] = 0.0
    dec = decompose_asvd(w, x @ x.T, x.abs().mean(dim=1))
    f = dec.factors(3)
    assert bool(torch.isfinite(f.up).all() and torch.isfinite(f.down).all())


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), True, "0.5"])
def test_asvd_bad_alpha(alpha):
    w, x = problem()
    with pytest.raises(ValueError, match="asvd_alpha"):
        decompose_asvd(w, x @ x.T, x.abs().mean(1), alpha=alpha)
    with pytest.raises(ValueError, match="asvd_alpha"):
        drone_hf.DroneConfig(method="asvd", asvd_alpha=alpha)


# --- FWSVD -----------------------------------------------------------------------------------
def test_fwsvd_equals_svd_with_uniform_fisher():
    w, x = problem()
    g = x @ x.T
    svd = decompose(w, g, method="svd")
    fw = decompose_fwsvd(w, g, torch.full((w.shape[0],), 0.3, dtype=f64))
    for k in (1, 5, 10):
        a, b = fw.factors(k), svd.factors(k)
        torch.testing.assert_close(a.up @ a.down, b.up @ b.down, rtol=1e-9, atol=1e-10)
        assert a.relative_error == pytest.approx(b.relative_error, rel=1e-8, abs=1e-12)


def test_fwsvd_is_the_weighted_optimum():
    w, x = problem()
    fisher = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(1), dtype=f64) + 0.01
    dec = decompose_fwsvd(w, x @ x.T, fisher)
    d = fisher.sqrt()[:, None]
    k = 4
    f = dec.factors(k)
    # weighted error equals the tail of the weighted spectrum: Eckart-Young on D W
    sig = torch.linalg.svdvals(d * w)
    assert float((d * (w - f.up @ f.down)).norm() ** 2) == pytest.approx(float((sig[k:] ** 2).sum()), rel=1e-9)
    # published map-back D⁻¹ U_k Σ_k P_kᵀ
    u, s, vh = torch.linalg.svd(d * w, full_matrices=False)
    torch.testing.assert_close(f.up @ f.down, ((u[:, :k] * s[:k]) @ vh[:k]) / d, rtol=1e-9, atol=1e-10)
    # the recorded error is the true calibration error of the factors
    for r in range(1, dec.max_rank + 1):
        fr = dec.factors(r)
        assert fr.relative_error == pytest.approx(true_error(w, fr, x) / float((w @ x).norm()), rel=1e-6, abs=1e-9)


def test_fwsvd_zero_fisher_is_svd_and_bad_input_is_refused():
    w, x = problem()
    zero = decompose_fwsvd(w, None, torch.zeros(w.shape[0])).factors(3)
    svd = decompose(w, None, method="svd").factors(3)
    torch.testing.assert_close(zero.up @ zero.down, svd.up @ svd.down, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="row_fisher has 5 rows"):
        decompose_fwsvd(w, None, torch.ones(5))
    with pytest.raises(ValueError, match=">= 0"):
        decompose_fwsvd(w, None, -torch.ones(w.shape[0]))


# --- SVD-LLM ---------------------------------------------------------------------------------
def test_svdllm_equals_drone_on_full_rank_gram():
    w, x = problem()
    g = x @ x.T
    drone, llm = decompose(w, g), decompose_svdllm(w, g)
    torch.testing.assert_close(llm.relative_errors(), drone.relative_errors(), rtol=1e-6, atol=1e-9)
    for k in (1, 5, 10):
        a, b = llm.factors(k), drone.factors(k)
        torch.testing.assert_close(a.up @ a.down, b.up @ b.down, rtol=1e-6, atol=1e-8)


def test_svdllm_fails_loudly_on_rank_deficient_gram():
    w, x = problem(tokens=6)  # 6 tokens for 10 inputs: Gram rank 6
    with pytest.raises(CholeskyError, match=r"layer 'encoder.q'.*numerical rank 6 of 10.*method='drone'"):
        decompose_svdllm(w, x @ x.T, name="encoder.q")
    # a dead channel: an exact zero row/column
    w, x = problem()
    x[2] = 0.0
    with pytest.raises(CholeskyError, match="not positive definite"):
        decompose_peer("svdllm", w, x @ x.T, name="l")
    # drone handles the same statistics
    assert decompose(w, x @ x.T).factors(3).relative_error is not None


# --- shared properties -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_method_beats_drone_on_calibration_objective(seed):
    w, x = problem(seed=seed)
    g = x @ x.T
    stats = {"abs_mean": x.abs().mean(1), "row_fisher": torch.rand(w.shape[0], dtype=f64) + 0.1}
    best = decompose(w, g)
    decs = {"svd": decompose(w, g, method="svd")} | {
        m: decompose_peer(m, w, g, **stats) for m in ("asvd", "fwsvd", "svdllm")
    }
    for k in range(1, 10):
        opt = true_error(w, best.factors(k), x)
        for m, dec in decs.items():
            f = dec.factors(k)
            err = true_error(w, f, x)
            assert err >= opt * (1 - 1e-9), (m, k)
            assert f.relative_error == pytest.approx(err / float((w @ x).norm()), rel=1e-6, abs=1e-9), (m, k)


def test_pair_errors_match_direct_computation():
    w, x = problem()
    a, b = torch.randn(12, 5, dtype=f64), torch.randn(5, 10, dtype=f64)
    lam, vec = torch.linalg.eigh(x @ x.T)
    root = vec * lam.clamp_min(0).sqrt()
    sq = pair_squared_errors(w, root, a, b)
    for k in range(6):
        direct = float(((w - a[:, :k] @ b[:k]) @ x).norm() ** 2)
        assert float(sq[k]) == pytest.approx(direct, rel=1e-9)


def test_peer_needs_its_statistics():
    w, x = problem()
    with pytest.raises(ValueError, match="mean absolute input activations of layer 'a'"):
        decompose_peer("asvd", w, x @ x.T, name="a")
    with pytest.raises(ValueError, match="row Fisher"):
        decompose_peer("fwsvd", w, x @ x.T, name="a")
    with pytest.raises(ValueError, match="decompose_peer"):
        decompose(w, x @ x.T, method="asvd")


# --- statistics --------------------------------------------------------------------------------
def test_abs_means_mask_padding_and_fisher_has_rows(tmp_path):
    path = save_tiny("llama-gqa-lm", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = tokenizer()
    layer = model.model.layers[0].mlp.down_proj
    padded = tokenize_batches(CALIBRATION_TEXTS[:4], tok, 64, 4)  # one padded batch
    single = [tokenize_batches([t], tok, 64, 1) for t in CALIBRATION_TEXTS[:4]]  # no padding
    obs = collect_abs_means(model, {"d": layer}, padded)["d"]
    total = sum(collect_abs_means(model, {"d": layer}, s)["d"].abs_sum for s in single)
    count = sum(collect_abs_means(model, {"d": layer}, s)["d"].num_tokens for s in single)
    assert obs.num_tokens == count
    torch.testing.assert_close(obs.abs_sum, total, rtol=1e-5, atol=1e-6)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = collect_row_fisher(model, {"d": layer}, padded)["d"]
    assert fisher.shape == (layer.weight.shape[0],) and float(fisher.min()) >= 0 and float(fisher.sum()) > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_fisher_refuses_a_model_without_logits(tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(save_tiny("bert", tmp_path / "b"))
    with pytest.raises(ValueError, match="returns no logits"):
        drone_hf.compress(model, method="fwsvd", dataset=CALIBRATION_TEXTS, tokenizer=tokenizer(), show_progress=False)


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, method", [("llama-gqa-lm", m) for m in METHODS] + [("gpt2-lm", "asvd"), ("gpt2-lm", "fwsvd")]
)  # GPT-2's Conv1D stores [in, out]: the per-channel statistics must follow
def test_compress_save_reload_every_method(tmp_path, method, arch):
    path = save_tiny(arch, tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = drone_hf.DroneConfig(param_ratio=0.5, method=method, dataset=CALIBRATION_TEXTS * 8, tokenizer=tokenizer(),
                               num_samples=64, max_length=32, asvd_alpha=0.5)
    drone_hf.compress(model, cfg, show_progress=False)
    rec = model.config.quantization_config
    assert rec.method == method and rec.ranks
    assert all(e is not None and 0 <= e <= 1 + 1e-9 for e in rec.relative_errors.values())
    ids = tokenizer()(["The union is strong."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "c")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert again.config.quantization_config.method == method
    assert again.config.quantization_config.ranks == rec.ranks
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, out)
    assert math.isfinite(float(out.abs().max()))


def test_svdllm_failure_names_the_layer_and_leaves_the_model_dense(tmp_path):
    # A freshly initialised GPT-2 has LayerNorm gains 1 and biases 0: the LayerNorm outputs are centred,
    # so the Gram of c_attn's input has rank n - 1. SVD-LLM must refuse, naming the layer; DRONE copes.
    # Which rank-deficient layer's Cholesky fails first depends on round-off (c_attn's rank-31-of-32 Gram
    # factorises on some BLAS kernels, and then mlp.c_proj's is the one named), so any layer is accepted.
    from drone_hf.modules.low_rank_linear import DroneLinear

    path = save_tiny("gpt2-lm", tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = drone_hf.DroneConfig(param_ratio=0.5, method="svdllm", dataset=CALIBRATION_TEXTS * 8,
                               tokenizer=tokenizer(), num_samples=64, max_length=32)
    refusal = r"layer '([\w.]+)'.*numerical rank (\d+) of (\d+)"
    with pytest.raises(CholeskyError, match=refusal) as err:
        drone_hf.compress(model, cfg, show_progress=False)
    layer, rank, size = re.search(refusal, str(err.value)).groups()
    named = [m for name, m in model.named_modules() if name.endswith("." + layer)]  # under model.transformer
    assert len(named) == 1 and int(rank) < int(size) == named[0].weight.shape[0]  # Conv1D: [in, out]
    assert not any(isinstance(m, DroneLinear) for m in model.modules())
    drone_hf.compress(model, cfg, method="drone", show_progress=False)


def test_cli_and_model_card_know_every_method():
    from drone_hf.cli import _build_parser
    from drone_hf.hub.card import _METHOD_NAMES

    args = _build_parser().parse_args(["compress", "--method", "svdllm"])
    assert args.method == "svdllm"
    compress = next(a for a in _build_parser()._subparsers._group_actions[0].choices["compress"]._actions
                    if a.dest == "method")
    assert tuple(compress.choices) == METHODS
    assert set(_METHOD_NAMES) == set(METHODS)


def test_peer_methods_through_from_pretrained_and_sequential(tmp_path):
    # the quantizer path (statistics inside from_pretrained) and layer-sequential mode, where the
    # peers' statistics stay those of the dense model and the Gram follows the compressed blocks
    path = save_tiny("llama-gqa-lm", tmp_path / "dense")
    common = dict(param_ratio=0.5, dataset=CALIBRATION_TEXTS * 4, num_samples=32, max_length=32)
    model = AutoModelForCausalLM.from_pretrained(path, drone_config=drone_hf.DroneConfig(method="fwsvd", **common))
    assert model.config.quantization_config.method == "fwsvd" and model.config.quantization_config.ranks
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    drone_hf.compress(model, drone_hf.DroneConfig(method="asvd", asvd_alpha=1.0, sequential=True, tokenizer=tokenizer(),
                                                  **common), show_progress=False)
    rec = model.config.quantization_config
    assert rec.method == "asvd" and rec.asvd_alpha == 1.0 and rec.allocation_result.get("sequential") is True
