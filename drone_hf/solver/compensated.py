"""Error-compensated DRONE: the best rank-k weight for inputs that earlier compression has changed.

In a compressed model, layer ``l`` no longer sees the dense model's inputs ``X`` but ``X̂``, the
outputs of the (already factored) layers before it. Plain DRONE on ``X̂`` minimises
``||(W - W') X̂||``: it reproduces what the *dense* layer would do to the *changed* inputs, so every
earlier error passes through unchanged. The compensated problem asks instead for the dense model's
outputs:

    min over rank-k W'  ||W X - W' X̂||_F

Closed form (derivation in ``docs/method.md``). Write ``Ĝ = X̂ X̂ᵀ`` and ``C = X X̂ᵀ`` (the cross-Gram
of the paired tokens). The unconstrained least-squares weight is ``W̃ = W C Ĝ⁺``, and
``W X - W' X̂ = (W X - W̃ X̂) + (W̃ - W') X̂`` where the first part is orthogonal to every
``W' X̂`` (it is a least-squares residual on the row space of ``X̂``). So the rank-k optimum is DRONE
applied to ``W̃`` with the Gram ``Ĝ``, and its error is the irreducible part plus DRONE's own:

    ||W X - W'_k X̂||² = ||W X - W̃ X̂||² + Σ_{j>k} σ_j(W̃ X̂)²

With ``X̂ = X`` (nothing changed upstream) ``W̃ = W V_t V_tᵀ`` and this is exactly DRONE. Only the
three statistics ``Ĝ``, ``C`` and ``||W X||²`` are needed, never the activations.

``damp = δ`` solves ``min ||W X - W' X̂||² + ρ ||W - W'||²`` with ``ρ = δ · mean(diag Ĝ)``, the same
ridge as DRONE's ``damp`` (:mod:`~drone_hf.solver.closed_form`): it appends ``√ρ I`` to both ``X``
and ``X̂``, so ``Ĝ -> Ĝ + ρI`` and ``C -> C + ρI``, and ``W̃ = W (C + ρI)(Ĝ + ρI)⁻¹``. Directions
``X̂`` barely visits then keep the dense weight instead of a large one fitted to a handful of
tokens (``δ -> ∞`` is plain SVD of ``W``, as for DRONE). Every rank's error is computed exactly from
the statistics (the objective without the ridge term), not from the formula above, which holds
for ``δ = 0``.
"""

from __future__ import annotations

import dataclasses

import torch

from .closed_form import Decomposition, decompose
from .kfac import DEFAULT_KFAC_DAMP, kfac_factors
from .numerics import EIGEN_TOL, as_float64, check_damp, check_finite


def round_off_level(precision: torch.dtype) -> float:
    """Relative eigenvalue of ``Ĝ`` below which a direction is round-off, not signal.

    Two sources: the statistics are summed from float32 products (float64 ones for float64
    activations), which leaves errors of about ``eps_accumulation · λ_max`` in every entry; and the
    activations themselves were rounded to ``precision``, which puts into an exactly rank-deficient
    ``X̂`` components of relative size ``eps``, i.e. eigenvalues of relative size ``eps²``. The cut is
    ten times the larger. ``10 · eps(bfloat16)`` (7.8e-2), used before, dropped real directions: a
    bfloat16 model's compensated solve kept 3 of 5 real directions in the test, and on a tiny Llama
    it did no better than ``sequential=True``."""
    accumulation = torch.float64 if precision == torch.float64 else torch.float32
    return max(EIGEN_TOL, 10 * torch.finfo(accumulation).eps, 10 * torch.finfo(precision).eps ** 2)


