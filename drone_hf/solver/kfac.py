"""Loss-aware DRONE: the closed form under a Kronecker-factored Fisher metric (``method="drone-kfac"``).

DRONE minimises ``||(W - W') X||²``: every output direction of a layer counts the same. The loss
does not see them alike. To second order, the loss increase of a weight change ``ΔW`` is
``½ vec(ΔW)ᵀ F vec(ΔW)``; with the Kronecker-factored (K-FAC) approximation of the Fisher,
with tokens as samples, ``F ≈ G ⊗ H / (S T)``, that is

    ΔL ≈ tr(ΔW G ΔWᵀ H) / (2 S T)      (mean loss over its S terms)

with ``G = Σ x xᵀ`` the input Gram DRONE already has and ``H = Σ g gᵀ`` the Gram of the loss's
gradients with respect to the layer's outputs (:mod:`drone_hf.calibration.output_gradients`), over
the ``T`` calibration tokens. This is DRONE's objective with the output error weighted by
``H^{1/2}``, and it keeps DRONE's closed form: with ``H_δ^{1/2}`` a square root of the (damped)
output Gram and ``R`` one of the input Gram (``G = R Rᵀ``),

    Z = H_δ^{1/2} W R = U Σ Pᵀ,      W'_k = H_δ^{-1/2} U_k U_kᵀ H_δ^{1/2} W

is the exact rank-k minimiser of ``||H_δ^{1/2} (W - W') R||_F``, and its error is the discarded
``Σ σ_j²``. Kronecker-factored curvature (K-FAC, Martens and Grosse, 2015) is what LLM Surgeon
(van der Ouderaa et al., 2024) uses to decide what to *prune*; here it decides what a low-rank
factorisation keeps, in one closed form per layer.

Two things make it more than a reweighting:

* **Allocation for free.** The discarded ``σ_j²`` of every layer are, up to the common factor
  ``1 / (2 S T)``, predicted increases of the *same* loss, so the greedy planner can compare
  layers directly, with no sensitivity probing (:attr:`Decomposition.predicted_loss`).
* **Damping.** ``H`` can be nearly singular (directions the loss barely depends on on calibration
  text) and ``H^{-1/2}`` then amplifies whatever the truncation leaves there. ``H_δ = H + δ ·
  mean(eig H) · I`` with ``δ > 0`` (``kfac_damp``, default 0.1) bounds that; ``δ -> ∞`` is DRONE.
  The default was chosen on SmolLM2-135M at a uniform 20% cut, where 0.1 and 1 gave the same
  held-out perplexity and 0.01 and 0.001 were 4% worse (``docs/methods.md``).

Cost on top of DRONE: one forward+backward pass over the calibration texts, an ``m x m`` Gram per
layer (``m`` outputs; keep that in mind on wide MLPs) and its eigendecomposition.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .closed_form import Decomposition, tail_sums
from .numerics import check_finite
from .peers import _check, _eig, _nonzero, pair_squared_errors

#: Default relative damping ``δ`` of the output-gradient Gram (see the module docstring).
DEFAULT_KFAC_DAMP = 0.1


def check_kfac_damp(damp: object) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(
            f"kfac_damp={damp!r} must be a finite number > 0: the output-gradient Gram can be singular and is inverted "
            f"(default {DEFAULT_KFAC_DAMP}; larger values move the solution toward method='drone')."
        )


def _damped_roots(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H_δ^{1/2}, H_δ^{-1/2})``, or ``None`` when ``H`` is zero (no gradient reached the layer)."""
    lam, vec = torch.linalg.eigh(0.5 * (h + h.T))
    lam = lam.clamp_min(0.0)
    mean = float(lam.mean()) if lam.numel() else 0.0
    if mean <= 0.0:
        return None
    lam = lam + damp * mean
    return (vec * lam.sqrt()) @ vec.T, (vec * lam.rsqrt()) @ vec.T


