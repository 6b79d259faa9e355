"""The attention stage of the engine: DRONE's query-key compression (``compress_attention=True``).

:func:`drone_hf.compress.compress_in_place` runs it around its linear stage, in four steps:

1. :class:`AttentionStage` (before calibration): find the supported self-attention modules
   (:mod:`drone_hf.architectures`; rotary models are refused with the reason), resolve the per-head
   rank, and take their query/key layers out of the linear targets (they are compressed jointly
   here, never factored separately).
2. :meth:`~AttentionStage.observed_layers`: one extra observer per attention layer on the same
   calibration pass (the Gram of the attention input, its token sum and count).
3. :meth:`~AttentionStage.solve` (after linear planning, before anything is swapped): per layer, the
   augmented Gram and the closed form of :mod:`drone_hf.solver.attention`.
4. :meth:`~AttentionStage.install` (after the linear swap, so factored values are carried over)
   and :meth:`~AttentionStage.record` (``attention_ranks``/``attention_errors`` in the config).

Statistics come from the dense model in the same one-shot pass as the linear layers; a non-uniform
linear allocation measures its candidates with dense attention.

Per-layer attention ranks: with ``allocation="uniform"`` every module gets the per-head rank
``attention_rank``. With any other allocation (``"greedy"``, the default, or ``"drone"``) ``attention_rank`` is
an *average*: the total query/key width ``Σ heads·k`` of the uniform choice is the budget, and
:func:`allocate_attention_ranks` distributes it over the modules from their score-error spectra,
greedily, one per-head step at a time to the module whose squared relative score error drops most
per unit of width. The objective is separable and each module's error drop per step never grows
(the solver keeps singular directions in decreasing order), so the greedy choice is optimal for the
sum of squared relative score errors at that total width (for equal head counts). It uses only the
statistics already collected (no extra forward pass), independently of the linear stage's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from transformers.utils import logging as hf_logging

from .allocation import uniform_rank
from .architectures import AttentionAdapter, find_attention_layers
from .calibration import GramObserver
from .config import DEFAULT_ATTENTION_RANK, DroneConfig
from .modules.attention import DroneAttention
from .modules.low_rank_linear import DroneLinear
from .modules.targets import _within, replace_modules
from .solver import decompose
from .solver.attention import QKProjections, augmented_gram, decompose_qk
from .utils.logging import get_logger

logger = get_logger(__name__)

#: Suffix of the observer keys of attention inputs in the calibration pass (never a layer name).
OBSERVER_SUFFIX = "#attention-input"


def per_head_rank(attention_rank: int | float | None, head_dim: int, name: str) -> int:
    """The per-head width ``k`` for heads of width ``head_dim`` (see ``DroneConfig.attention_rank``)."""
    k = DEFAULT_ATTENTION_RANK if attention_rank is None else attention_rank
    if isinstance(k, float):
        return max(1, math.floor(k * head_dim + 1e-9))
    if k > head_dim:
        raise ValueError(
            f"attention_rank={k} is larger than the head width {head_dim} of {name!r}: use an integer in "
            f"[1, {head_dim}] (values below {head_dim} compress; {head_dim} reproduces the scores) or a fraction "
            "such as 0.5."
        )
    return int(k)


def allocate_attention_ranks(
    errors: dict[str, list[float]], heads: dict[str, int], budget: int
) -> dict[str, int]:
    """Per-head ranks (module -> k) minimising ``Σ relative_error(k)²`` with ``Σ heads·k <= budget``.

    Args:
        errors: module -> relative score error at per-head rank ``0..d`` (``d + 1`` values, non-increasing).
        heads: module -> number of heads (the width cost of one per-head step).
        budget: total query/key width ``Σ heads·k`` to distribute; at least ``Σ heads`` (rank 1 each).

    Every module starts at rank 1, then the remaining width goes, one step at a time, to the module
    with the largest drop of squared relative error per unit of width (ties: the first module).

    Raises:
        ValueError: a budget below one per-head dimension per module.
    """
    names = list(errors)
    floor = sum(heads[n] for n in names)
    if budget < floor:
        raise ValueError(
            f"an attention width budget of {budget} cannot give every one of the {len(names)} modules rank 1 "
            f"(needs {floor}); raise attention_rank."
        )
    ranks = dict.fromkeys(names, 1)
    left = budget - floor

    def gain(n: str) -> float:
        e, k = errors[n], ranks[n]
        return (e[k] ** 2 - e[k + 1] ** 2) / heads[n] if k + 1 < len(e) else -math.inf

    while True:
        candidates = [n for n in names if heads[n] <= left and gain(n) > -math.inf]
        if not candidates:
            return ranks
        best = max(candidates, key=gain)  # max keeps the first on ties: deterministic
        ranks[best] += 1
        left -= heads[best]


@dataclass
class _Layer:
    full: str
    module: nn.Module
    adapter: AttentionAdapter
    rank: int
    in_features: int
    extra_rank: int | None = None  # rank of the adapter's extra layers (GPT-2's split value), None: dense
    observer: GramObserver | None = None
    projections: QKProjections | None = None
    extras: dict[str, DroneLinear] | None = None


class AttentionStage:
    """Query-key compression of every supported self-attention layer of ``model`` (see module docstring).

    Raises:
        ValueError: rotary or unsupported model, an ``attention_rank`` wider than the heads, a ``ranks``
            entry naming a query/key layer, or every attention layer excluded. Nothing has been changed
            when it raises.
    """

    def __init__(self, model: nn.Module, config: DroneConfig, targets: dict[str, tuple[str, nn.Module]]) -> None:
        # a model already compressed (attention or linear layers) is refused before this stage is built:
        # compress.already_compressed
        if getattr(config, "sequential", False):
            raise ValueError(
                "compress_attention=True does not support sequential=True yet: the attention stage solves from "
                "one-shot statistics of the dense model. Use sequential=False (the default) with compress_attention."
            )
        self.config = config
        found = find_attention_layers(model)
        excluded = config.modules_to_not_convert or []
        self.layers: dict[str, _Layer] = {}
        for name, (full, module, adapter) in found.items():
            children = [(f"{name}.{c}", f"{full}.{c}") for c in adapter.absorbed]
            if any(_within(e, name, full) or any(_within(e, c, f) for c, f in children) for e in excluded):
                continue
            wq = adapter.qk_weights(module)[0]
            head_dim = wq.shape[0] // adapter.num_heads(module)
            rank = per_head_rank(config.attention_rank, head_dim, name)
            self.layers[name] = _Layer(full, module, adapter, rank, int(wq.shape[1]))
        if not self.layers:
            raise ValueError(
                "compress_attention=True, but modules_to_not_convert excludes every attention layer; remove those "
                "entries or drop compress_attention."
            )
        self.absorbed = {f"{name}.{c}": name for name, layer in self.layers.items() for c in layer.adapter.absorbed}
        for key in config.ranks or {}:
            if key in self.absorbed:
                raise ValueError(
                    f"ranks names {key!r}, but with compress_attention=True the query/key projections of "
                    f"{self.absorbed[key]!r} are compressed jointly (attention_rank), not as linear layers. Remove it "
                    "from ranks, or drop compress_attention."
                )
        for name, layer in self.layers.items():
            if layer.adapter.extra and any(f"{name}.{a}" in targets for a in layer.adapter.absorbed):
                layer.extra_rank = self._extra_rank(layer)
        #: the linear targets left for the linear stage
        self.linear_targets = {c: v for c, v in targets.items() if c not in self.absorbed}

    def _extra_rank(self, layer: _Layer) -> int | None:
        """Rank of a value that only the attention stage sees (GPT-2's ``c_attn`` slice)."""
        if self.config.param_ratio is None:
            logger.warning(
                "compress_attention splits GPT-2's fused c_attn; its value slice is factored only with a param_ratio "
                "budget (uniform rank). With target_speedup/max_loss it stays dense."
            )
            return None
        return uniform_rank(layer.in_features, layer.in_features, self.config.param_ratio)

    # --- calibration ---------------------------------------------------------------------------
    def observed_layers(self) -> tuple[dict[str, nn.Module], dict[str, int]]:
        """(observer key -> layer whose input is the attention input, observer key -> input width)."""
        layers = {n + OBSERVER_SUFFIX: a.adapter.input_layer(a.module) for n, a in self.layers.items()}
        widths = {n + OBSERVER_SUFFIX: a.in_features for n, a in self.layers.items()}
        return layers, widths

    def take_statistics(self, observers: dict[str, GramObserver]) -> None:
        """Take (and remove) this stage's observers from the calibration result."""
        for name, layer in self.layers.items():
            obs = observers.pop(name + OBSERVER_SUFFIX)
            if not obs.has_token_sum:
                raise RuntimeError(f"The calibration pass did not record token sums for {name!r}.")
            layer.observer = obs

    # --- math ----------------------------------------------------------------------------------
    def solve(self, show_progress: bool = True) -> None:
        """Solve every layer's query-key form (and GPT-2 values) without touching the model."""
        cfg = self.config
        bar = hf_logging.tqdm(
            list(self.layers), desc="Solving attention", unit="layer", disable=not show_progress or None
        )
        decompositions = {}
        for name in bar:
            layer = self.layers[name]
            obs = layer.observer
            assert obs is not None and obs.gram is not None, "take_statistics() first"
            gram = augmented_gram(obs.gram, obs.token_sum, obs.num_tokens)
            wq, bq, wk, bk = layer.adapter.qk_weights(layer.module)
            heads = layer.adapter.num_heads(layer.module)
            decompositions[name] = decompose_qk(wq, bq, wk, bk, heads, gram, method=cfg.method, damp=cfg.damp)
            if layer.extra_rank is not None:
                layer.extras = {}
                for child, dense in layer.adapter.extra_layers(layer.module).items():
                    k = min(layer.extra_rank, *dense.weight.shape)
                    f = decompose(dense.weight, obs.gram, method=cfg.method, damp=cfg.damp).factors(k)
                    layer.extras[child] = DroneLinear.from_factors(dense, f.up, f.down, f.relative_error)
            obs.gram = None  # free the statistics as we go
        if cfg.allocation != "uniform" and len(decompositions) > 1:
            self._allocate(decompositions)
        for name, dec in decompositions.items():
            self.layers[name].projections = dec.projections(self.layers[name].rank)

    def _allocate(self, decompositions: dict) -> None:
        """Replace the uniform per-head ranks by :func:`allocate_attention_ranks` at the same total width."""
        heads = {n: d.num_heads for n, d in decompositions.items()}
        spectra = {}
        for n, d in decompositions.items():
            e = d.relative_errors()
            if e is None:  # no statistics (cannot happen after solve's pass): keep the uniform ranks
                return
            spectra[n] = e.tolist()
        budget = sum(heads[n] * self.layers[n].rank for n in decompositions)
        chosen = allocate_attention_ranks(spectra, heads, budget)
        for n, k in chosen.items():
            self.layers[n].rank = k
        logger.info(
            "attention ranks allocated (%s) from the score-error spectra, total width %d: %s",
            self.config.allocation, budget, chosen,
        )

    def install(self, model: nn.Module) -> dict[str, DroneAttention]:
        """Swap the compressed attention modules in (carrying the current value/output children)."""
        replacements = {}
        for layer in self.layers.values():
            p = layer.projections
            assert p is not None, "solve() first"
            original = model.get_submodule(layer.full)
            new = layer.adapter.new_module(original, p.rank, getattr(model, "config", None))
            new.load_projections(p.query_weight, p.query_bias, p.key_weight, p.key_bias)
            new.relative_error = p.relative_error
            for child, factored in (layer.extras or {}).items():
                setattr(new, child, factored)
            replacements[layer.full] = new
        replace_modules(model, replacements)
        return replacements

    def record(self, config: DroneConfig) -> None:
        """Write ``attention_ranks``/``attention_errors`` (and split GPT-2 values' ranks) into ``config``."""
        solved = {n: a.projections for n, a in self.layers.items() if a.projections is not None}
        config.attention_ranks = {n: p.rank for n, p in solved.items()}
        config.attention_errors = {n: p.relative_error for n, p in solved.items()}
        ranks, errors = dict(config.ranks or {}), dict(config.relative_errors or {})
        split = {}
        for name, layer in self.layers.items():
            for child, factored in (layer.extras or {}).items():
                ranks[f"{name}.{child}"], errors[f"{name}.{child}"] = factored.rank, factored.relative_error
                split[f"{name}.{child}"] = factored.rank
        config.ranks, config.relative_errors = ranks, errors
        if split and config.allocation_result is not None:
            # GPT-2's fused c_attn leaves the allocation for this stage: its value third is factored
            # here at the stage's rank, outside the allocation's budget, and counted as factored
            result = config.allocation_result
            result["split_value_layers"] = split
            result["factored_layers"] = result.get("factored_layers", 0) + len(split)
