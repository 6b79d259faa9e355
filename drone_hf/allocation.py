"""Choosing each layer's rank from a budget.

This release allocates uniformly: every targeted layer keeps the same fraction of its weight
parameters. A rank-k pair of an ``out x in`` layer has ``k·(in + out)`` parameters, so keeping a
fraction ``r`` means ``k = floor(r · in·out / (in + out))``.
"""

from __future__ import annotations

import math


def uniform_rank(out_features: int, in_features: int, param_ratio: float) -> int:
    """The largest rank whose factors keep at most ``param_ratio`` of the layer's weights (>= 1).

    ``param_ratio = 1`` gives the break-even rank ``in·out / (in + out)``: as many parameters as the
    dense layer, and fewer than full rank, so it is not lossless.
    """
    if not 0 < param_ratio <= 1:
        raise ValueError(f"param_ratio={param_ratio!r} must be in (0, 1].")
    k = math.floor(param_ratio * out_features * in_features / (out_features + in_features) + 1e-9)
    return max(1, min(k, out_features, in_features))


def allocate_ranks(
    shapes: dict[str, tuple[int, int]],
    param_ratio: float,
    fixed: dict[str, int] | None = None,
) -> dict[str, int]:
    """Rank per layer: ``fixed`` where given, else the uniform rank for ``param_ratio``.

    Args:
        shapes: name -> (out_features, in_features).
        param_ratio: fraction of weight parameters kept per layer.
        fixed: name -> rank chosen by the user (validated against the shape).

    Raises:
        ValueError: a fixed rank exceeds ``min(out, in)``, the largest rank the layer has.
    """
    ranks = {}
    for name, (out_f, in_f) in shapes.items():
        k = (fixed or {}).get(name)
        if k is None:
            k = uniform_rank(out_f, in_f, param_ratio)
        elif k > min(out_f, in_f):
            raise ValueError(
                f"ranks asks for rank {k} on {name!r}, but a {out_f}x{in_f} layer has rank at most {min(out_f, in_f)}; "
                f"use a rank in [1, {min(out_f, in_f)}] (below {out_f * in_f // (out_f + in_f)} to save parameters)."
            )
        ranks[name] = k
    return ranks
