"""Numerical policy of the solver: precision, tolerances and input checks.

All solves run in float64: a Gram matrix squares the dynamic range of the activations, and the
eigenvalues that decide what is kept span many decades. Tolerances are relative to the largest
eigen/singular value, so scaling the inputs or the weight never changes which directions are kept.
"""

from __future__ import annotations

import math

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


def check_damp(damp: float) -> None:
    """Refuse a ridge that is not a finite number >= 0 (every solver's ``damp``; bools too: ``True``
    is a mistake, not a damping of 1)."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp={damp!r} must be a finite number >= 0 (0 = exact DRONE optimum).")


def cast_factors(
    up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype, what: str = "the factors"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Cast float64 factors to the model's ``dtype`` and measure what the cast cost.

    The solve runs in float64; a float16/bfloat16 model stores its factors in its own dtype, which
    rounds them (bfloat16 keeps 8 bits of mantissa) and could, in principle, overflow float16's
    65504. The factors are balanced (``up``'s column j and ``down``'s row j share one norm), which
    keeps their entries near ``sqrt`` of the weight's scale, so overflow needs an absurd weight; it is
    still checked rather than left to produce inf outputs.

    Returns:
        ``(up, down, cast_error)``: the cast tensors and ``||up_c down_c - up down||_F / ||up down||_F``
        (0 for an all-zero product), the relative change of the layer's weight caused by the cast.

    Raises:
        ValueError: a factor does not fit ``dtype`` (it would hold inf).
    """
    up_c, down_c = up.to(dtype), down.to(dtype)
    if not (bool(torch.isfinite(up_c).all()) and bool(torch.isfinite(down_c).all())):
        largest = max(float(up.abs().max()), float(down.abs().max()))
        raise ValueError(
            f"{what} overflow {dtype} (largest entry {largest:.3g}); the factored layer cannot be stored in the "
            "model's dtype. Load the model in float32 (dtype=torch.float32) or bfloat16, or keep this layer dense "
            "with modules_to_not_convert."
        )
    exact = up.to(torch.float64) @ down.to(torch.float64)
    norm = float(torch.linalg.matrix_norm(exact))
    if norm == 0.0:
        return up_c, down_c, 0.0
    diff = up_c.to(torch.float64) @ down_c.to(torch.float64) - exact
    return up_c, down_c, float(torch.linalg.matrix_norm(diff)) / norm
