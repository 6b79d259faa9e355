"""The width stage of the engine: MLP width pruning allocated with the low-rank ranks
(``DroneConfig(prune_mlp=True)``).

:func:`drone_hf.compress.compress_in_place` runs it beside its linear stage:

1. :class:`WidthStage` (before calibration): find the MLP blocks whose projections are all free
   targets (:func:`~drone_hf.modules.mlp_blocks.find_mlp_blocks`); their output layers are observed
   on their input (the intermediate activations), whatever their shape.
2. :meth:`~WidthStage.take_statistics` (after the calibration pass): per block, the neuron
   elimination of :mod:`drone_hf.solver.width` on the output layer's input Gram (and, for
   ``method="drone-kfac"``, its output-gradient Gram: predicted loss increases).
3. :meth:`~WidthStage.merge` (inside the planner's greedy walk): each block becomes one allocation
   unit in place of its projections' layer options. Its options are the pruned widths and the
   factored combinations of its projections (their own greedy walk over the layers' hulls), and
   the block takes the better of the two on their lower convex hull. One walk then spreads the
   budget over attention ranks, factored MLPs and pruned MLPs by predicted loss per parameter.
4. :meth:`~WidthStage.replacements` and :meth:`~WidthStage.record`: narrowed ``nn.Linear`` /
   ``Conv1D`` layers, the output layer least-squares compensated, and ``mlp_widths`` in the config.

Predicted losses: with ``drone-kfac`` pruning and ranks are on one scale (K-FAC), with ``drone`` a
pruned width's squared output error relative to the output layer's energy is weighed by that
layer's sensitivity, like its ranks' errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .allocation import LayerOptions, walk_hulls
from .config import DroneConfig
from .modules.low_rank_linear import dense_weight_of
from .modules.mlp_blocks import MlpBlock, find_mlp_blocks, layer_shape, narrow_block
from .solver.width import WidthCurve, compensated_weight, eliminate_neurons

#: Marks an allocation unit that stands for a whole MLP block (never a layer name).
UNIT_PREFIX = "mlp-block:"
#: Time budgets measure the narrowed layers at every this many elimination steps (and the narrowest
#: width) and interpolate between: see :meth:`WidthStage.anchor_widths`.
ANCHOR_STEPS = 8


class WidthStage:
    """Width pruning of one compression run (see the module docstring)."""

    def __init__(self, model: nn.Module, config: DroneConfig, targets: dict[str, tuple[str, nn.Module]],
                 fixed: dict[str, int]) -> None:
        self.model, self.config, self.targets = model, config, targets
        free = {c for c in targets if c not in fixed}
        self.blocks: dict[str, MlpBlock] = {b.name: b for b in find_mlp_blocks(model, free)}
        if not self.blocks:
            pinned = list(fixed)
            raise ValueError(
                "prune_mlp=True found no MLP block to prune: it needs each block's projections (gate_proj/up_proj/"
                "down_proj, intermediate.dense/output.dense, lin1/lin2, c_fc/c_proj or fc1/fc2) all targeted"
                + (f" and none pinned by ranks= (pinned: {pinned[:3]})" if pinned else "")
                + ". Target them (target_modules) or drop prune_mlp."
            )
        self.curves: dict[str, WidthCurve] = {}
        self._grams: dict[str, torch.Tensor] = {}
        self._labels: dict[str, list[tuple[str, Any]]] = {}
        self._layers: dict[tuple[str, int], dict[str, nn.Module]] = {}

    @property
    def outputs(self) -> set[str]:
        """The blocks' output layers: observed on their input (the neurons), never on their output."""
        return {b.output for b in self.blocks.values()}

    def take_statistics(self, grams: dict[str, torch.Tensor], peer_stats: dict[str, dict[str, Any]],
                        show_progress: bool = True) -> None:
        """The elimination curve of every block, from its output layer's input Gram ``grams``."""
        kfac = self.config.method == "drone-kfac"
        bar = hf_logging.tqdm(list(self.blocks.values()), desc="Pruning MLP widths", unit="block",
                              disable=not show_progress or None)
        for block in bar:
            layer = self._layer(block.output)
            stats = peer_stats.get(block.output, {}) if kfac else {}
            self._grams[block.name] = grams[block.output]
            self.curves[block.name] = eliminate_neurons(
                dense_weight_of(layer), grams[block.output], out_gram=stats.get("out_gram"),
                loss_scale=stats.get("loss_scale", 1.0), kfac_damp=self.config.kfac_damp,
            )

    # --- allocation ------------------------------------------------------------------------------
    def merge(self, options: list[LayerOptions], weights: dict[str, float], curvature: bool,
              width_cost: Callable[[str, int], float] | None = None) -> list[LayerOptions]:
        """``options`` with each block's projections replaced by one unit for the whole block.

        ``width_cost(block, width)`` is a narrowed block's cost on the scale of ``options``' costs
        (the planner's measured seconds for a time budget); ``None``: its weight parameters.
        """
        by_name = {o.name: o for o in options}
        members = {m for b in self.blocks.values() for m in b.members}
        out = [o for o in options if o.name not in members]
        for block in self.blocks.values():
            out.append(self._unit(block, [by_name[m] for m in block.members], weights, curvature, width_cost))
        return out

    def _unit(self, block: MlpBlock, member_options: list[LayerOptions], weights: dict[str, float],
              curvature: bool, width_cost: Callable[[str, int], float] | None) -> LayerOptions:
        labels: list[tuple[str, Any]] = []
        costs: list[float] = []
        losses: list[float] = []
        curve = self.curves[block.name]
        scale = 1.0 if curvature else weights.get(block.output, 1.0) / max(curve.energy, 1e-300)
        for s, loss in enumerate(curve.losses, 1):
            width = self.width(block.name, s)
            labels.append(("width", s))
            costs.append(float(width_cost(block.name, width) if width_cost is not None
                               else sum(o * i for o, i in self.narrowed_shapes(block.name, width))))
            losses.append(loss * scale)
        # the factored block: the projections' hulls walked together, cheapest loss per parameter first
        for cost, loss, ranks in walk_hulls({o.name: o.hull() for o in member_options}):
            labels.append(("ranks", ranks))
            costs.append(cost)
            losses.append(loss)
        unit = UNIT_PREFIX + block.name
        self._labels[unit] = labels
        dense = float(sum(o.dense_cost for o in member_options))
        return LayerOptions(unit, dense, list(range(len(labels))), costs, losses, 1.0)

    def decode(self, chosen: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
        """A greedy allocation over merged units -> (layer ranks, pruned blocks' elimination steps)."""
        ranks, steps = {}, {}
        for name, k in chosen.items():
            if not name.startswith(UNIT_PREFIX):
                ranks[name] = k
                continue
            kind, value = self._labels[name][k]
            if kind == "width":
                steps[name[len(UNIT_PREFIX):]] = value
            else:
                ranks.update(value)
        return ranks, steps

    # --- the narrowed layers ---------------------------------------------------------------------
    def width(self, block: str, steps: int) -> int:
        return self.blocks[block].width - steps * self.curves[block].step

    def narrowed_shapes(self, block: str, width: int) -> list[tuple[int, int]]:
        """(out, in) of each of the block's layers narrowed to ``width`` neurons."""
        b = self.blocks[block]
        return [(width, self._shape(m)[1]) for m in b.inputs] + [(self._shape(b.output)[0], width)]

    def anchor_widths(self, block: str) -> list[int]:
        """The widths a time budget measures (descending): the block's own, every
        :data:`ANCHOR_STEPS`-th candidate and the narrowest. Matmul time is close to linear in one
        dimension between these, and measuring all ~150 candidates of a 3072-neuron block at a batch
        of 4096 tokens would take minutes; the speed budget's closed loop then times the whole model."""
        steps = len(self.curves[block].losses)
        return sorted({self.width(block, s) for s in [*range(0, steps + 1, ANCHOR_STEPS), steps]}, reverse=True)

    def replacements(self, steps: dict[str, int]) -> dict[str, nn.Module]:
        """Full name -> narrowed layer for every block pruned by ``steps`` elimination steps (cached)."""
        out: dict[str, nn.Module] = {}
        for name, s in steps.items():
            if (name, s) not in self._layers:
                self._layers[(name, s)] = self._narrowed(name, s, self._grams[name])
            out.update(self._layers[(name, s)])
        return out

    def _narrowed(self, name: str, steps: int, gram: torch.Tensor, cross: torch.Tensor | None = None
                  ) -> dict[str, nn.Module]:
        """Block ``name`` narrowed by ``steps`` elimination steps, its output layer compensated on
        ``gram`` (and ``cross``, see :func:`~drone_hf.solver.width.compensated_weight`)."""
        block, keep = self.blocks[name], self.curves[name].kept(steps)
        weight = compensated_weight(dense_weight_of(self._layer(block.output)), gram, keep, cross=cross)
        return narrow_block(self.targets, block, keep, weight)

    def sequential_blocks(self, steps: dict[str, int]) -> dict[str, tuple[tuple[str, ...], int]]:
        """Output layer -> (input layers, kept width) of every block pruned by ``steps``: what
        :func:`~drone_hf.sequential.compress_sequentially` narrows."""
        return {self.blocks[n].output: (self.blocks[n].inputs, self.width(n, s)) for n, s in steps.items()}

    def narrowed_from(self, steps: dict[str, int], output: str, stats: Any) -> dict[str, nn.Module]:
        """The narrowed layers of the block whose output layer is ``output``, its compensated weight
        re-solved on the sequential pass's statistics ``stats`` of that layer's input: a
        ``GramObserver`` (``Ĝ`` of the compressed stream: ``W Ĝ[:, S] Ĝ[S, S]⁻¹``) or a
        ``PairedObserver`` (``sequential="compensated"``: ``W C[:, S] Ĝ[S, S]⁻¹``, the dense outputs
        fitted). The kept neurons ``S`` are the one-shot plan's, as the ranks are."""
        name = next(n for n in steps if self.blocks[n].output == output)
        return self._narrowed(name, steps[name], stats.gram, getattr(stats, "cross", None))

    def parameters(self, steps: dict[str, int]) -> dict[str, int]:
        """Canonical name -> weight parameters of each narrowed layer."""
        out = {}
        for name, s in steps.items():
            block = self.blocks[name]
            for m, (o, i) in zip([*block.inputs, block.output], self.narrowed_shapes(name, self.width(name, s)),
                                 strict=True):
                out[m] = o * i
        return out

    def _layer(self, canonical: str) -> nn.Module:
        return self.targets[canonical][1]  # the dense layer, whatever is swapped in right now

    def _shape(self, canonical: str) -> tuple[int, int]:
        return layer_shape(self._layer(canonical))

    def record(self, config: DroneConfig, steps: dict[str, int]) -> None:
        config.mlp_widths = {
            name: {"width": self.width(name, s), "original": self.blocks[name].width} for name, s in steps.items()
        }

