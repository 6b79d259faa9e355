"""Peer low-rank methods, implemented here so they can be compared with DRONE in one run.

Each function returns a :class:`~drone_hf.solver.closed_form.Decomposition`, so the rest of
drone-hf (rank planning, factored layers, checkpoints, reports) treats every method alike, and
every rank's calibration error ``||(W - W'_k) X||_F`` is measured on the same Gram ``G = Σ x xᵀ``
as DRONE's. DRONE minimises exactly that objective, so no method here can beat it on calibration
data; they differ in what they weight and in how they fail.

* **ASVD** (Yuan et al., 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
  Large Language Models"): scale input channel ``j`` by ``s_j = mean_tokens(|x_j|)^α`` (``α = 0.5``
  by default), truncate the SVD of ``W S``, map back with ``S⁻¹``. With ``W S = U Σ Pᵀ`` the
  published ``U_k Σ_k P_kᵀ S⁻¹`` equals ``U_k U_kᵀ W`` (``U_kᵀ W S = Σ_k P_kᵀ``); we compute the
  latter, which never divides by ``s``: a channel that was never active (``s_j = 0``) does not steer
  the truncation and keeps ``U_k U_kᵀ W``'s column instead of an infinity. Only the diagonal scaling
  is reproduced; ASVD's sensitivity-based rank search is replaced by drone-hf's own allocation.
* **FWSVD** (Hsu et al., 2022, "Language Model Compression with Weighted Low-rank Factorization"):
  row ``i`` of ``W`` (output ``i``) is weighted by ``I_i = Σ_j F_ij``, the summed squared gradients
  of the loss w.r.t. that row on calibration data (:mod:`drone_hf.calibration.fisher`); with
  ``D = diag(sqrt(I))`` it truncates ``D W = U Σ Pᵀ`` and maps back, ``W' = D⁻¹ U_k Σ_k P_kᵀ``,
  which equals ``W P_k P_kᵀ``: an *input* projection. Computed in that form (no division by ``D``:
  rows the loss never depended on keep their projected weights). A layer whose Fisher is zero
  everywhere (no gradient reached it) gets uniform weights, i.e. plain SVD.
* **SVD-LLM** (Wang et al., 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
  Language Model Compression"): whiten with the Cholesky factor ``L`` of the Gram, ``G = L Lᵀ``,
  truncate the SVD of ``W L = U Σ Pᵀ`` and map back, ``W' = U_k (Σ_k P_kᵀ L⁻¹)`` (a triangular
  solve, as published). Its truncation is DRONE's optimum whenever ``G`` is positive definite. When
  it is not (fewer tokens than inputs, dead channels), Cholesky fails: we raise
  :class:`CholeskyError` naming the layer. No jitter is added: the published code's eigenvalue
  shift would change the objective, and ``method="drone"`` reaches the same optimum without the
  failure mode. Because round-off can let Cholesky "succeed" on a numerically singular Gram (and
  ``L⁻¹`` then amplifies noise), a Gram whose numerical rank, at DRONE's tolerance
  (:data:`~drone_hf.solver.numerics.EIGEN_TOL`), is below its width is refused too.
"""

from __future__ import annotations

import math

import torch

from .closed_form import Decomposition, output_energy
from .numerics import EIGEN_TOL, SINGULAR_TOL, as_float64, check_finite

#: Methods of this module, and what each needs besides the weight and the Gram.
PEER_METHODS = ("asvd", "fwsvd", "svdllm")

#: ASVD's default exponent on the mean absolute activations (the paper's recommended value).
DEFAULT_ASVD_ALPHA = 0.5


class CholeskyError(ValueError):
    """SVD-LLM met a Gram that is not positive definite (rank-deficient calibration statistics)."""


def _check(weight: torch.Tensor, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}.")
    w = as_float64(weight)
    check_finite(w, "weight")
    if gram is None:
        return w, None
    n = w.shape[1]
    g = as_float64(gram)
    if tuple(g.shape) != (n, n):
        raise ValueError(f"gram has shape {tuple(g.shape)} but the weight takes {n} inputs: expected ({n}, {n}).")
    check_finite(g, "gram")
    return w, 0.5 * (g + g.T)


