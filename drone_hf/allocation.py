"""Choosing each layer's rank from a budget. Pure bookkeeping: no model runs here (see ``search.py``).

Three strategies:

* **uniform**: every targeted layer keeps the same fraction ``r`` of its weights, rank
  ``floor(r · in·out / (in+out))``. For speed or loss budgets the one scalar ``r`` is searched.
* **greedy**: a global knapsack on the spectra the solver gives for free. Each layer has candidate
  ranks (a grid) with a cost (parameters, or measured seconds) and a predicted loss
  ``weight · relative_error(k)²``, where ``weight`` is the layer's measured sensitivity (end-to-end
  loss increase per unit of its own squared calibration error). Starting from all-dense, it takes
  the move with the least predicted loss per unit of cost saved (walking each layer's lower convex
  hull) until the budget is met. Layers never factored at a cost above dense.
* **drone**: the paper's Algorithm 2 (in ``search.py``: it evaluates the model as it goes).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

ALLOCATIONS = ("uniform", "greedy", "drone")


def uniform_rank(out_features: int, in_features: int, param_ratio: float) -> int:
    """The largest rank whose factors keep at most ``param_ratio`` of the layer's weights (>= 1).

    ``param_ratio = 1`` gives the break-even rank ``in·out / (in + out)``: as many parameters as the
    dense layer, and fewer than full rank, so it is not lossless.
    """
    if not 0 < param_ratio <= 1:
        raise ValueError(f"param_ratio={param_ratio!r} must be in (0, 1].")
    k = math.floor(param_ratio * out_features * in_features / (out_features + in_features) + 1e-9)
    return max(1, min(k, out_features, in_features))


def check_fixed_rank(name: str, rank: int, out_f: int, in_f: int) -> None:
    """A user-fixed rank must exist for the layer's shape."""
    if rank > min(out_f, in_f):
        raise ValueError(
            f"ranks asks for rank {rank} on {name!r}, but a {out_f}x{in_f} layer has rank at most {min(out_f, in_f)}; "
            f"use a rank in [1, {min(out_f, in_f)}] (below {out_f * in_f // (out_f + in_f)} to save parameters)."
        )


