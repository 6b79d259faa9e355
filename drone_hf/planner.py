"""``RankPlanner``: from a budget (size, speed or loss) and the solved layers to one rank per layer.

The solver has already decomposed every targeted layer, so any rank's factors and calibration
error are at hand. The planner adds what a budget needs: parameter counts, measured layer and
end-to-end latency (:mod:`drone_hf.latency`), layer sensitivities and held-out loss
(:mod:`drone_hf.search`), and records what it decided and what it measured in ``result``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .allocation import LayerOptions, greedy_allocate, uniform_rank
from .config import DroneConfig
from .latency import LatencyModel, rank_grid
from .modules.low_rank_linear import DroneLinear
from .search import LossEvaluator, Swapper, drone_search, end_to_end_times, fisher_sensitivities, probe_sensitivities
from .solver import Decomposition
from .utils.allocator import KEPT, freed_memory_kept
from .utils.logging import get_logger
from .utils.page_faults import GLIBC_REUSE_TUNABLES, PageFaults, worth_noting
from .utils.positions import usable_positions
from .width_stage import WidthStage

logger = get_logger(__name__)

#: Uniform budgets searched for speed/loss budgets: the kept fraction r, finest near the top.
UNIFORM_STEPS = [round(1 - 0.05 * i, 2) for i in range(20)]

#: Allocations measured end to end for a speed budget (the first plus re-allocations).
VERIFY_ROUNDS = 4
#: A measured speedup above ``target * (1 + SPEED_SLACK)`` is re-allocated with more time: the
#: per-layer latency model can be pessimistic (MPNet at 32x128: predicted 2.0x, ran 2.7x), and every
#: bit of speed beyond the target was paid for in accuracy.
SPEED_SLACK = 0.05
#: Timed and warm-up forward passes per variant in one end-to-end measurement.
END_TO_END_REPEATS, END_TO_END_WARMUP = 9, 2
_page_fault_noted = False


def corrected_budget(
    at: float,
    took: float,
    goal: float,
    measured_at: list[tuple[float, float]],
    met_at: float | None,
    missed_at: float | None,
) -> float:
    """The next layer-time budget of a speed budget's closed loop.

    ``at`` gave an allocation whose compressed forward took ``took`` (in the dense run's seconds);
    ``goal`` is the time asked for. Compressed time rises with the budget in steps (ranks are on a
    grid), and measurements are noisy. Once a budget that met the target (``met_at``) and one that
    missed it (``missed_at``) are known, the next budget bisects them: on a step function
    interpolation keeps landing on one side. Before that it is a secant step, with the slope of the
    last two measured rounds where they differ in budget (clamped to [0.25, 4]: one noisy pair must
    not send the budget far), else slope 1: a budget's seconds are the layers' seconds, and what the
    step corrects is mostly the remainder of the forward pass, which the per-layer model
    mispredicts. Never below a quarter of ``at``.
    """
    if met_at is not None and missed_at is not None:
        return (met_at + missed_at) / 2
    slope = 1.0
    if len(measured_at) >= 2:
        (b0, t0), (b1, t1) = measured_at[-2:]
        if b1 != b0 and (t1 - t0) / (b1 - b0) > 0:
            slope = min(max((t1 - t0) / (b1 - b0), 0.25), 4.0)
    return max(at + (goal - took) / slope, at / 4)


class RankPlanner:
    """Chooses ranks for the targeted layers of one compression run (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        config: DroneConfig,
        targets: dict[str, tuple[str, nn.Module]],
        shapes: dict[str, tuple[int, int]],
        decompositions: dict[str, Decomposition],
        fixed: dict[str, int],
        tokenizer: Any,
        show_progress: bool,
    ) -> None:
        self.model, self.config, self.targets = model, config, targets
        self.shapes, self.decompositions, self.fixed = shapes, decompositions, fixed
        self.tokenizer, self.show_progress = tokenizer, show_progress
        self.free = [c for c in targets if c not in fixed]
        self.evaluation_batches: list[dict[str, torch.Tensor]] = []
        self.result: dict[str, Any] = {}
        self._layers: dict[tuple[str, int], DroneLinear] = {}
        self._swapper = Swapper(model, {full: layer for full, layer in targets.values()})
        self._evaluator: LossEvaluator | None = None
        self._latency: LatencyModel | None = None
        self._faults_per_pass: list[float] = []
        #: ``prune_mlp=True``: the width stage, and the elimination steps of the blocks the plan prunes
        self.width: WidthStage | None = None
        self.width_steps: dict[str, int] = {}

    # --- building blocks -------------------------------------------------------------------------
    def effective_rank(self, c: str, k: int) -> int:
        """The rank the factors really have: calibration may span fewer dimensions than ``k``."""
        return max(1, min(k, self.decompositions[c].max_rank))

    def factored(self, c: str, k: int) -> DroneLinear:
        """The rank-``k`` replacement of layer ``c`` (cached)."""
        k = self.effective_rank(c, k)
        if (c, k) not in self._layers:
            f = self.decompositions[c].factors(k)
            self._layers[(c, k)] = DroneLinear.from_factors(self.targets[c][1], f.up, f.down, f.relative_error)
        return self._layers[(c, k)]

    def sq_error(self, c: str, k: int) -> float:
        errors = self.decompositions[c].relative_errors()
        return 0.0 if errors is None else float(errors[min(k, len(errors) - 1)]) ** 2

    def grid(self, c: str) -> list[int]:
        out_f, in_f = self.shapes[c]
        raw = self.config.rank_grid or rank_grid(out_f, in_f)
        if self.config.rank_grid is None and self.config.param_ratio is not None:
            # The default grid (multiples of 8) is coarse on narrow layers; each layer's uniform rank
            # is a candidate too, so greedy can always reach at least what uniform ranks reach.
            raw = [*raw, uniform_rank(out_f, in_f, self.config.param_ratio)]
        ranks = sorted({self.effective_rank(c, k) for k in raw if 1 <= k <= min(out_f, in_f)})
        if not ranks:
            raise ValueError(
                f"rank_grid={self.config.rank_grid} has no rank that fits {c!r} ({out_f}x{in_f}); "
                f"give ranks in [1, {min(out_f, in_f)}]."
            )
        return ranks

    def params(self, c: str, k: int | None) -> int:
        out_f, in_f = self.shapes[c]
        return out_f * in_f if k is None else self.effective_rank(c, k) * (out_f + in_f)

    def evaluator(self) -> LossEvaluator:
        if self._evaluator is None:
            self._evaluator = LossEvaluator(
                self.model, self.evaluation_batches, self.config.loss_fn, self.config.eval_loss
            )
            self.result["eval_loss"] = self._evaluator.kind
        return self._evaluator

    def latency(self) -> LatencyModel:
        if self._latency is None:
            p = next(p for p in self.model.parameters() if p.device.type != "meta")
            batch, seq = self.latency_shape
            self._latency = LatencyModel(batch * seq, p.device, p.dtype)
        return self._latency

    def layer_times(self, c: str, ranks: list[int]) -> tuple[float, dict[int, float]]:
        out_f, in_f = self.shapes[c]
        return self.latency().layer_times(out_f, in_f, ranks)

    @functools.cached_property
    def latency_shape(self) -> tuple[int, int]:
        """``config.latency_shape``, its sequence capped at the model's positions (as ``max_length`` is):
        a longer one cannot run (an index error deep in the position embeddings)."""
        batch, seq = self.config.latency_shape
        limit = usable_positions(self.model)
        if limit is not None and seq > limit:
            logger.warning(f"latency_shape={tuple(self.config.latency_shape)} exceeds the model's {limit} positions; "
                           f"timing at ({batch}, {limit}).")
            seq = limit
        return batch, seq

    def latency_inputs(self) -> dict[str, torch.Tensor]:
        batch, seq = self.latency_shape
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None) or len(self.tokenizer)
        g = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(0, int(vocab), (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def end_to_end(
        self, variants: dict[str, dict[str, nn.Module]], inputs: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        """:func:`~drone_hf.search.end_to_end_times`, counting the minor page faults per forward pass.

        Timed with freed memory kept in the heap (:func:`~drone_hf.utils.allocator.freed_memory_kept`):
        inside ``compress`` glibc would otherwise re-fault every pass's activations and read the
        speedup 15-20% low, so the allocation would overshoot the target.
        """
        with freed_memory_kept() as allocator, PageFaults() as faults:
            times = end_to_end_times(
                self._swapper, variants, inputs, repeats=END_TO_END_REPEATS, warmup=END_TO_END_WARMUP
            )
        self.result["timing_allocator"] = allocator
        per_pass = faults.per_pass((END_TO_END_REPEATS + END_TO_END_WARMUP) * len(variants))
        if per_pass is not None:
            self._faults_per_pass.append(per_pass)
        return times

    def full(self, ranks: dict[str, int], steps: dict[str, int] | None = None) -> dict[str, nn.Module]:
        """Full name -> replacement for ``ranks``, plus the narrowed layers of ``steps`` (MLP block ->
        elimination steps; default: the planned widths, ``width_steps``)."""
        layers = {self.targets[c][0]: self.factored(c, k) for c, k in ranks.items()}
        steps = self.width_steps if steps is None else steps
        if self.width is not None and steps:
            layers |= self.width.replacements(steps)
        return layers

    def merged(self, options: list[LayerOptions], weights: dict[str, float], cost: str) -> list[LayerOptions]:
        """``options`` with each prunable MLP block as one unit (``prune_mlp``; else unchanged), its
        narrowed widths costed like the layers: parameters, or seconds (:meth:`narrowed_time`)."""
        if self.width is None:
            return options
        return self.width.merge(options, weights, self.curvature_known(),
                                None if cost == "params" else self.narrowed_time)

    def decoded(self, chosen: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
        """An allocation over :meth:`merged` options -> (free layer ranks, MLP block elimination steps)."""
        return self.width.decode(chosen) if self.width is not None else (chosen, {})

    def narrowed_time(self, block: str, width: int) -> float:
        """Seconds of ``block``'s layers narrowed to ``width`` neurons: the latency model's dense times
        of the narrowed shapes, measured at the block's :meth:`~WidthStage.anchor_widths` and linear
        between them."""
        assert self.width is not None

        def at(w: int) -> float:
            return sum(self.latency().layer_times(o, i, [])[0] for o, i in self.width.narrowed_shapes(block, w))

        anchors = self.width.anchor_widths(block)
        above = min(a for a in anchors if a >= width)
        below = max(a for a in anchors if a <= width)
        if above == below:
            return at(width)
        return at(below) + (at(above) - at(below)) * (width - below) / (above - below)

    def measure_loss(self, ranks: dict[str, int]) -> float:
        with self._swapper.trying(self.full(ranks)):
            return self.evaluator().increase(self.model)

    def sensitivities(self) -> dict[str, float]:
        """Per-layer loss increase per unit of relative squared error, probed at the 50% uniform rank.

        Measured (one evaluation per layer) for output distortion and user callables; for the LM
        loss estimated from one backward pass (:func:`~drone_hf.search.fisher_sensitivities`): a
        SmolLM2-135M has 210 targeted projections, and 210 evaluations made greedy allocation
        many times slower than the compression itself.
        """
        if not self.free:  # every layer's rank was given: nothing to weigh (and no graph to differentiate)
            return {}
        if self.curvature_known():
            # drone-kfac: every rank's predicted loss comes with the decomposition (options()), no probe
            self.result["sensitivity"] = "kfac"
            return {}
        probes = {}
        for c in self.free:
            k = self.effective_rank(c, uniform_rank(*self.shapes[c], 0.5))
            probes[self.targets[c][0]] = (self.factored(c, k), self.sq_error(c, k))
        # one backward pass instead of one evaluation per layer; under a caller's inference_mode no
        # graph can be built, so the measured probes (same quantity, slower) are used instead
        if self.evaluator().kind == "lm" and not torch.is_inference_mode_enabled():
            by_full = fisher_sensitivities(self.model, self.evaluation_batches, probes)
            self.result["sensitivity"] = "fisher"
        else:
            bar = hf_logging.tqdm(list(probes), desc="Probing sensitivity", unit="layer",
                                  disable=not self.show_progress or None)
            by_full = probe_sensitivities(self._swapper, self.evaluator(), probes, bar)
            self.result["sensitivity"] = "measured"
        return {c: by_full[self.targets[c][0]] for c in self.free}

    def curvature_known(self) -> bool:
        """Whether every free layer's decomposition predicts the loss of each rank itself
        (``method="drone-kfac"``: K-FAC curvature, :mod:`drone_hf.solver.kfac`)."""
        return bool(self.free) and all(
            self.decompositions[c].predicted_loss(0) is not None for c in self.free
        )

    def options(self, cost: str, weights: dict[str, float]) -> list[LayerOptions]:
        out = []
        curvature = self.curvature_known()
        for c in self.free:
            ranks = self.grid(c)
            if cost == "params":
                dense, costs = float(self.params(c, None)), [float(self.params(c, k)) for k in ranks]
            else:
                dense, times = self.layer_times(c, ranks)
                costs = [times[k] for k in ranks]
            if curvature:  # predicted mean-loss increase of each rank, on one scale for all layers
                errors, weight = [float(self.decompositions[c].predicted_loss(k)) for k in ranks], 1.0
            else:
                errors, weight = [self.sq_error(c, k) for k in ranks], weights.get(c, 1.0)
            out.append(LayerOptions(c, dense, ranks, costs, errors, weight))
        return out

    # --- strategies ------------------------------------------------------------------------------
    def choose(self) -> dict[str, int]:
        cfg = self.config
        if cfg.param_ratio is not None:
            ranks = self._size_budget(cfg.param_ratio)
        elif cfg.target_speedup is not None:
            ranks = self._speed_budget(cfg.target_speedup)
        else:
            ranks = self._loss_budget(float(cfg.max_loss))  # type: ignore[arg-type]
        total = sum(self.params(c, None) for c in self.targets)
        narrowed = self.width.parameters(self.width_steps) if self.width is not None else {}
        kept = sum(narrowed.get(c, self.params(c, ranks.get(c))) for c in self.targets)
        if self.width is not None:
            self.result.update(pruned_mlp_blocks=len(self.width_steps), mlp_width_steps=dict(self.width_steps))
        self.result.update(
            strategy=cfg.allocation, factored_layers=len(ranks),
            dense_layers=len(self.targets) - len(ranks) - len(narrowed),
            targeted_param_ratio=kept / total,
        )
        return ranks

    def _size_budget(self, ratio: float) -> dict[str, int]:
        self.result["budget"] = {"param_ratio": ratio}
        if self.config.allocation == "uniform":
            return dict(self.fixed) | {c: uniform_rank(*self.shapes[c], ratio) for c in self.free}
        max_cost = ratio * sum(self.params(c, None) for c in self.targets) - sum(
            self.params(c, k) for c, k in self.fixed.items()
        )
        weights = self.sensitivities()
        # prune_mlp: MLP blocks become single units, pruned widths or factored projections
        options = self.merged(self.options("params", weights), weights, "params")
        alloc = greedy_allocate(options, max_cost=max_cost)
        if not alloc.reachable:
            fixed_cost = sum(self.params(c, k) for c, k in self.fixed.items())
            dense_cost = sum(self.params(c, None) for c in self.targets)
            fix = "raise param_ratio or give a rank_grid with smaller ranks"
            if fixed_cost:  # the pinned layers' share can be the whole problem
                fix = (f"the layers pinned by ranks= keep {fixed_cost / dense_cost:.3f} of all targeted weights by "
                       f"themselves: lower those ranks, {fix}")
            raise ValueError(
                f"param_ratio={ratio} cannot be met with the candidate ranks (smallest reachable: "
                f"{(alloc.cost + fixed_cost) / dense_cost:.3f}); {fix}."
            )
        chosen, self.width_steps = self.decoded(alloc.ranks)
        ranks = dict(self.fixed) | chosen
        self.result.update(predicted_loss_increase=alloc.predicted_loss,
                           measured_loss_increase=self.measure_loss(ranks))
        return ranks

    def _speed_budget(self, target: float) -> dict[str, int]:
        self.result["budget"] = {"target_speedup": target, "latency_shape": list(self.latency_shape)}
        inputs = self.latency_inputs()
        dense_total = self.end_to_end({"dense": {}}, inputs)["dense"]
        fixed_time = sum(self.layer_times(c, [self.effective_rank(c, k)])[1][self.effective_rank(c, k)]
                         for c, k in self.fixed.items())
        fixed_dense = sum(self.layer_times(c, [])[0] for c in self.fixed)
        weights = self.sensitivities() if self.config.allocation == "greedy" else {}
        options = self.merged(self.options("time", weights), weights, "time")
        layers_dense = sum(o.dense_cost for o in options) + fixed_dense
        overhead = max(dense_total - layers_dense, 0.0)
        fastest_layers = sum(min([o.dense_cost] + o.costs) for o in options)
        best = dense_total / (overhead + fixed_time + fastest_layers)
        if best < target:
            # Layer times measured in isolation can be pessimistic (the non-matmul remainder is then
            # overestimated): run the fastest allocation end to end before refusing, and re-estimate
            # the remainder from that run when it does reach the target.
            fastest, fastest_steps = self.decoded({
                o.name: o.ranks[o.costs.index(min(o.costs))] for o in options if o.costs and min(o.costs) < o.dense_cost
            })
            t = self.end_to_end({"dense": {}, "compressed": self.full(dict(self.fixed) | fastest, fastest_steps)},
                                inputs)
            measured_best = t["dense"] / t["compressed"]
            self.result["fastest_measured_speedup"] = measured_best
            if measured_best < target:
                shown = max(best, measured_best)
                raise ValueError(
                    f"target_speedup={target} is out of reach for this model on this device at batch x sequence "
                    f"{self.latency_shape}: the best reachable is about {shown:.2f}x (predicted "
                    f"{best:.2f}x, measured {measured_best:.2f}x with every layer at its fastest rank; non-matmul "
                    f"work takes about {overhead / dense_total:.0%} of the time). Ask for at most {shown:.2f}, or "
                    "use param_ratio."
                )
            overhead = max(dense_total / measured_best - fixed_time - fastest_layers, 0.0)
            best = measured_best
        budget = dense_total / target - overhead - fixed_time
        # Closed loop: allocate against the latency model, run the model end to end, and correct the
        # time budget until the measured speedup lands in [target, target·(1 + SPEED_SLACK)]. The
        # correction is a secant step on compressed time against budget (slope 1 on the first step:
        # the budget's seconds are the layers' seconds) while every measurement fell on one side of
        # the target, and bisection once one allocation met it and one missed (``corrected_budget``).
        # A step scaled by measured / target (the earlier rule) under-corrects by the share of time the
        # layers take (MPNet at 32x128, compensated: kept 2.15x for a 2.0x target, out of rounds).
        # Kept: the slowest allocation that met the target (most accuracy), else the fastest measured.
        rounds: list[dict] = []
        goal = dense_total / target  # the compressed forward time asked for, in the dense run's seconds
        measured_at: list[tuple[float, float]] = []  # (budget, compressed time) of each measured round
        met_at: float | None = None  # the largest budget whose allocation met the target
        missed_at: float | None = None  # the smallest budget whose allocation missed it

        def allocate(time_budget: float) -> dict[str, int]:
            """The free options' choices (MLP block units included) for ``time_budget``."""
            if self.config.allocation == "uniform":
                return self._uniform_for_time(options, time_budget)
            return greedy_allocate(options, max_cost=time_budget).ranks

        def next_budget(at: float, measured: float, record: bool = True) -> float:
            nonlocal met_at, missed_at
            took = dense_total / measured
            if record:  # a new measurement (not a budget that reached an allocation measured already)
                measured_at.append((at, took))
            if measured >= target:
                met_at = at if met_at is None else max(met_at, at)
            else:
                missed_at = at if missed_at is None else min(missed_at, at)
            return corrected_budget(at, took, goal, measured_at, met_at, missed_at)

        for _ in range(VERIFY_ROUNDS):
            free = allocate(budget)
            for _ in range(64):  # an allocation measured already: move the budget on from its result
                seen = next((r for r in rounds if r["choice"] == free), None)
                if seen is None:
                    break
                budget = next_budget(budget, seen["measured_speedup"], record=False)
                free = allocate(budget)
            else:
                break  # the budget no longer reaches a new allocation
            predicted_time = overhead + fixed_time + sum(
                o.costs[o.ranks.index(free[o.name])] if o.name in free else o.dense_cost for o in options
            )
            predicted = dense_total / predicted_time
            chosen, steps = self.decoded(free)
            ranks = dict(self.fixed) | chosen
            t = self.end_to_end({"dense": {}, "compressed": self.full(ranks, steps)}, inputs)
            measured = t["dense"] / t["compressed"]
            rounds.append({"predicted_speedup": predicted, "measured_speedup": measured, "ranks": ranks,
                           "steps": steps, "choice": free, "time_budget": budget})
            if target <= measured <= target * (1 + SPEED_SLACK):
                break
            budget = next_budget(budget, measured)

        def preference(r: dict) -> tuple[bool, float]:
            """Rounds that met the target first, the slowest of them; else the fastest round."""
            m = r["measured_speedup"]
            return (m >= target, -m if m >= target else m)

        kept = max(rounds, key=preference)
        measured, predicted, ranks = kept["measured_speedup"], kept["predicted_speedup"], kept["ranks"]
        self.width_steps = kept["steps"]
        if measured < target:
            logger.warning(
                f"target_speedup={target}: measured {measured:.2f}x at best after {len(rounds)} allocation rounds "
                f"(predicted {predicted:.2f}x); machine noise or non-matmul overhead. The result is kept."
            )
        self.result.update(
            predicted_speedup=predicted, measured_speedup=measured, best_reachable_speedup=best,
            speed_rounds=[{k: r[k] for k in ("predicted_speedup", "measured_speedup", "time_budget")} for r in rounds],
        )
        self._note_page_faults()
        if self.evaluation_batches:
            self.result["measured_loss_increase"] = self.measure_loss(ranks)
        return ranks

    def _note_page_faults(self) -> None:
        """Record page faults per forward pass; say once per process when they distort the speedup."""
        global _page_fault_noted
        if not self._faults_per_pass:
            return
        faults = sorted(self._faults_per_pass)[len(self._faults_per_pass) // 2]
        self.result["page_faults_per_pass"] = faults
        if worth_noting(faults) and self.result.get("timing_allocator") != KEPT and not _page_fault_noted:
            _page_fault_noted = True
            logger.warning(
                f"target_speedup: every forward pass measured here page-faulted about {faults:,.0f} times: the C "
                "allocator hands activation memory back to the OS between passes. That cost is the same for the "
                "dense and the compressed model, so the speedup measured (and the allocation chosen) is "
                "conservative for a process that reuses freed memory, which runs both faster. On Linux/glibc, "
                f"start Python with GLIBC_TUNABLES={GLIBC_REUSE_TUNABLES} for that; "
                "docs/speed.md has the measured difference."
            )

    def _uniform_for_time(self, options: list[LayerOptions], budget: float) -> dict[str, int]:
        """Largest uniform kept-fraction whose grid-rounded ranks fit the time budget."""
        by_name = {o.name: o for o in options}
        best: dict[str, int] = {}
        for r in sorted(UNIFORM_STEPS):  # ascending r: the last one that fits wins
            ranks, total = {}, 0.0
            for c, o in by_name.items():
                k = uniform_rank(*self.shapes[c], r)
                fitting = [g for g in o.ranks if g <= k]
                if fitting and o.costs[o.ranks.index(fitting[-1])] < o.dense_cost:
                    ranks[c] = fitting[-1]
                    total += o.costs[o.ranks.index(fitting[-1])]
                else:
                    total += o.dense_cost
            if total <= budget:
                best = ranks
        if not best:
            best = {o.name: o.ranks[0] for o in options if o.costs[0] < o.dense_cost}
        return best

    def _loss_budget(self, max_loss: float) -> dict[str, int]:
        evaluator = self.evaluator()
        self.result["budget"] = {"max_loss": max_loss, "loss": evaluator.kind, "dense_loss": evaluator.dense_loss}
        strategy = self.config.allocation
        if strategy == "uniform":
            ranks = self._uniform_for_loss(max_loss)
        elif strategy == "drone":
            ranks = self._paper_search(max_loss)
        else:
            ranks = self._greedy_for_loss(max_loss)
        if self.free and not set(ranks) - set(self.fixed) and not self.width_steps:
            if strategy != "uniform" and not self._any_layer_faster():
                raise ValueError(
                    f"allocation={strategy!r} with max_loss factors only layers that get faster, and at "
                    f"latency_shape={self.latency_shape} no rank of any layer is faster than its dense matmul on "
                    "this device, so every layer stays dense. Time at a larger latency_shape (the batch x "
                    "sequence you serve), or use allocation='uniform' or param_ratio to compress for size."
                )
            raise ValueError(
                f"max_loss={max_loss} is too small: no layer can be factored within it on the held-out texts "
                f"(loss: {self.evaluator().kind}). Allow a larger max_loss."
            )
        self.result["measured_loss_increase"] = self.measure_loss(ranks)
        return ranks

    def _any_layer_faster(self) -> bool:
        """Whether some free layer has a grid rank faster than its dense matmul at ``latency_shape``."""
        for c in self.free:
            dense, times = self.layer_times(c, self.grid(c))
            if any(t < dense for t in times.values()):
                return True
        return False

    def _uniform_for_loss(self, max_loss: float) -> dict[str, int]:
        steps = sorted(UNIFORM_STEPS)  # ascending kept fraction: loss falls along it
        lo, hi, best = 0, len(steps) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            ranks = dict(self.fixed) | {c: uniform_rank(*self.shapes[c], steps[mid]) for c in self.free}
            if self.measure_loss(ranks) <= max_loss:
                best, hi = ranks, mid - 1
            else:
                lo = mid + 1
        return best or {}

    def _greedy_for_loss(self, max_loss: float) -> dict[str, int]:
        weights = self.sensitivities()
        options = self.merged(self.options("time", weights), weights, "time")
        allowed, best, best_steps = max_loss, {}, {}
        for _ in range(VERIFY_ROUNDS + 1):
            allocation = greedy_allocate(options, max_loss=allowed)
            chosen, self.width_steps = self.decoded(allocation.ranks)
            ranks = dict(self.fixed) | chosen
            measured = self.measure_loss(ranks)
            if measured <= max_loss:
                best, best_steps = ranks, self.width_steps
                break
            # The layers interact, and the predicted losses (Fisher) can sit orders of magnitude below
            # the measured one: scale the prediction this allocation reached, not the allowance, so the
            # next round's allocation predicts proportionally less (scaling the allowance repeats the
            # same ranks while the allowance stays above what the allocation already predicted).
            predicted = allocation.predicted_loss if allocation.predicted_loss > 0 else allowed
            allowed = min(allowed, predicted) * 0.8 * max_loss / measured
        self.width_steps = best_steps
        return best

    def _paper_search(self, max_loss: float) -> dict[str, int]:
        candidates, dense_time = {}, {}
        for c in self.free:
            ranks = self.grid(c)
            dense, times = self.layer_times(c, ranks)
            dense_time[c] = dense
            faster = [(k, self.factored(c, k)) for k in ranks if times[k] < dense]
            if faster:
                candidates[self.targets[c][0]] = faster
        total = sum(dense_time[c] for c in self.free) or 1.0
        shares = {self.targets[c][0]: max_loss * dense_time[c] / total for c in self.free}
        base = {self.targets[c][0]: self.factored(c, k) for c, k in self.fixed.items()}
        bar = hf_logging.tqdm(list(candidates), desc="DRONE rank search", unit="layer",
                              disable=not self.show_progress or None)
        by_full = drone_search(self._swapper, self.evaluator(), candidates, shares, bar, base=base)
        full_to_c = {full: c for c, (full, _) in self.targets.items()}
        return dict(self.fixed) | {full_to_c[f]: k for f, k in by_full.items()}
