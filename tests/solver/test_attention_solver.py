"""Query-key (attention) solver against independent linear algebra on stored activations.

Every check builds the calibration tokens ``X`` explicitly, forms the full ``N x N`` score matrix of
each head and compares with its own SVD (Eckart-Young), never with the solver's internals.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drone_hf.solver.attention import QKDecomposition, augmented_gram, decompose_qk

f64 = torch.float64


def rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=f64)


def problem(n: int, heads: int, d: int, tokens: int, seed: int = 0):
    """Query/key weights and biases ([H·d, n], [H·d]) and correlated, off-centre inputs X [n, N]."""
    scale = torch.linspace(0.2, 3.0, n, dtype=f64)[:, None]
    x = rand(n, tokens, seed=seed) * scale + 0.7 * rand(n, 1, seed=seed + 1)
    return (
        rand(heads * d, n, seed=seed + 2), rand(heads * d, seed=seed + 3),
        rand(heads * d, n, seed=seed + 4), rand(heads * d, seed=seed + 5), x,
    )


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return augmented_gram(x @ x.T, x.sum(dim=1), x.shape[1])


def head_scores(w: torch.Tensor, b: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, x: torch.Tensor, heads: int):
    """[H, N, N] raw scores q_iᵀ k_j of every head (no 1/sqrt(d): it scales both sides alike)."""
    q = (w @ x + b[:, None]).reshape(heads, -1, x.shape[1])
    k = (w2 @ x + b2[:, None]).reshape(heads, -1, x.shape[1])
    return q.transpose(1, 2) @ k


def optimum(scores: torch.Tensor, k: int) -> float:
    """Σ_h Σ_{j>k} σ_j(S_h)²: the best rank-k score error, from the dense N x N matrices."""
    return sum(float(torch.linalg.svdvals(s)[k:].pow(2).sum()) for s in scores)


def assert_close(actual: float, expected: float, rel: float, floor: float = 0.0) -> None:
    assert abs(actual - expected) <= rel * abs(expected) + floor, (actual, expected)


# --------------------------------------------------------------------------------------------------
# the augmented Gram
# --------------------------------------------------------------------------------------------------
def test_augmented_gram_is_the_gram_of_x_with_a_one_appended() -> None:
    x = rand(5, 9, seed=1)
    xt = torch.cat([x, torch.ones(1, 9, dtype=f64)])
    torch.testing.assert_close(gram_of(x), xt @ xt.T, rtol=1e-14, atol=1e-12)


def test_augmented_gram_rejects_misfits() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        augmented_gram(torch.eye(3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="num_tokens"):
        augmented_gram(torch.eye(3), torch.zeros(3), -1)


# --------------------------------------------------------------------------------------------------
# optimality
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_score_error_on_calibration_data_is_the_eckart_young_optimum(k: int) -> None:
    heads, d = 3, 6
    wq, bq, wk, bk, x = problem(n=10, heads=heads, d=d, tokens=40, seed=k)
    proj = decompose_qk(wq, bq, wk, bk, heads, gram_of(x)).projections(k)
    assert proj.rank == k and proj.query_weight.shape == (heads * k, 10) and proj.key_bias.shape == (heads * k,)
    dense = head_scores(wq, bq, wk, bk, x, heads)
    approx = head_scores(proj.query_weight, proj.query_bias, proj.key_weight, proj.key_bias, x, heads)
    err2 = float((dense - approx).pow(2).sum())
    best = optimum(dense, k)
    assert best > 0
    assert_close(err2, best, 1e-8)
    assert_close(proj.relative_error, math.sqrt(best / float(dense.pow(2).sum())), 1e-8)


def test_full_head_width_reproduces_the_scores_everywhere() -> None:
    heads, d = 2, 4
    wq, bq, wk, bk, x = problem(n=7, heads=heads, d=d, tokens=30, seed=11)
    proj = decompose_qk(wq, bq, wk, bk, heads, gram_of(x)).projections(d)
    assert proj.relative_error < 1e-12
    fresh = rand(7, 13, seed=99) * 5  # the data span is full, so unseen inputs are reproduced too
    torch.testing.assert_close(
        head_scores(proj.query_weight, proj.query_bias, proj.key_weight, proj.key_bias, fresh, heads),
        head_scores(wq, bq, wk, bk, fresh, heads),
        rtol=1e-9, atol=1e-9,
    )


def test_error_records_equal_the_discarded_singular_values() -> None:
    heads, d = 3, 5
    wq, bq, wk, bk, x = problem(n=9, heads=heads, d=d, tokens=25, seed=3)
    dec = decompose_qk(wq, bq, wk, bk, heads, gram_of(x))
    dense = head_scores(wq, bq, wk, bk, x, heads)
    for h in range(heads):  # σ(C_h) are the singular values of the N x N score matrix itself
        torch.testing.assert_close(dec.singular_values[h], torch.linalg.svdvals(dense[h])[:d], rtol=1e-9, atol=1e-9)
    for k in range(d + 1):
        tails = dec.singular_values[:, k:].pow(2).sum(dim=1)
        torch.testing.assert_close(dec.head_squared_errors(k), tails, rtol=1e-7, atol=1e-9 * float(dense.pow(2).sum()))
    rel = dec.relative_errors()
    assert rel.shape == (d + 1,) and abs(float(rel[0]) - 1.0) < 1e-12 and float(rel[-1]) < 1e-7
    assert all(float(a) >= float(b) - 1e-12 for a, b in zip(rel[:-1], rel[1:], strict=True))


def test_factors_are_balanced_on_the_data() -> None:
    heads, d, k = 2, 5, 3
    wq, bq, wk, bk, x = problem(n=8, heads=heads, d=d, tokens=30, seed=5)
    dec = decompose_qk(wq, bq, wk, bk, heads, gram_of(x))
    p = dec.projections(k)
    q = (p.query_weight @ x + p.query_bias[:, None]).reshape(heads, k, -1)
    kk = (p.key_weight @ x + p.key_bias[:, None]).reshape(heads, k, -1)
    torch.testing.assert_close(q.norm(dim=2), kk.norm(dim=2), rtol=1e-8, atol=0)
    torch.testing.assert_close(q.norm(dim=2), dec.singular_values[:, :k].sqrt(), rtol=1e-8, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 9), heads=st.integers(1, 3), d=st.integers(1, 5), tokens=st.integers(2, 30),
    seed=st.integers(0, 10_000), data=st.data(),
)
def test_optimal_for_any_shape_including_rank_deficient_data(n, heads, d, tokens, seed, data) -> None:
    k = data.draw(st.integers(1, d))
    wq, bq, wk, bk, x = problem(n, heads, d, tokens, seed)
    dec = decompose_qk(wq, bq, wk, bk, heads, gram_of(x))
    p = dec.projections(k)
    dense = head_scores(wq, bq, wk, bk, x, heads)
    approx = head_scores(p.query_weight, p.query_bias, p.key_weight, p.key_bias, x, heads)
    total = float(dense.pow(2).sum())
    assert_close(float((dense - approx).pow(2).sum()), optimum(dense, p.rank), 1e-6, 1e-9 * total)
    assert p.rank <= k and p.rank >= 1


def test_rank_is_clamped_to_what_calibration_can_tell_apart() -> None:
    heads, d = 2, 6
    wq, bq, wk, bk, x = problem(n=10, heads=heads, d=d, tokens=3, seed=8)  # 3 tokens: scores have rank <= 3
    dec = decompose_qk(wq, bq, wk, bk, heads, gram_of(x))
    assert dec.head_ranks == (3, 3) and dec.max_rank == 3
    p = dec.projections(6)
    assert p.rank == 3 and p.relative_error < 1e-7


def test_a_head_without_signal_gets_zero_rows_and_no_nan() -> None:
    heads, d = 2, 3
    wq, bq, wk, bk, x = problem(n=6, heads=heads, d=d, tokens=20, seed=9)
    wq[:d], bq[:d] = 0.0, 0.0  # head 0 has all-zero queries
    dec = decompose_qk(wq, bq, wk, bk, heads, gram_of(x))
    assert dec.head_ranks[0] == 0 and dec.head_ranks[1] == d
    p = dec.projections(2)
    assert torch.isfinite(p.query_weight).all() and torch.isfinite(p.key_weight).all()
    assert float(p.query_weight[:2].abs().max()) == 0.0


# --------------------------------------------------------------------------------------------------
# baselines and ridge
# --------------------------------------------------------------------------------------------------
def test_svd_method_is_the_truncated_svd_of_each_head_form() -> None:
    heads, d, k = 2, 4, 2
    wq, bq, wk, bk, x = problem(n=6, heads=heads, d=d, tokens=20, seed=12)
    p = decompose_qk(wq, bq, wk, bk, heads, method="svd").projections(k)
    assert p.relative_error is None  # no data given
    def aug(w: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:  # [H, width, n+1] heads of W̃
        return torch.cat([w, b[:, None]], dim=1).reshape(heads, width, -1)

    pq, pk = aug(p.query_weight, p.query_bias, k), aug(p.key_weight, p.key_bias, k)
    m = aug(wq, bq, d).transpose(1, 2) @ aug(wk, bk, d)
    approx = pq.transpose(1, 2) @ pk
    for h in range(heads):
        u, s, vh = torch.linalg.svd(m[h])
        torch.testing.assert_close(approx[h], u[:, :k] @ torch.diag(s[:k]) @ vh[:k], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [1, 3])
def test_drone_never_loses_to_svd_on_calibration_data(k: int) -> None:
    wq, bq, wk, bk, x = problem(n=8, heads=2, d=4, tokens=30, seed=13)
    g = gram_of(x)
    drone = decompose_qk(wq, bq, wk, bk, 2, g).projections(k).relative_error
    svd = decompose_qk(wq, bq, wk, bk, 2, g, method="svd").projections(k).relative_error
    assert drone <= svd + 1e-12 and svd > 0


@pytest.mark.parametrize("damp", [1e-3, 1.0])
def test_damped_error_is_reported_on_the_undamped_data(damp: float) -> None:
    heads, k = 2, 2
    wq, bq, wk, bk, x = problem(n=7, heads=heads, d=4, tokens=25, seed=14)
    p = decompose_qk(wq, bq, wk, bk, heads, gram_of(x), damp=damp).projections(k)
    dense = head_scores(wq, bq, wk, bk, x, heads)
    approx = head_scores(p.query_weight, p.query_bias, p.key_weight, p.key_bias, x, heads)
    measured = math.sqrt(float((dense - approx).pow(2).sum()) / float(dense.pow(2).sum()))
    assert_close(p.relative_error, measured, 1e-7)
    assert p.relative_error >= math.sqrt(optimum(dense, k) / float(dense.pow(2).sum())) - 1e-12


def test_huge_damp_approaches_svd() -> None:
    wq, bq, wk, bk, x = problem(n=6, heads=1, d=3, tokens=20, seed=15)
    g = gram_of(x)
    damped = decompose_qk(wq, bq, wk, bk, 1, g, damp=1e9).projections(1)
    svd = decompose_qk(wq, bq, wk, bk, 1, g, method="svd").projections(1)
    assert_close(damped.relative_error, svd.relative_error, 1e-5)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def test_inputs_are_neither_modified_nor_aliased() -> None:
    wq, bq, wk, bk, x = problem(n=5, heads=1, d=3, tokens=10, seed=16)
    g = gram_of(x)
    before = [t.clone() for t in (wq, bq, wk, bk, g)]
    p = decompose_qk(wq, bq, wk, bk, 1, g).projections(3)
    for t, b in zip((wq, bq, wk, bk, g), before, strict=True):
        assert torch.equal(t, b)
    p.query_weight.add_(1.0)
    assert torch.equal(wq, before[0])


def test_missing_biases_count_as_zero() -> None:
    wq, _, wk, _, x = problem(n=5, heads=2, d=2, tokens=12, seed=17)
    zeros = torch.zeros(4, dtype=f64)
    a = decompose_qk(wq, None, wk, None, 2, gram_of(x)).projections(1)
    b = decompose_qk(wq, zeros, wk, zeros, 2, gram_of(x)).projections(1)
    torch.testing.assert_close(a.query_weight, b.query_weight)


def test_float32_weights_give_float64_results() -> None:
    wq, bq, wk, bk, x = problem(n=5, heads=1, d=2, tokens=12, seed=18)
    dec = decompose_qk(wq.float(), bq.float(), wk.float(), bk.float(), 1, gram_of(x).float())
    assert isinstance(dec, QKDecomposition) and dec.projections(1).query_weight.dtype == f64


@pytest.mark.parametrize("rank", [0, 5, True, 1.5])
def test_invalid_rank_names_the_valid_range(rank) -> None:
    wq, bq, wk, bk, x = problem(n=5, heads=1, d=4, tokens=12, seed=19)
    with pytest.raises(ValueError, match=r"use an integer in \[1, 4\]"):
        decompose_qk(wq, bq, wk, bk, 1, gram_of(x)).projections(rank)


def test_bad_inputs_raise_with_the_fix() -> None:
    wq, bq, wk, bk, x = problem(n=5, heads=2, d=3, tokens=12, seed=20)
    with pytest.raises(ValueError, match="dividing the 6 projection outputs"):
        decompose_qk(wq, bq, wk, bk, 4, gram_of(x))
    with pytest.raises(ValueError, match="augmented"):
        decompose_qk(wq, bq, wk, bk, 2, x @ x.T)  # the plain Gram: the bias row is missing
    with pytest.raises(ValueError, match="needs the augmented input Gram"):
        decompose_qk(wq, bq, wk, bk, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        decompose_qk(wq, bq, wk[:3], bk[:3], 2, gram_of(x))
    with pytest.raises(ValueError, match="method="):
        decompose_qk(wq, bq, wk, bk, 2, gram_of(x), method="pca")
    with pytest.raises(ValueError, match="damp="):
        decompose_qk(wq, bq, wk, bk, 2, gram_of(x), damp=-1.0)
    bad = wq.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        decompose_qk(bad, bq, wk, bk, 2, gram_of(x))
