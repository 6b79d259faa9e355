"""The DRONE closed form: the best rank-k weight on the data a layer actually sees.

Pure ``torch.linalg``: this module never imports transformers, so the math can be tested (and
reused) apart from any model.

Notation (shapes in brackets):

* ``W`` [m, n]: the layer weight, ``y = W x + b`` (out x in).
* ``G`` [n, n]: the streamed input Gram ``sum_i x_i x_iᵀ`` over the calibration tokens.
* ``G = V Λ Vᵀ``; the kept eigenpairs (``λ > tol · λ_max``) give ``V_t`` [n, t], ``S = Λ_t^{1/2}``.
* ``Z = W V_t S`` [m, t] has the singular values of ``W X`` (``X`` the stacked inputs), so its SVD
  ``Z = U Σ Pᵀ`` gives the rank-k optimum of ``min ||(W - W') X||_F``.

The factors are computed in the numerically stable "output projection" form
``W' = U_k (U_kᵀ W V_t V_tᵀ)``, which equals the paper's ``U_k Σ_k P_kᵀ S⁻¹ V_tᵀ`` in exact
arithmetic (``U_kᵀ Z = Σ_k P_kᵀ``) but never divides by small singular values of ``X``. Directions
that calibration never saw (dropped by the tolerance) are mapped to zero, as in the paper.

``damp = δ`` replaces ``G`` by ``G + δ · mean(diag G) · I``, which solves
``min ||(W - W') X||² + δ · mean(diag G) · ||W - W'||²``: δ = 0 is pure DRONE, δ -> ∞ is plain SVD.

Every rank's calibration error comes for free: with ``Y = W V Λ^{1/2}`` (undamped statistics),
``||(W - W'_k) X||² = ||Y||² - Σ_{j<=k} ||u_jᵀ Y||²`` for the projection form above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .numerics import EIGEN_TOL, SINGULAR_TOL, as_float64, check_damp, check_finite

#: Every solver ``DroneConfig(method=...)`` accepts: DRONE, plain SVD, and the peer methods of
#: :mod:`drone_hf.solver.peers` (ASVD, Fisher-weighted SVD, SVD-LLM), for side-by-side comparison,
#: and loss-aware DRONE (:mod:`drone_hf.solver.kfac`: the same closed form under a K-FAC metric).
METHODS = ("drone", "svd", "asvd", "fwsvd", "svdllm", "drone-kfac")


def tail_sums(values: torch.Tensor) -> torch.Tensor:
    """[r + 1] ``Σ_{j >= k} values_j`` for k = 0..r (the last is 0): what truncating at rank k
    discards. Summed from the small end, so small tails do not cancel against the total."""
    tails = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])
    return torch.cat([tails, values.new_zeros(1)])


@dataclass(frozen=True)
class Factorization:
    """Rank-k factors of one weight: ``W ≈ up @ down``.

    Args:
        up: [m, rank] float64.
        down: [rank, n] float64.
        rank: the rank actually used (may be lower than requested: see ``Decomposition.max_rank``;
            at least 1: when ``W X = 0`` the factors are a zero rank-1 pair).
        relative_error: ``||(W - up·down) X||_F / ||W X||_F`` on the calibration inputs, or ``None``
            when no Gram matrix was given (data-free ``svd``).
    """

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    relative_error: float | None


@dataclass(frozen=True)
class Decomposition:
    """Everything needed to cut one weight at any rank, and the error of every rank.

    Built once by :func:`decompose`; :meth:`factors` then costs one small matrix product. Memory:
    ``W`` [m, n] and the basis [m, r] in float64.

    Attributes:
        weight: [m, n] float64 copy of ``W``.
        basis: [m, r] orthonormal output directions ``U``, best first.
        projector: [n, t] the kept input subspace ``V_t`` (``None``: the whole input space).
        captured: [r] float64, energy ``||u_jᵀ Y||²`` of the calibration outputs each direction keeps
            (``None`` without a Gram matrix).
        residual: ``||(I - U Uᵀ) Y||²``, the energy no direction keeps, computed directly rather than
            as a difference so small errors keep their relative precision (``None`` without data).
        total_energy: ``||W X||_F²`` on the calibration inputs (``None`` without a Gram matrix).
        spectrum: [r] the squared singular values the method truncates (``σ_j(W X)²`` for ``drone``
            with ``damp=0``; ``σ_j(W)²`` for ``svd``).
        method: one of :data:`METHODS`.
        up_all, down_all: [m, r] and [r, n]: when set, the rank-k factors are ``up_all[:, :k]`` and
            ``down_all[:k]`` (peer methods whose truncation is not an orthonormal output projection of
            ``W``: Fisher-weighted SVD keeps input directions, SVD-LLM maps back through ``L⁻¹``).
            ``None``: the output-projection form ``U_k (U_kᵀ W)`` from ``basis``.
        explicit_squared_errors: [r + 1] ``||(W - W'_k) X||²`` for k = 0..r, precomputed for the
            ``up_all``/``down_all`` form (``None``: derived from ``captured`` and ``residual``).
    """

    weight: torch.Tensor
    basis: torch.Tensor
    projector: torch.Tensor | None
    captured: torch.Tensor | None
    residual: float | None
    total_energy: float | None
    spectrum: torch.Tensor
    method: str
    up_all: torch.Tensor | None = None
    down_all: torch.Tensor | None = None
    explicit_squared_errors: torch.Tensor | None = None
    curvature_squared_errors: torch.Tensor | None = None
    loss_scale: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def max_rank(self) -> int:
        """Largest rank with any content: the numerical rank of ``W X`` (``drone``) or ``W`` (``svd``)."""
        return int(self.basis.shape[1])

    def squared_errors(self) -> torch.Tensor | None:
        """[max_rank + 1] float64: ``||(W - W'_k) X||²`` for k = 0..max_rank (``None`` without data)."""
        if self.explicit_squared_errors is not None:
            return self.explicit_squared_errors
        if self.captured is None or self.residual is None:
            return None
        return tail_sums(self.captured) + self.residual

    def relative_errors(self) -> torch.Tensor | None:
        """[max_rank + 1] float64: relative calibration error for every rank k = 0..max_rank."""
        sq = self.squared_errors()
        if sq is None:
            return None
        if self.total_energy == 0.0:
            return torch.zeros_like(sq)
        return (sq / self.total_energy).sqrt()

    def predicted_loss(self, rank: int) -> float | None:
        """Predicted increase of the mean calibration loss at ``rank`` (K-FAC, second order), or
        ``None`` for methods without curvature statistics."""
        if self.curvature_squared_errors is None or self.loss_scale is None:
            return None
        k = min(max(int(rank), 0), len(self.curvature_squared_errors) - 1)
        return self.loss_scale * float(self.curvature_squared_errors[k])

    def factors(self, rank: int) -> Factorization:
        """The rank-``rank`` factors, balanced so ``up``'s column j and ``down``'s row j share one norm.

        Raises:
            ValueError: ``rank`` is not a positive integer no larger than ``min(m, n)``.
        """
        m, n = self.shape
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > min(m, n):
            raise ValueError(
                f"rank={rank!r} is not valid for a {m}x{n} weight: use an integer in [1, {min(m, n)}]."
            )
        k = min(rank, self.max_rank)
        if self.up_all is not None and self.down_all is not None:
            return self._pair_factors(k)
        # W X = 0 (max_rank 0): nothing to keep, but a layer needs rank >= 1, so one zero direction.
        u = self.basis[:, :k] if k else self.weight.new_zeros(m, 1)
        down = u.T @ self.weight
        if self.projector is not None:
            down = (down @ self.projector) @ self.projector.T
        # Balance the factors: orthonormal u times the norm of each down row, split evenly.
        norms = down.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        up = u * norms
        down = down / norms[:, None]
        errors = self.relative_errors()
        err = None if errors is None else float(errors[k])
        return Factorization(up=up, down=down, rank=max(k, 1), relative_error=err)

    def _pair_factors(self, k: int) -> Factorization:
        """Factors of the ``up_all``/``down_all`` form, balanced like the projection form."""
        m, n = self.shape
        if k == 0:
            up, down = self.weight.new_zeros(m, 1), self.weight.new_zeros(1, n)
        else:
            up, down = self.up_all[:, :k], self.down_all[:k]
            tiny = torch.finfo(torch.float64).tiny
            scale = (up.norm(dim=0).clamp_min(tiny) / down.norm(dim=1).clamp_min(tiny)).sqrt()
            up, down = up / scale, down * scale[:, None]
        errors = self.relative_errors()
        err = None if errors is None else float(errors[k])
        return Factorization(up=up, down=down, rank=max(k, 1), relative_error=err)


def output_energy(
    w: torch.Tensor, basis: torch.Tensor, root: torch.Tensor | None
) -> tuple[torch.Tensor | None, float | None, float | None]:
    """Error bookkeeping of an output-projection form ``W'_k = U_k U_kᵀ W``: with ``Y = W R``
    (``G = R Rᵀ``), the energy each basis vector captures, what no basis vector reaches, and the
    total ``‖Y‖²``. Every rank's error then follows from sums, with no further product."""
    if root is None:
        return None, None, None
    y = w @ root
    total = float((y * y).sum())
    coeff = basis.T @ y
    captured = (coeff**2).sum(dim=1)
    rest = y - basis @ coeff
    return captured, float((rest * rest).sum()), total


def decompose(
    weight: torch.Tensor,
    gram: torch.Tensor | None = None,
    *,
    method: str = "drone",
    damp: float = 0.0,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """Decompose ``weight`` once so any rank can be cut from it.

    Args:
        weight: [m, n] (out x in), any float dtype; computed in float64.
        gram: [n, n] input Gram ``Σ x xᵀ`` over the calibration tokens, symmetric positive
            semi-definite. Required for ``method="drone"``; optional for ``"svd"`` (then only the
            errors are computed from it).
        method: ``"drone"`` (data-aware optimum) or ``"svd"`` (plain truncated SVD of ``W``, the
            data-free baseline).
        damp: relative ridge ``δ`` (see the module docstring); ``0`` is the exact DRONE optimum.
        eig: ``torch.linalg.eigh`` of the (symmetrised) ``gram`` when the caller already has it, so a
            comparison of several methods on one Gram decomposes it once.

    Cost: one ``n x n`` eigendecomposition and one ``m x t`` SVD in float64.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported: use one of {list(METHODS)}.")
    check_damp(damp)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}.")
    w = as_float64(weight)
    check_finite(w, "weight")
    m, n = w.shape
    if method in ("asvd", "fwsvd", "svdllm", "drone-kfac"):
        where = "drone_hf.solver." + ("kfac.decompose_kfac" if method == "drone-kfac" else "peers.decompose_peer")
        raise ValueError(
            f"method={method!r} needs its own statistics: call {where} (the compression engine does this for you)."
        )
    if gram is None and method == "drone":
        raise ValueError("method='drone' needs the input Gram matrix; pass gram= or use method='svd'.")

    root = None  # Y-side factor of G: G = R Rᵀ, R = V Λ^{1/2}, for the error bookkeeping
    projector = None
    if gram is not None:
        g = as_float64(gram)
        if tuple(g.shape) != (n, n):
            raise ValueError(f"gram has shape {tuple(g.shape)} but the weight takes {n} inputs: expected ({n}, {n}).")
        check_finite(g, "gram")
        g = 0.5 * (g + g.T)
        lam, vec = (as_float64(eig[0]), as_float64(eig[1])) if eig is not None else torch.linalg.eigh(g)
        lam_max = float(lam[-1]) if lam.numel() else 0.0
        keep = lam > EIGEN_TOL * max(lam_max, 0.0)
        if lam_max <= 0.0:
            keep = torch.zeros_like(keep)
        root = vec[:, keep] * lam[keep].sqrt()

    if method == "svd":
        z = w
    elif damp > 0:
        assert gram is not None
        ridge = damp * float(torch.diagonal(g).mean())
        lam_d = lam.clamp_min(0.0) + ridge
        z = w @ (vec * lam_d.sqrt()) if ridge > 0 else w @ root
    else:
        z = w @ root
        projector = vec[:, keep]

    if z.shape[1] == 0:
        basis = w.new_zeros(m, 0)
        sing = w.new_zeros(0)
    else:
        basis, sing, _ = torch.linalg.svd(z, full_matrices=False)
        nonzero = sing > SINGULAR_TOL * float(sing[0]) if sing.numel() and float(sing[0]) > 0 else sing > 0
        basis, sing = basis[:, nonzero], sing[nonzero]

    captured, residual, total = output_energy(w, basis, root)
    return Decomposition(
        weight=w,
        basis=basis,
        projector=projector,
        captured=captured,
        residual=residual,
        total_energy=total,
        spectrum=sing**2,
        method=method,
    )


def decompose_output_gram(weight: torch.Tensor, output_gram: torch.Tensor) -> Decomposition:
    """The same DRONE optimum from the *output* Gram ``Σ y yᵀ = W G Wᵀ`` (``y = W x``, bias excluded).

    The rank-k optimum is ``[W X]_k = Q_k Q_kᵀ W X`` with ``Q_k`` the top eigenvectors of the output
    Gram, so the factors are ``up = Q_k``, ``down = Q_kᵀ W`` and the eigenvalues are ``σ_j(W X)²``
    directly. For a layer that narrows (an FFN output layer, 3072 -> 768) accumulating ``y yᵀ`` costs
    ``out²`` per token instead of ``in²``: 16x less there. Equal to :func:`decompose` with ``damp=0``
    on calibration data; directions calibration never saw keep ``Q_k Q_kᵀ W`` instead of mapping to
    zero (no input-side statistics exist to tell them apart). No damping in this form.

    Args:
        weight: [m, n].
        output_gram: [m, m], ``Σ (W x)(W x)ᵀ`` over the calibration tokens.
    """
    w = as_float64(weight)
    check_finite(w, "weight")
    m = w.shape[0]
    g = as_float64(output_gram)
    if tuple(g.shape) != (m, m):
        raise ValueError(f"output_gram has shape {tuple(g.shape)} but the weight has {m} outputs: expected ({m}, {m}).")
    check_finite(g, "output_gram")
    lam, vec = torch.linalg.eigh(0.5 * (g + g.T))
    lam, vec = lam.flip(0), vec.flip(1)  # largest first
    lam_max = float(lam[0]) if lam.numel() else 0.0
    keep = lam > SINGULAR_TOL**2 * lam_max if lam_max > 0 else torch.zeros_like(lam, dtype=torch.bool)
    captured = lam[keep].clamp_min(0.0)
    dropped = float(lam[~keep].clamp_min(0.0).sum())
    return Decomposition(
        weight=w,
        basis=vec[:, keep],
        projector=None,
        captured=captured,
        residual=dropped,
        total_energy=float(captured.sum()) + dropped,
        spectrum=captured.clone(),
        method="drone",
    )


def factorize(
    weight: torch.Tensor,
    gram: torch.Tensor | None,
    rank: int,
    *,
    method: str = "drone",
    damp: float = 0.0,
) -> Factorization:
    """One-shot convenience: :func:`decompose` then :meth:`Decomposition.factors`."""
    return decompose(weight, gram, method=method, damp=damp).factors(rank)