def _eig(g: torch.Tensor, eig: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Eigenpairs of the Gram (or the caller's precomputed ``torch.linalg.eigh`` of it) and the mask
    of those DRONE keeps (``λ > EIGEN_TOL · λ_max``)."""
    lam, vec = eig if eig is not None else torch.linalg.eigh(g)
    lam, vec = as_float64(lam), as_float64(vec)
    lam_max = float(lam[-1]) if lam.numel() else 0.0
    keep = lam > EIGEN_TOL * lam_max if lam_max > 0 else torch.zeros_like(lam, dtype=torch.bool)
    return lam, vec, keep


def _root(g: torch.Tensor | None, eig=None) -> torch.Tensor | None:
    """``R = V_t Λ_t^{1/2}`` with ``G ≈ R Rᵀ``: the calibration outputs are ``W R`` up to rotation."""
    if g is None:
        return None
    lam, vec, keep = _eig(g, eig)
    return vec[:, keep] * lam[keep].sqrt()


def _nonzero(sing: torch.Tensor) -> torch.Tensor:
    if not sing.numel() or float(sing[0]) <= 0:
        return sing > 0
    return sing > SINGULAR_TOL * float(sing[0])


def _projection(w: torch.Tensor, z: torch.Tensor, root: torch.Tensor | None, method: str) -> Decomposition:
    """Output-projection form ``W'_k = U_k U_kᵀ W`` with ``U`` the left singular vectors of ``z``."""
    basis, sing, _ = torch.linalg.svd(z, full_matrices=False)
    mask = _nonzero(sing)
    basis, sing = basis[:, mask], sing[mask]
    captured, residual, total = output_energy(w, basis, root)
    return Decomposition(w, basis, None, captured, residual, total, sing**2, method)


def pair_squared_errors(
    weight: torch.Tensor, root: torch.Tensor, up_all: torch.Tensor, down_all: torch.Tensor, block: int = 16
) -> torch.Tensor:
    """``||(W - A_k B_k) X||²`` for k = 0..r, for any factor pair ``A`` [m, r], ``B`` [r, n].

    With ``G = R Rᵀ`` the calibration error is ``||W R - A_k (B_k R)||_F``. The residual ``E_s`` is
    formed (and its norm taken) exactly every ``block`` ranks; within a block, ``||E_s - Σ a_j (b_j R)||²`` is expanded
    around ``||E_s||²`` (cross terms and the block's small Gram table), so round-off is relative to
    the current residual, not to ``||W X||²``: small errors keep their relative precision. Cost
    ``O(r m t)`` in matrix products. This is the error of the factors actually returned, whatever the
    method's truncation.
    """
    rest = weight @ root
    br = down_all @ root
    out = [float((rest * rest).sum())]
    r = up_all.shape[1]
    for s in range(0, r, block):
        a, b = up_all[:, s : s + block], br[s : s + block]
        base = (rest * rest).sum()
        cross = ((a.T @ rest) * b).sum(dim=1)
        quad = torch.diagonal(((a.T @ a) * (b @ b.T)).cumsum(0).cumsum(1))
        inside = (base - 2 * cross.cumsum(0) + quad).clamp_min(0.0)
        rest = rest - a @ b
        inside[-1] = (rest * rest).sum()  # block ends exact: the full-rank error is 0 up to round-off
        out.extend(inside.tolist())
    return torch.tensor(out, dtype=torch.float64)


def _pairs(
    w: torch.Tensor, up_all: torch.Tensor, down_all: torch.Tensor, spectrum: torch.Tensor, basis: torch.Tensor,
    root: torch.Tensor | None, method: str,
) -> Decomposition:
    sq = total = None
    if root is not None:
        sq = pair_squared_errors(w, root, up_all, down_all)
        total = float(sq[0])
    return Decomposition(
        w, basis, None, None, None, total, spectrum, method,
        up_all=up_all, down_all=down_all, explicit_squared_errors=sq,
    )


def decompose_asvd(
    weight: torch.Tensor, gram: torch.Tensor | None, abs_mean: torch.Tensor, alpha: float = DEFAULT_ASVD_ALPHA,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """ASVD: truncated SVD of ``W diag(abs_mean^α)``, mapped back (see the module docstring).

    Args:
        weight: [m, n].
        gram: [n, n] input Gram, used only to measure every rank's calibration error (``None``: no errors).
        abs_mean: [n] mean absolute value of each input channel over the real calibration tokens
            (:class:`~drone_hf.calibration.activation_stats.AbsMeanObserver`).
        alpha: exponent, ``>= 0``; 0 is plain SVD.
        eig: ``torch.linalg.eigh(gram)`` if the caller already has it (a benchmark comparing methods).
    """
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"asvd_alpha={alpha!r} must be a finite number >= 0 (the paper uses 0.5; 0 is plain SVD).")
    w, g = _check(weight, gram)
    s = as_float64(abs_mean).reshape(-1)
    if s.numel() != w.shape[1]:
        raise ValueError(f"abs_mean has {s.numel()} channels but the weight takes {w.shape[1]} inputs.")
    check_finite(s, "abs_mean")
    if bool((s < 0).any()):
        raise ValueError("abs_mean must be >= 0 (a mean of absolute values).")
    scale = s.pow(alpha) if alpha > 0 else torch.ones_like(s)
    return _projection(w, w * scale, _root(g, eig), "asvd")


def decompose_fwsvd(
    weight: torch.Tensor, gram: torch.Tensor | None, row_fisher: torch.Tensor,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """Fisher-weighted SVD: truncate ``diag(sqrt(I)) W``, map back (``W' = W P_k P_kᵀ``).

    Args:
        weight: [m, n].
        gram: [n, n] input Gram, for the calibration errors only (``None``: no errors).
        row_fisher: [m] ``I_i = Σ_j (∂L/∂W_ij)²`` summed over calibration batches
            (:func:`~drone_hf.calibration.fisher.collect_row_fisher`). All zeros: plain SVD.
        eig: ``torch.linalg.eigh(gram)`` if the caller already has it.
    """
    w, g = _check(weight, gram)
    f = as_float64(row_fisher).reshape(-1)
    if f.numel() != w.shape[0]:
        raise ValueError(f"row_fisher has {f.numel()} rows but the weight has {w.shape[0]} outputs.")
    check_finite(f, "row_fisher")
    if bool((f < 0).any()):
        raise ValueError("row_fisher must be >= 0 (sums of squared gradients).")
    d = f.sqrt() if float(f.max()) > 0 else torch.ones_like(f)
    _, sing, vh = torch.linalg.svd(d[:, None] * w, full_matrices=False)
    mask = _nonzero(sing)
    p = vh[mask].T  # [n, r] input directions, best first
    return _pairs(w, w @ p, p.T.contiguous(), sing[mask] ** 2, p, _root(g, eig), "fwsvd")


def decompose_svdllm(
    weight: torch.Tensor, gram: torch.Tensor, name: str = "", eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Decomposition:
    """SVD-LLM: Cholesky whitening ``G = L Lᵀ``, truncated SVD of ``W L``, map back with ``L⁻¹``.

    ``eig``: ``torch.linalg.eigh(gram)`` if the caller already has it (used for the rank check and
    the error bookkeeping, never for the whitening).

    Raises:
        CholeskyError: ``G`` is not (numerically) positive definite; the message names ``name``.
    """
    if gram is None:
        raise ValueError("method='svdllm' needs the input Gram matrix.")
    w, g = _check(weight, gram)
    n = w.shape[1]
    lam, vec, keep = _eig(g, eig)
    rank = int(keep.sum())
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0 or rank < n:
        where = f"layer {name!r}" if name else "this layer"
        lam_max = float(lam[-1]) if lam.numel() else 0.0
        ratio = float(lam[0]) / lam_max if lam_max > 0 else float("nan")
        why = ("its Cholesky factorisation failed" if int(info) != 0 else
               f"Cholesky succeeded only through round-off (λ_min/λ_max = {ratio:.1e} <= {EIGEN_TOL:g}; L⁻¹ would "
               "amplify noise in the directions calibration barely saw)")
        raise CholeskyError(
            f"SVD-LLM cannot whiten {where}: its input Gram ({n}x{n}) is not positive definite (numerical rank "
            f"{rank} of {n}: too few calibration tokens, or input channels that are never active); {why}. "
            "Use method='drone' (the same optimum, computed without Cholesky), more calibration texts, or exclude "
            "the layer with modules_to_not_convert."
        )
    u, sing, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    mask = _nonzero(sing)
    u, sing, vh = u[:, mask], sing[mask], vh[mask]
    # down = Σ Pᵀ L⁻¹, i.e. Lᵀ downᵀ = P Σ: one triangular solve
    down = torch.linalg.solve_triangular(chol.T, vh.T * sing, upper=True).T.contiguous()
    root = vec[:, keep] * lam[keep].sqrt()
    return _pairs(w, u, down, sing**2, u, root, "svdllm")


def decompose_peer(
    method: str,
    weight: torch.Tensor,
    gram: torch.Tensor | None,
    *,
    abs_mean: torch.Tensor | None = None,
    row_fisher: torch.Tensor | None = None,
    asvd_alpha: float = DEFAULT_ASVD_ALPHA,
    name: str = "",
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """Dispatch to the peer ``method`` with the statistics it needs (each missing one is named).
    ``eig``: ``torch.linalg.eigh(gram)`` if the caller already has it."""
    if method == "asvd":
        if abs_mean is None:
            raise ValueError(f"method='asvd' needs the mean absolute input activations of layer {name!r}.")
        return decompose_asvd(weight, gram, abs_mean, asvd_alpha, eig=eig)
    if method == "fwsvd":
        if row_fisher is None:
            raise ValueError(f"method='fwsvd' needs the row Fisher information of layer {name!r}.")
        return decompose_fwsvd(weight, gram, row_fisher, eig=eig)
    if method == "svdllm":
        return decompose_svdllm(weight, gram, name, eig=eig)
    raise ValueError(f"{method!r} is not a peer method: use one of {list(PEER_METHODS)}.")
