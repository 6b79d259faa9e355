"""The reference optimum for the solver's property tests, with the solver's eigenvalue cut-off.

The solver treats Gram eigen-directions with ``λ <= EIGEN_TOL · λ_max`` as never seen (a
pseudo-inverse cut-off) and maps them to zero. Random square ``X`` is occasionally that close to
singular (``m, n, t, seed = 2, 8, 8, 7995`` in ``test_numerics``: λ_min/λ_max = 8e-11), and there
plain Eckart-Young on ``W X`` is below what any such ``W'`` can reach by ``||W X_u||`` (~1e-5 of
``||W X||``): the references below account for it exactly instead of loosening the tolerance.
"""

from __future__ import annotations

import math

import torch

from drone_hf.solver.numerics import EIGEN_TOL


def optimum(w: torch.Tensor, x: torch.Tensor, k: int) -> float:
    """Eckart-Young: no rank-k ``W'`` does better than ``sqrt(Σ_{j>k} σ_j(W X)²)``."""
    s = torch.linalg.svdvals(w @ x)
    return float(s[k:].pow(2).sum().sqrt())


def unseen_part(x: torch.Tensor) -> torch.Tensor:
    """The part of ``X`` along the Gram's eigenvectors below the cut-off (zero for most ``X``)."""
    lam, v = torch.linalg.eigh(x @ x.T)
    drop = v[:, lam <= EIGEN_TOL * float(lam.max())]
    return drop @ (drop.T @ x)


def reachable_optimum(w: torch.Tensor, x: torch.Tensor, k: int) -> float:
    """The least ``||(W - W') X||`` over rank-k ``W'`` that are zero on the unseen part ``X_u``. The
    error splits orthogonally (``G`` is block-diagonal in its eigenvectors): Eckart-Young on the seen
    part plus ``||W X_u||``, which no such ``W'`` removes. Equals :func:`optimum` when nothing is cut."""
    unseen = unseen_part(x)
    return math.sqrt(optimum(w, x - unseen, k) ** 2 + float(torch.linalg.matrix_norm(w @ unseen)) ** 2)
