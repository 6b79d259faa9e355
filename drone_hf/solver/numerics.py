"""Numerical policy of the solver: precision, tolerances and input checks.

All solves run in float64: a Gram matrix squares the dynamic range of the activations, and the
eigenvalues that decide what is kept span many decades. Tolerances are relative to the largest
eigen/singular value, so scaling the inputs or the weight never changes which directions are kept.
"""

from __future__ import annotations

import torch

#: Eigenvalues of the Gram below ``EIGEN_TOL · λ_max`` count as directions calibration never saw.
#: They include the exact zeros of rank-deficient statistics (a pooler sees only [CLS], GELU
#: outputs have dead directions) and the negative round-off of a float32-accumulated Gram.
EIGEN_TOL = 1e-10

#: Singular values of ``W X`` below ``SINGULAR_TOL · σ_max`` carry no calibration signal: ranks
#: beyond them are clamped (the real rank is recorded, never a padded one).
SINGULAR_TOL = 1e-7


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU-or-same-device copy that never aliases the caller's tensor."""
    return t.detach().to(dtype=torch.float64, copy=True)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf early: an eigendecomposition would silently spread them everywhere."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{what} contains {bad} non-finite value(s) (NaN or inf); the calibration statistics are "
            "unusable. Check the model's dtype (fp16 activations can overflow: load with dtype=torch.float32) "
            "and the calibration texts."
        )
