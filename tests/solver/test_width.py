"""The width-pruning solver against its mathematics: each elimination step's cost is the exact
increase of the (damped) quadratic, a single step is the brute-force cheapest neuron, and the
compensated output layer satisfies the least-squares normal equations."""

from __future__ import annotations

import itertools

import pytest
import torch

from drone_hf.solver.kfac import DEFAULT_KFAC_DAMP
from drone_hf.solver.width import WIDTH_DAMP, _damped, compensated_weight, eliminate_neurons, width_step


def _problem(seed: int = 0, out_f: int = 6, width: int = 12, tokens: int = 40):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, width, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.2, 2.0, width, dtype=torch.float64)  # unequal neurons
    h = torch.randn(tokens, width, generator=g, dtype=torch.float64) * scale
    a = torch.randn(out_f, out_f, generator=g, dtype=torch.float64)
    return weight, h.T @ h, a @ a.T


def _exact_cost(weight, gram, out_gram, removed: list[int], scale: float) -> float:
    """tr(H W (G - G[:,S] G[S,S]⁻¹ G[S,:]) Wᵀ) with the solver's damping: the quadratic's increase
    when only the kept neurons S feed the best output layer."""
    g = _damped(gram, WIDTH_DAMP)
    hm = torch.eye(weight.shape[0], dtype=torch.float64) if out_gram is None else _damped(out_gram, DEFAULT_KFAC_DAMP)
    keep = [j for j in range(weight.shape[1]) if j not in set(removed)]
    residual = g - g[:, keep] @ torch.linalg.solve(g[keep][:, keep], g[keep, :])
    return float(torch.trace(hm @ weight @ residual @ weight.T)) * scale


@pytest.mark.parametrize("with_h", [True, False])
@pytest.mark.parametrize("step", [1, 3])
def test_every_step_costs_the_exact_quadratic_increase(with_h, step):
    weight, gram, out_gram = _problem()
    h = out_gram if with_h else None
    curve = eliminate_neurons(weight, gram, out_gram=h, loss_scale=0.25, step=step, max_removed=9)
    assert len(curve.losses) == 9 // step and len(curve.order) == len(set(curve.order)) == step * len(curve.losses)
    for s, loss in enumerate(curve.losses, 1):
        assert loss == pytest.approx(_exact_cost(weight, gram, h, curve.order[: s * step], 0.25), rel=1e-9)
    assert curve.losses == sorted(curve.losses)  # removing more never costs less


def test_a_single_step_removes_the_cheapest_neuron():
    weight, gram, out_gram = _problem(seed=3)
    curve = eliminate_neurons(weight, gram, out_gram=out_gram, step=1, max_removed=1)
    costs = [_exact_cost(weight, gram, out_gram, [j], 1.0) for j in range(weight.shape[1])]
    assert curve.order == [min(range(len(costs)), key=costs.__getitem__)]
    assert curve.losses[0] == pytest.approx(min(costs), rel=1e-9)


def test_a_pair_step_is_no_worse_than_the_greedy_bound_and_at_least_the_best_pair():
    weight, gram, _ = _problem(seed=5, width=8)
    curve = eliminate_neurons(weight, gram, step=2, max_removed=2)
    best = min(_exact_cost(weight, gram, None, list(p), 1.0) for p in itertools.combinations(range(8), 2))
    assert curve.losses[0] >= best - 1e-9  # a heuristic block: never below the optimum over pairs


def test_compensation_solves_the_normal_equations():
    weight, gram, _ = _problem(seed=1)
    keep = [0, 2, 3, 7, 8, 11]
    compensated = compensated_weight(weight, gram, keep)
    g = _damped(gram, WIDTH_DAMP)
    residual = weight @ g[:, keep] - compensated @ g[keep][:, keep]
    assert residual.abs().max() < 1e-9 * weight.abs().max() * g.abs().max()
    assert compensated.dtype == weight.dtype and compensated.shape == (weight.shape[0], len(keep))


@pytest.mark.parametrize("damp", [0.0, WIDTH_DAMP])
def test_cross_compensation_fits_the_dense_outputs_from_the_compressed_activations(damp):
    """With a cross-Gram (sequential="compensated"): the least-squares W' on the kept compressed-model
    neurons for the dense outputs, min ||W H - W' Ĥ_S||² + λ ||W' - W_S||², computed independently by
    an augmented least-squares solve on the activations themselves."""
    weight, _, _ = _problem(seed=3)
    g = torch.Generator().manual_seed(7)
    tokens, width = 40, weight.shape[1]
    h = torch.randn(width, tokens, generator=g, dtype=torch.float64)
    h_hat = h + 0.3 * torch.randn(width, tokens, generator=g, dtype=torch.float64)  # a perturbed stream
    keep = [1, 2, 4, 5, 9, 10, 11]
    gram, cross = h_hat @ h_hat.T, h @ h_hat.T
    got = compensated_weight(weight, gram, keep, damp=damp, cross=cross)
    lam = damp * float(gram.diagonal().mean())
    a = torch.cat([h_hat[keep].T, lam ** 0.5 * torch.eye(len(keep), dtype=torch.float64)])  # [tokens + |S|, |S|]
    y = torch.cat([(weight @ h).T, lam ** 0.5 * weight[:, keep].T])
    expected = torch.linalg.lstsq(a, y).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    # without the cross-Gram the same fit of a stream onto itself: the plain compensation
    plain = compensated_weight(weight, gram, keep, damp=damp)
    torch.testing.assert_close(compensated_weight(weight, gram, keep, damp=damp, cross=gram), plain,
                               rtol=1e-9, atol=1e-10)


def test_compensation_keeping_everything_is_the_identity():
    weight, gram, _ = _problem(seed=2)
    assert torch.allclose(compensated_weight(weight, gram, list(range(weight.shape[1]))), weight, atol=1e-10)


def test_kept_lists_the_neurons_left_in_order_and_energy_is_the_output_energy():
    weight, gram, _ = _problem(seed=4)
    curve = eliminate_neurons(weight, gram, step=2, max_removed=4)
    kept = curve.kept(1)
    assert kept == sorted(set(range(12)) - set(curve.order[:2]))
    assert curve.energy == pytest.approx(float(torch.trace(weight @ gram @ weight.T)), rel=1e-12)


def test_width_step_grid():
    assert width_step(1536) == 8
    assert width_step(64) == 8 and width_step(32) == 4 and width_step(4) == 1
    assert width_step(11008) == 57


def test_step_below_one_is_refused():
    weight, gram, _ = _problem()
    with pytest.raises(ValueError, match="step=0 must be at least 1"):
        eliminate_neurons(weight, gram, step=0)