def compensated_target(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float, precision: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """``(Ĝ, eig values, eig vectors, W C, W̃)`` in float64: the checked statistics, ``Ĝ``'s
    eigenpairs and the compensated weight ``W̃ = W C Ĝ⁺`` (or ``W (C + ρI)(Ĝ + ρI)⁻¹`` with ``damp``),
    which any metric's rank-k solver then truncates on ``Ĝ`` (arguments as :func:`decompose_compensated`)."""
    check_damp(damp)
    w = as_float64(weight)
    check_finite(w, "weight")
    n = w.shape[1]
    g, c = as_float64(gram), as_float64(cross)
    for name, t in (("gram", g), ("cross", c)):
        if tuple(t.shape) != (n, n):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the weight takes {n} inputs: expected ({n}, {n}).")
        check_finite(t, name)
    g = 0.5 * (g + g.T)
    lam, vec = torch.linalg.eigh(g)
    lam_max = float(lam[-1]) if lam.numel() else 0.0
    ridge = damp * float(torch.diagonal(g).mean()) if lam_max > 0 else 0.0
    if ridge > 0:
        inverse = 1.0 / (lam.clamp_min(0.0) + ridge)
    else:
        tol = round_off_level(precision)
        keep = lam > tol * max(lam_max, 0.0)
        inverse = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    wc = w @ c  # [m, n]: W C, reused by the error bookkeeping
    target = wc + ridge * w if ridge > 0 else wc  # W (C + ρI)
    compensated = ((target @ vec) * inverse) @ vec.T  # W̃ = W C Ĝ⁺, or W (C + ρI)(Ĝ + ρI)⁻¹
    return g, lam, vec, wc, compensated


def compensated_squared_errors(
    wc: torch.Tensor, gram: torch.Tensor, up_all: torch.Tensor, down_all: torch.Tensor, dense_energy: float
) -> torch.Tensor:
    """``||W X - A_k B_k X̂||²`` for k = 0..r, for any factor pair ``A`` [m, r], ``B`` [r, n]:
    ``||W X||² - 2 Σ_{j<=k} a_jᵀ W C b_j + Σ_{i,j<=k} (a_iᵀ a_j)(b_iᵀ Ĝ b_j)``, exact from the statistics
    (columns of ``A`` need not be orthonormal: loss-aware DRONE's are not)."""
    cross_terms = ((up_all.T @ wc) * down_all).sum(dim=1)
    quad = torch.diagonal(((up_all.T @ up_all) * (down_all @ gram @ down_all.T)).cumsum(0).cumsum(1))
    steps = quad - 2 * torch.cumsum(cross_terms, 0)
    return (float(dense_energy) + torch.cat([steps.new_zeros(1), steps])).clamp_min(0.0)


def decompose_compensated(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    dense_energy: float,
    *,
    damp: float = 0.0,
    precision: torch.dtype = torch.float64,
) -> Decomposition:
    """Decompose ``weight`` for the compensated objective ``||W X - W' X̂||``, every rank at once.

    Args:
        weight: [m, n] the dense layer weight ``W`` (out x in).
        gram: [n, n] ``Ĝ = Σ x̂ x̂ᵀ``, the Gram of the inputs the compressed model gives the layer.
        cross: [n, n] ``C = Σ x x̂ᵀ`` over the same tokens, ``x`` the dense model's input to the layer
            for the token whose compressed-model input is ``x̂``.
        dense_energy: ``||W X||_F² = Σ ||W x||²``, the reference of the relative errors.
        damp: relative ridge on ``Ĝ`` (``0``: the exact optimum).
        precision: dtype of the activations the statistics were accumulated from. ``Ĝ⁺`` divides by
            the eigenvalues of ``Ĝ``, so directions at the level of round-off (below
            :func:`round_off_level` ``· λ_max``) are dropped, not inverted: an exactly rank-deficient ``X̂`` (the
            attention output lies in the span of the factored value layer) has such eigenvalues from
            float32 round-off alone, and inverting them would fit noise with huge weights. Plain DRONE
            never divides by them, so it keeps the tighter ``EIGEN_TOL``.

    Returns:
        A :class:`Decomposition` whose ``weight`` is the compensated ``W̃`` (its rank-k factors are the
        optimum) and whose errors are ``||W X - W'_k X̂||²`` for every rank.
    """
    g, lam, vec, wc, compensated = compensated_target(weight, gram, cross, damp, precision)
    dec = decompose(compensated, g, damp=damp, eig=(lam, vec))

    # W'_k = Σ_{j<=k} u_j d_jᵀ with d_j = P W̃ᵀ u_j (P the kept input subspace)
    u = dec.basis
    d = u.T @ compensated
    if dec.projector is not None:
        d = (d @ dec.projector) @ dec.projector.T
    errors = compensated_squared_errors(wc, g, u, d, dense_energy)
    return dataclasses.replace(
        dec, captured=None, residual=None, total_energy=float(dense_energy), explicit_squared_errors=errors
    )


def decompose_kfac_compensated(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    dense_energy: float,
    out_gram: torch.Tensor,
    *,
    kfac_damp: float = DEFAULT_KFAC_DAMP,
    loss_scale: float = 1.0,
    precision: torch.dtype = torch.float64,
) -> Decomposition:
    """Loss-aware DRONE for the compensated objective: the rank-k optimum of
    ``||H_δ^{1/2} (W X - W' X̂)||_F`` (``method="drone-kfac"`` with ``sequential="compensated"``).

    The split that makes compensated DRONE a DRONE problem survives the output weighting: with
    ``P`` the projection onto the row space of ``X̂``, ``H^{1/2}(W X - W̃ X̂) = H^{1/2} W X (I - P)``
    and ``H^{1/2}(W̃ - W') X̂`` are orthogonal for every ``W'`` (``X̂ (I - P) = 0``), so the optimum is
    :func:`~drone_hf.solver.kfac.decompose_kfac` of ``W̃`` on ``Ĝ``. ``out_gram`` is the dense
    model's output-gradient Gram (the loss the compressed model should keep). Arguments as
    :func:`decompose_compensated` and :func:`~drone_hf.solver.kfac.decompose_kfac`; the errors are
    ``||W X - W'_k X̂||²`` of the returned factors, ``curvature_squared_errors`` the weighted part
    the truncation minimises.
    """
    g, lam, vec, wc, compensated = compensated_target(weight, gram, cross, 0.0, precision)
    f = kfac_factors(compensated, g, out_gram, damp=kfac_damp, loss_scale=loss_scale, eig=(lam, vec))
    errors = compensated_squared_errors(wc, g, f.up_all, f.down_all, dense_energy)  # once: not also on W̃
    return f.decomposition(errors, total_energy=dense_energy)