def allocate_ranks(
    shapes: dict[str, tuple[int, int]],
    param_ratio: float,
    fixed: dict[str, int] | None = None,
) -> dict[str, int]:
    """Uniform ranks: ``fixed`` where given, else the uniform rank for ``param_ratio``.

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
        else:
            check_fixed_rank(name, k, out_f, in_f)
        ranks[name] = k
    return ranks


@dataclass
class LayerOptions:
    """The choices for one layer: stay dense, or take one of ``ranks``.

    Attributes:
        name: layer name.
        dense_cost: cost of the dense layer (parameters or seconds).
        ranks: candidate ranks.
        costs: cost at each candidate rank.
        errors: relative squared calibration error at each candidate rank.
        weight: sensitivity, predicted loss per unit of relative squared error (>= 0).
    """

    name: str
    dense_cost: float
    ranks: list[int]
    costs: list[float]
    errors: list[float]
    weight: float = 1.0
    _hull: list[tuple[float, float, int | None]] = field(default_factory=list, repr=False)

    def hull(self) -> list[tuple[float, float, int | None]]:
        """(cost, predicted loss, rank) on the lower convex hull, from dense (rank ``None``) down.

        Only options cheaper than dense count; dominated options (another is cheaper and no worse)
        and options a mix of neighbours beats are dropped, so greedy steps along the hull have
        non-decreasing loss per unit of cost saved.
        """
        if self._hull:
            return self._hull
        # dense gets a loss just below zero so that no option ever dominates the starting point
        options = zip(self.ranks, self.costs, self.errors, strict=True)
        cheaper = [(c, self.weight * e, k) for k, c, e in options if c < self.dense_cost]
        points = [(self.dense_cost, -1e-300, None)] + cheaper
        points.sort(key=lambda p: (p[0], p[1]))
        pareto, best = [], math.inf  # ascending cost, strictly descending loss
        for p in points:
            if p[1] < best:
                pareto.append(p)
                best = p[1]
        lower: list[tuple[float, float, int | None]] = []  # monotone-chain lower hull
        for p in pareto:
            while len(lower) >= 2:
                (x1, y1, _), (x2, y2, _) = lower[-2], lower[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) < 0:
                    lower.pop()
                else:
                    break
            lower.append(p)
        self._hull = [(c, max(loss, 0.0), k) for c, loss, k in reversed(lower)]
        return self._hull


def walk_hulls(hulls: dict[str, list[tuple[float, float, int | None]]]) -> list[tuple[float, float, dict]]:
    """Walk several layers' hulls (:meth:`LayerOptions.hull`) together, cheapest predicted loss per
    unit of cost first: the options of the group as one unit, one per step, as ``(total cost, total
    predicted loss, name -> rank of every layer not dense)``. The walk is the greedy allocation's own
    (the layers are separable), so each point is what the walk would pick at that group cost."""
    pos = dict.fromkeys(hulls, 0)
    cost, loss = sum(h[0][0] for h in hulls.values()), 0.0
    out = []
    while True:
        moves = [((h[pos[n] + 1][1] - h[pos[n]][1]) / (h[pos[n]][0] - h[pos[n] + 1][0]), n)
                 for n, h in hulls.items() if pos[n] + 1 < len(h)]
        if not moves:
            return out
        n = min(moves)[1]
        h = hulls[n]
        cost -= h[pos[n]][0] - h[pos[n] + 1][0]
        loss += h[pos[n] + 1][1] - h[pos[n]][1]
        pos[n] += 1
        out.append((cost, loss, {m: hulls[m][pos[m]][2] for m in hulls if hulls[m][pos[m]][2] is not None}))


@dataclass
class Allocation:
    """Result of a greedy allocation.

    Attributes:
        ranks: name -> rank for factored layers (layers left dense are absent).
        cost: total cost of the targeted layers after allocation.
        dense_cost: total cost if all stay dense.
        predicted_loss: sum of ``weight · error`` over factored layers.
        reachable: whether the budget was met.
    """

    ranks: dict[str, int]
    cost: float
    dense_cost: float
    predicted_loss: float
    reachable: bool


def greedy_allocate(
    options: list[LayerOptions], max_cost: float | None = None, max_loss: float | None = None
) -> Allocation:
    """Walk the layers' hulls, cheapest predicted loss per unit cost first.

    Exactly one of ``max_cost`` (stop once the total cost is within it) and ``max_loss`` (take
    moves while the predicted loss stays within it) must be given. With ``max_cost`` the walk may
    end above it when every layer is already at its cheapest option: ``reachable`` is then False
    and the allocation is the cheapest one possible.
    """
    if (max_cost is None) == (max_loss is None):
        raise ValueError("greedy_allocate needs exactly one of max_cost and max_loss.")
    pos = {o.name: 0 for o in options}
    hulls = {o.name: o.hull() for o in options}
    cost = sum(o.dense_cost for o in options)
    dense_cost = cost
    loss = 0.0
    heap: list[tuple[float, int, str]] = []
    order = {o.name: i for i, o in enumerate(options)}

    def push(name: str) -> None:
        h, i = hulls[name], pos[name]
        if i + 1 < len(h):
            saved = h[i][0] - h[i + 1][0]
            heapq.heappush(heap, ((h[i + 1][1] - h[i][1]) / saved, order[name], name))

    for o in options:
        push(o.name)
    while heap:
        if max_cost is not None and cost <= max_cost:
            break
        _, _, name = heapq.heappop(heap)
        h, i = hulls[name], pos[name]
        step_loss = h[i + 1][1] - h[i][1]
        if max_loss is not None and loss + step_loss > max_loss:
            continue  # this layer's next step does not fit; others may
        cost -= h[i][0] - h[i + 1][0]
        loss += step_loss
        pos[name] = i + 1
        push(name)
    ranks = {n: hulls[n][i][2] for n, i in pos.items() if hulls[n][i][2] is not None}
    reachable = max_cost is None or cost <= max_cost * (1 + 1e-9)
    return Allocation(ranks=ranks, cost=cost, dense_cost=dense_cost, predicted_loss=loss, reachable=reachable)