@dataclasses.dataclass(frozen=True)
class KfacFactors:
    """Loss-aware DRONE's truncation, before any error bookkeeping: the factor pairs for every rank.

    Kept apart from :class:`~drone_hf.solver.closed_form.Decomposition` because the two callers
    measure the error of the same factors differently (``||(W - W'_k) X||`` for plain loss-aware
    DRONE, ``||W X - W'_k X̂||`` for the compensated form) and the plain bookkeeping is the
    expensive part (``O(r m t)``): each caller computes its own, once.
    """

    weight: torch.Tensor  # [m, n] float64, the weight that was factored
    root: torch.Tensor  # [n, t], G ≈ R Rᵀ on the kept eigenpairs
    basis: torch.Tensor  # [m, r] left singular vectors of H^1/2 W R
    up_all: torch.Tensor  # [m, r] H^-1/2 U
    down_all: torch.Tensor  # [r, n] Uᵀ H^1/2 W P
    spectrum: torch.Tensor  # [r] σ_j², the weighted error each rank removes
    loss_scale: float | None  # None: no curvature reached the layer (plain DRONE's metric)

    def decomposition(self, squared_errors: torch.Tensor, total_energy: float | None = None) -> Decomposition:
        """The :class:`Decomposition` with ``squared_errors[k]`` the error of rank k's factors."""
        weighted = self.loss_scale is not None
        return Decomposition(
            self.weight, self.basis, None, None, None,
            float(squared_errors[0]) if total_energy is None else float(total_energy), self.spectrum, "drone-kfac",
            up_all=self.up_all, down_all=self.down_all.contiguous(), explicit_squared_errors=squared_errors,
            curvature_squared_errors=tail_sums(self.spectrum) if weighted else None, loss_scale=self.loss_scale,
        )


def kfac_factors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    out_gram: torch.Tensor,
    damp: float = DEFAULT_KFAC_DAMP,
    loss_scale: float = 1.0,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> KfacFactors:
    """The factor pairs of the rank-k optimum of ``||H_δ^{1/2} (W - W') X||_F`` for every k
    (arguments as :func:`decompose_kfac`)."""
    if gram is None:
        raise ValueError("method='drone-kfac' needs the input Gram matrix.")
    check_kfac_damp(damp)
    w, g = _check(weight, gram)
    m = w.shape[0]
    h = out_gram.to(torch.float64)
    if tuple(h.shape) != (m, m):
        raise ValueError(f"out_gram has shape {tuple(h.shape)} but the weight has {m} outputs: expected ({m}, {m}).")
    check_finite(h, "out_gram")
    lam, vec, keep = _eig(g, eig)
    projector = vec[:, keep]  # V_t: the input directions calibration saw
    root = projector * lam[keep].sqrt()  # [n, t], G ≈ R Rᵀ on the kept eigenpairs
    roots = _damped_roots(h, float(damp))
    if roots is None:  # no curvature information: DRONE's metric, and nothing to predict
        hs = his = torch.eye(m, dtype=torch.float64, device=w.device)
        scale = None
    else:
        hs, his = roots
        scale = float(loss_scale)
    hw = hs @ w
    basis, sing, _ = torch.linalg.svd(hw @ root, full_matrices=False)
    mask = _nonzero(sing)
    basis, sing = basis[:, mask], sing[mask]
    return KfacFactors(
        w, root, basis, his @ basis,
        ((basis.T @ hw) @ projector) @ projector.T,  # directions calibration never saw map to zero
        sing**2, scale,
    )


def decompose_kfac(
    weight: torch.Tensor,
    gram: torch.Tensor,
    out_gram: torch.Tensor,
    damp: float = DEFAULT_KFAC_DAMP,
    loss_scale: float = 1.0,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """Loss-aware DRONE: the rank-k optimum of ``||H_δ^{1/2} (W - W') X||_F`` for every k.

    Args:
        weight: [m, n] (out x in).
        gram: [n, n] input Gram ``Σ x xᵀ``.
        out_gram: [m, m] output-gradient Gram ``Σ g gᵀ``, ``g = ∂L/∂y`` per token. All zeros (the
            loss never depended on this layer): the plain DRONE solution, with no loss prediction.
        damp: relative damping ``δ > 0`` of ``out_gram``.
        loss_scale: factor turning the discarded ``σ²`` into a predicted mean-loss increase,
            ``1 / (2 S T)`` (see the module docstring); stored on the decomposition.
        eig: ``torch.linalg.eigh(gram)`` if the caller already has it.

    The returned decomposition reports, like every method's, the output error ``||(W - W'_k) X||``
    of the factors it returns (``relative_errors``), and in addition the weighted error the
    truncation minimises (``curvature_squared_errors``) and ``predicted_loss(k)``.
    """
    f = kfac_factors(weight, gram, out_gram, damp, loss_scale, eig)
    return f.decomposition(pair_squared_errors(f.weight, f.root, f.up_all, f.down_all))
