"""The solver on numerically hostile statistics, checked against independent linear algebra.

Reference everywhere: the stored activations ``X`` [n, T] in float64 and Eckart-Young on ``W X``:
no rank-k ``W'`` can do better than ``sqrt(Σ_{j>k} σ_j(W X)²)``, and the truncated SVD of ``W X``
reaches it. The solver only ever sees the Gram ``X Xᵀ``; it must reach the same number.
"""

from __future__ import annotations

import math

import pytest
import torch
from eckart_young import optimum, reachable_optimum, unseen_part
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drone_hf.calibration.observer import GramObserver
from drone_hf.solver import decompose, decompose_output_gram
from drone_hf.solver.numerics import EIGEN_TOL

f64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def achieved(w: torch.Tensor, x: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> float:
    f = decompose(w, x @ x.T if gram is None else gram).factors(rank)
    return float(torch.linalg.matrix_norm((w - f.up @ f.down) @ x))


problems = st.tuples(
    st.integers(2, 10),  # m
    st.integers(2, 10),  # n
    st.integers(1, 24),  # tokens
    st.integers(0, 10_000),  # seed
)


@SETTINGS
@given(problems)
@example((2, 8, 8, 7995))  # a near-singular X: one direction below the cut-off
def test_property_optimal_at_every_rank(p) -> None:
    m, n, t, seed = p
    w, x = rand(m, n, seed=seed), rand(n, t, seed=seed + 1)
    scale = float(torch.linalg.matrix_norm(w @ x))
    for k in range(1, min(m, n) + 1):
        assert abs(achieved(w, x, k) - reachable_optimum(w, x, k)) <= 1e-7 * scale + 1e-12
    # the cut-off costs at most ||W||₂ · sqrt(Σ dropped λ) <= ||W||₂ · sqrt(n · EIGEN_TOL · λ_max)
    lam_max = float(torch.linalg.eigvalsh(x @ x.T).max())
    bound = float(torch.linalg.matrix_norm(w, 2)) * math.sqrt(n * EIGEN_TOL * lam_max)
    assert reachable_optimum(w, x, 1) - optimum(w, x, 1) <= bound + 1e-12


@SETTINGS
@given(problems)
@example((2, 8, 8, 7995))
def test_property_error_monotone_and_exact_at_full_rank(p) -> None:
    m, n, t, seed = p
    w, x = rand(m, n, seed=seed), rand(n, t, seed=seed + 1)
    d = decompose(w, x @ x.T)
    errors = d.relative_errors()
    assert errors is not None
    assert all(float(errors[i + 1]) <= float(errors[i]) + 1e-12 for i in range(len(errors) - 1))
    full = d.factors(min(m, n))  # full rank: W X reproduced exactly on the seen part of the data
    seen = x - unseen_part(x)
    atol = 1e-8 * float(torch.linalg.matrix_norm(w @ x)) + 1e-12
    assert torch.allclose(full.up @ full.down @ x, w @ seen, atol=atol)
    assert float(errors[-1]) <= 1e-7


@SETTINGS
@given(problems, st.floats(1e-6, 1e6), st.floats(1e-3, 1e3))
def test_property_invariant_to_scaling_the_inputs(p, s_x, s_w) -> None:
    """Scaling X by s changes no factor and no relative error; scaling W scales the product."""
    m, n, t, seed = p
    w, x = rand(m, n, seed=seed), rand(n, t, seed=seed + 1)
    k = max(1, min(m, n) // 2)
    base = decompose(w, x @ x.T)
    scaled = decompose(w * s_w, (s_x * x) @ (s_x * x).T)
    f0, f1 = base.factors(k), scaled.factors(k)
    assert f1.rank == f0.rank
    ref = f0.up @ f0.down
    assert torch.allclose(f1.up @ f1.down, s_w * ref, rtol=1e-6, atol=1e-9 * s_w * float(ref.abs().max()) + 1e-300)
    assert math.isclose(f1.relative_error, f0.relative_error, rel_tol=1e-6, abs_tol=1e-9)


# --- hostile statistics -------------------------------------------------------------------------
def duplicated_features() -> tuple[torch.Tensor, torch.Tensor]:
    w, x = rand(12, 10, seed=1), rand(10, 64, seed=2)
    x[5:] = x[:5]  # every feature twice: the Gram has rank 5
    return w, x


def dynamic_range_1e12() -> tuple[torch.Tensor, torch.Tensor]:
    w, x = rand(12, 10, seed=3), rand(10, 64, seed=4)
    x *= torch.logspace(0, 12, 10, dtype=f64)[:, None]  # feature scales from 1 to 1e12
    return w, x


def constant_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    w = rand(12, 10, seed=5)
    return w, rand(10, 1, seed=6).repeat(1, 40)  # every token the same: W X has rank 1


def constant_feature() -> tuple[torch.Tensor, torch.Tensor]:
    w, x = rand(12, 10, seed=7), rand(10, 64, seed=8)
    x[0] = 1.0  # a feature that never changes (a bias-like input)
    return w, x


def llm_outliers() -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-like activations: a few channels ~100x larger on most tokens, heavy tails elsewhere."""
    g = torch.Generator().manual_seed(9)
    w = rand(16, 24, seed=10)
    x = torch.distributions.StudentT(3.0).sample((24, 200)).to(f64)
    x[[3, 17]] *= 100.0
    x[:, torch.randperm(200, generator=g)[:5]] *= 50.0  # a few outlier tokens
    return w, x


def rank_deficient_few_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    return rand(12, 16, seed=11), rand(16, 4, seed=12)  # 4 tokens for 16 features


HOSTILE = {
    "duplicated-features": duplicated_features,
    "dynamic-range-1e12": dynamic_range_1e12,
    "constant-tokens": constant_tokens,
    "constant-feature": constant_feature,
    "llm-outliers": llm_outliers,
    "rank-deficient": rank_deficient_few_tokens,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_statistics_still_reach_the_optimum(name: str) -> None:
    w, x = HOSTILE[name]()
    d = decompose(w, x @ x.T)
    total = float(torch.linalg.matrix_norm(w @ x))
    # Optimal up to the directions dropped as unseen (λ < EIGEN_TOL·λ_max), which only a Gram with a
    # dynamic range beyond 1e10 has: their share of ||W X|| is ~sqrt(EIGEN_TOL) at most.
    tol = 10 * math.sqrt(EIGEN_TOL) if name == "dynamic-range-1e12" else 1e-7
    for k in range(1, min(w.shape) + 1):
        f = d.factors(k)
        assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
        assert f.rank <= d.max_rank or d.max_rank == 0
        err = float(torch.linalg.matrix_norm((w - f.up @ f.down) @ x))
        assert abs(err - optimum(w, x, k)) <= tol * total, (k, err, optimum(w, x, k))
        assert abs(f.relative_error - err / total) <= tol  # the reported error is the real one


@pytest.mark.parametrize("name", list(HOSTILE))
def test_output_gram_form_agrees_on_hostile_statistics(name: str) -> None:
    w, x = HOSTILE[name]()
    y = w @ x
    d = decompose_output_gram(w, y @ y.T)
    total = float(torch.linalg.matrix_norm(y))
    for k in (1, min(w.shape)):
        f = d.factors(k)
        err = float(torch.linalg.matrix_norm((w - f.up @ f.down) @ x))
        assert abs(err - optimum(w, x, k)) <= 1e-6 * total


def test_rank_is_clamped_to_what_the_statistics_span() -> None:
    w, x = duplicated_features()
    assert decompose(w, x @ x.T).factors(9).rank == 5
    w, x = constant_tokens()
    assert decompose(w, x @ x.T).factors(8).rank == 1


def test_outliers_data_aware_beats_plain_svd_on_the_data() -> None:
    w, x = llm_outliers()
    for k in (2, 4, 8):
        drone = decompose(w, x @ x.T).factors(k)
        svd = decompose(w, x @ x.T, method="svd").factors(k)
        assert drone.relative_error <= svd.relative_error + 1e-12
    assert (
        decompose(w, x @ x.T).factors(4).relative_error
        < 0.5 * decompose(w, x @ x.T, method="svd").factors(4).relative_error
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_activations_name_layer_and_batch(bad: float) -> None:
    obs = GramObserver(4, name="encoder.layer.3.output.dense")
    good = torch.randn(5, 4)
    obs.add(GramObserver.batch_product(good), 5, batch_index=0, token_sum=GramObserver.batch_sum(good))
    before = obs.gram.clone()
    tokens = torch.randn(5, 4)
    tokens[2, 1] = bad
    with pytest.raises(ValueError, match=r"layer 'encoder\.layer\.3\.output\.dense' in calibration batch 7"):
        obs.add(GramObserver.batch_product(tokens), 5, batch_index=7, token_sum=GramObserver.batch_sum(tokens))
    assert torch.equal(obs.gram, before) and obs.num_tokens == 5  # the bad batch was not added


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gram_is_refused_by_the_solver(bad: float) -> None:
    w, x = rand(4, 4, seed=0), rand(4, 8, seed=1)
    g = x @ x.T
    g[1, 2] = bad
    with pytest.raises(ValueError, match=r"gram contains 1 non-finite value.*load with dtype=torch\.float32"):
        decompose(w, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_accumulate_without_overflow(dtype: torch.dtype) -> None:
    """x up to 1000 in fp16: x² (1e6) overflows fp16 (max 65504) but never reaches it here."""
    x = (torch.rand(64, 8, generator=torch.Generator().manual_seed(0), dtype=f64) * 2000 - 1000).to(dtype)
    obs = GramObserver(8, name="layer")
    for chunk in x.split(16):
        obs.add(GramObserver.batch_product(chunk), chunk.shape[0], token_sum=GramObserver.batch_sum(chunk))
    ref = x.to(f64).T @ x.to(f64)
    assert obs.gram.dtype == f64 and torch.isfinite(obs.gram).all()
    assert torch.allclose(obs.gram, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))  # float32 products
