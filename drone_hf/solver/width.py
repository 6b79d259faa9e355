"""MLP width pruning: which intermediate neurons of an MLP block to drop, and the compensated
output layer for the ones kept (``DroneConfig(prune_mlp=True)``). Pure torch.

An MLP block ``y = W_out act(W_in x)`` (gated: ``act(gate x) * (up x)``) can shrink by dropping
intermediate neurons: each removes a row of every input layer and a column of ``W_out``, and its
error lives in one place, ``W_out``'s input ``h``. That is a column-subset problem with a closed form
of the same kind as DRONE's:

* **Compensation** (kept set ``S``): ``W'_S = W G[:, S] G[S, S]⁻¹`` minimises ``||W h - W'_S h_S||``
  over the calibration activations (``G = Σ h hᵀ``, ridge ``damp · mean(diag G)``), for any output
  weighting ``H``: a loss-aware metric changes *which* neurons go, not the compensation.
* **Selection**: Optimal Brain Surgeon on that quadratic, ``step`` neurons at a time. With
  ``P = G⁻¹`` over the kept set and ``W`` the compensated weight so far, removing a block ``J`` raises
  ``tr(H W (G - G_S-projection) Wᵀ)`` by exactly ``tr(H W_J P_JJ⁻¹ W_Jᵀ)``; the ``step`` cheapest
  single neurons form each block, and ``P`` and ``W`` are downdated in closed form (Schur complement).
  ``H`` is the damped output-gradient Gram of loss-aware DRONE (``method="drone-kfac"``), so the
  costs are predicted loss increases on the same scale as its ranks' (``loss_scale``), or the
  identity (``method="drone"``): squared output error, like DRONE's own objective.

The removal order is greedy (a block at a time), so the curve is an upper bound of each width's
best subset; the cost of every step on it is exact for the quadratic model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kfac import DEFAULT_KFAC_DAMP

#: Ridge of the intermediate-activation Gram, relative to its mean diagonal: its inverse drives
#: selection and compensation, and a neuron that never fires makes the raw Gram singular. The value
#: of the SmolLM2 study (``benchmarks/lm_width_pruning.py``).
WIDTH_DAMP = 0.01
#: At most this fraction of a block's neurons can go (the search range of the elimination).
MAX_PRUNED = 0.8


def width_step(width: int) -> int:
    """Neurons removed per elimination step: 8 (the SmolLM2 study's grid) up to widths of 1536,
    then ``width // 192`` so that a wide MLP (11008 neurons) keeps the walk to ~150 steps."""
    return max(1, min(8, width // 8), width // 192)


def _ridge(matrix: torch.Tensor, damp: float) -> float:
    """``damp · mean(diag)``: the ridge :func:`_damped` adds."""
    return damp * float(matrix.diagonal().double().mean())


def _damped(matrix: torch.Tensor, damp: float) -> torch.Tensor:
    m = 0.5 * (matrix + matrix.T).double()
    return m + _ridge(m, damp) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


@dataclass
class WidthCurve:
    """The elimination of one block's intermediate neurons.

    Attributes:
        order: neuron indices in removal order (``step`` per step).
        losses: ``losses[s]``: the cost after ``s + 1`` steps, cumulative (predicted mean-loss
            increase with an output Gram, squared output error without).
        step: neurons per step.
        width: the block's full width.
        energy: ``tr(H W G Wᵀ)`` of the dense output layer (undamped ``G``): divides a cost into a
            relative squared error.
    """

    order: list[int]
    losses: list[float]
    step: int
    width: int
    energy: float

    def kept(self, steps: int) -> list[int]:
        """The neurons kept after ``steps`` steps, ascending (the narrowed layers' order)."""
        gone = set(self.order[: steps * self.step])
        return [j for j in range(self.width) if j not in gone]


def eliminate_neurons(
    weight: torch.Tensor,
    gram: torch.Tensor,
    out_gram: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    step: int | None = None,
    max_removed: int | None = None,
    damp: float = WIDTH_DAMP,
    kfac_damp: float = DEFAULT_KFAC_DAMP,
) -> WidthCurve:
    """Order in which the input neurons of the output layer ``weight`` (``[out, width]``) go.

    Args:
        weight: the output layer's weight, ``[out, width]``.
        gram: ``Σ h hᵀ`` of its input (``[width, width]``).
        out_gram: the output-gradient Gram ``H`` (``[out, out]``), damped by ``kfac_damp`` like
            loss-aware DRONE's; ``None`` for the identity.
        loss_scale: multiplies every cost (loss-aware DRONE's ``1 / (2 · samples · tokens)``).
        step: neurons per step (default :func:`width_step`).
        max_removed: most neurons removed (default ``MAX_PRUNED`` of the width).
    """
    width = weight.shape[1]
    step = width_step(width) if step is None else step
    max_removed = int(MAX_PRUNED * width) if max_removed is None else max_removed
    if step < 1:
        raise ValueError(f"step={step} must be at least 1 neuron.")
    w = weight.detach().double().clone()
    g = gram.detach().double().to(w.device)
    p = torch.linalg.inv(_damped(g, damp))
    h = None if out_gram is None else _damped(out_gram.detach().to(w.device), kfac_damp)
    hw = w if h is None else h @ w
    energy = float(torch.trace(hw @ (0.5 * (g + g.T)) @ w.T))
    hw = hw.clone()
    alive = torch.ones(width, dtype=torch.bool, device=w.device)
    order: list[int] = []
    losses: list[float] = []
    total = 0.0
    while len(order) + step <= max_removed:
        single = (hw * w).sum(0) / p.diagonal()
        single[~alive] = float("inf")
        block = torch.topk(single, step, largest=False).indices
        inv = torch.linalg.inv(p[block][:, block])
        total += float(torch.trace(w[:, block].T @ hw[:, block] @ inv)) * loss_scale
        rows = p[block]  # the Schur downdate of the inverse and of the compensated weight
        w -= w[:, block] @ inv @ rows
        hw -= hw[:, block] @ inv @ rows
        p -= p[:, block] @ inv @ rows
        alive[block] = False
        order.extend(int(j) for j in block)
        losses.append(max(total, 0.0))
    return WidthCurve(order, losses, step, width, energy * loss_scale)


def compensated_weight(weight: torch.Tensor, gram: torch.Tensor, keep: list[int],
                       damp: float = WIDTH_DAMP, cross: torch.Tensor | None = None) -> torch.Tensor:
    """``W G[:, S] G[S, S]⁻¹``: the output layer on the kept neurons ``S`` (``[out, |S|]``, in
    ``weight``'s dtype), least squares on the calibration activations; computed from the Gram
    itself, not the elimination's running update.

    With ``cross`` (``C = Σ h ĥᵀ``, dense activations ``h`` times those ``ĥ`` of a partly compressed
    model, whose Gram ``gram`` is then): ``W C[:, S] Ĝ[S, S]⁻¹``, the least-squares fit of the dense
    outputs ``W h`` from the compressed model's kept neurons (``sequential="compensated"``). The ridge
    ``λ = damp · mean(diag Ĝ)`` pulls toward the dense columns ``W[:, S]`` in both forms (its
    numerator is ``W C[:, S] + λ W[:, S]``, which is ``W (G + λI)[:, S]`` without ``cross``).
    """
    g = _damped(gram.detach().to(weight.device), damp)
    index = torch.tensor(keep, device=weight.device)
    w = weight.detach().double()
    if cross is None:
        target = w @ g[:, index]
    else:
        target = w @ cross.detach().double().to(w.device)[:, index] + _ridge(gram, damp) * w[:, index]
    solved = torch.linalg.solve(g[index][:, index], target.T).T
    return solved.to(weight.dtype)
