"""The compression engine: targets -> calibration -> solve -> swap.

One code path serves both entry points: ``from_pretrained(..., drone_config=...)`` (through the
quantizer, after the dense weights load) and :func:`compress` on a model already in memory. All
factors are computed before any layer is swapped, so a failure leaves the model untouched.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .allocation import check_fixed_rank, uniform_rank
from .attention_stage import AttentionStage
from .calibration import collect_grams, load_texts, tokenize_batches
from .calibration.cache import CalibrationCache, open_cache
from .calibration.choices import one_choice_per_text, refuse_choice_losses
from .calibration.distributed import all_reduce_count, decided_by_process_zero, on_every_process, shard_texts
from .calibration.fisher import DEFAULT_KFAC_FISHER
from .calibration.offload import check_materialisable, materialise
from .calibration.paired import PairedObserver
from .config import QUANT_METHOD, DroneConfig
from .modules.attention import drone_attention_modules
from .modules.low_rank_linear import DroneLinear, dense_weight_of
from .modules.mlp_blocks import recorded_mlp_widths
from .modules.targets import check_rank_keys, rank_for, replace_modules, resolve_targets
from .planner import RankPlanner
from .search import default_eval_samples, resolve_eval_loss
from .sequential import compress_sequentially
from .solver import (
    PEER_METHODS,
    Decomposition,
    decompose,
    decompose_compensated,
    decompose_kfac,
    decompose_kfac_compensated,
    decompose_output_gram,
    decompose_peer,
)
from .utils.logging import get_logger
from .utils.positions import usable_positions
from .utils.public_names import public_name
from .width_stage import WidthStage

logger = get_logger(__name__)


def _resolve_tokenizer(tokenizer: Any, model: nn.Module) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    source = tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
        model, "name_or_path", None
    )
    if not source:
        raise ValueError(
            "No tokenizer for calibration: the model has no name_or_path to load one from. "
            "Pass DroneConfig(tokenizer=AutoTokenizer.from_pretrained(...)) or a tokenizer path."
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix named
        raise ValueError(
            f"Could not load a tokenizer from {source!r} ({type(e).__name__}: {e}). "
            "Pass DroneConfig(tokenizer=...) with a tokenizer object or a path that has one."
        ) from e


def _nothing_to_factor(config: DroneConfig, count: int) -> str:
    """Why a budget that keeps every layer dense is refused, and what to change.

    Such a model would carry a DRONE record with no factored layer: nothing smaller or faster, and a
    checkpoint that describes no compression. Refusing costs the calibration pass only (keep it with
    ``calibration_cache`` to retry another budget at no cost)."""
    if config.param_ratio is not None:
        budget = f"param_ratio={config.param_ratio:g}"
        fix = ("lower param_ratio (the dense layers already fit it, and a searched allocation factors only what "
               "the budget requires), or use allocation='uniform', which factors every layer at the budget's rank")
    else:  # the planner refuses a max_loss too small for any factorisation itself, naming it
        budget = (f"target_speedup={config.target_speedup:g}" if config.target_speedup is not None
                  else f"max_loss={config.max_loss:g}")
        fix = "ask for more compression (a larger target_speedup or max_loss)"
    return (f"{budget} keeps all {count} targeted layers dense (allocation={config.allocation!r}), so there is "
            f"nothing to compress and no DRONE checkpoint to write: {fix}.")


def _describe_dataset(dataset: Any) -> str:
    """The calibration record's name of the data: never a local path (it is written into the
    checkpoint and its model card)."""
    if dataset is None:
        return "builtin:sotu"
    if isinstance(dataset, (str, os.PathLike)):
        return public_name(dataset)
    return f"<{type(dataset).__name__}>"


def _split_texts(
    texts: list[str], eval_samples: int, seed: int, num_samples: int | None = None
) -> tuple[list[str], list[str]]:
    """Hold out ``eval_samples`` texts for evaluation; the rest calibrate.

    ``texts`` was drawn as ``num_samples + eval_samples``: when the dataset had that many, exactly
    ``eval_samples`` are held out and ``num_samples`` calibrate. A shorter dataset keeps its
    calibration share first: the held-out count shrinks to what is left beyond ``num_samples``, but
    never below a quarter of the texts (so a small dataset still gets a held-out set to measure on).
    Without ``num_samples`` the quarter is the cap. When that leaves nothing to hold out (fewer than 4
    texts, none beyond ``num_samples``) evaluation reuses the calibration texts (logged), so tiny
    smoke runs still work.
    """
    quarter = len(texts) // 4
    spare = len(texts) - num_samples if num_samples is not None else 0
    n_eval = min(eval_samples, max(spare, quarter))
    if n_eval == 0:
        logger.warning("Too few calibration texts to hold any out; evaluating on the calibration texts.")
        return texts, texts
    if n_eval < eval_samples:
        logger.warning(
            f"The dataset gave {len(texts)} texts, fewer than num_samples + eval_samples = "
            f"{(num_samples or 0) + eval_samples}: holding out {n_eval} for evaluation, calibrating on "
            f"{len(texts) - n_eval}."
        )
    order = list(range(len(texts)))
    random.Random(seed + 1).shuffle(order)
    held = set(order[:n_eval])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def _needs_evaluation(config: DroneConfig) -> bool:
    return config.allocation != "uniform" or config.max_loss is not None


def _note_unused_options(config: DroneConfig) -> None:
    """Warn about options the chosen allocation never reads, so a setting is not believed to act.

    Uniform ranks follow from the shapes (param_ratio), from measured loss at fixed kept fractions
    (max_loss) or from timed grid ranks (target_speedup): only max_loss evaluates a loss, only
    target_speedup searches ``rank_grid``. (A warning, not an error: sweeps switch ``allocation``
    and keep the rest.)
    """
    if config.allocation != "uniform":
        return
    unused = []
    if not _needs_evaluation(config):
        unused += [f for f, v in (("loss_fn", config.loss_fn), ("eval_samples", config.eval_samples)) if v is not None]
        unused += ["eval_loss"] if config.eval_loss != "auto" else []
    if config.target_speedup is None and config.rank_grid is not None:
        unused.append("rank_grid")
    if unused:
        budget = next(b for b in ("param_ratio", "target_speedup", "max_loss") if getattr(config, b) is not None)
        logger.warning(
            f"allocation='uniform' with {budget} does not use {', '.join(unused)}: they are ignored. "
            "allocation='greedy' uses them."
        )


def held_out_count(model: nn.Module, config: DroneConfig) -> int:
    """Texts to draw beyond ``num_samples``: 0 when nothing is measured on held-out text, else
    ``config.eval_samples`` or, when unset, the default for the model's evaluation loss.

    The one place that decides it, for ``compress`` and for callers that gather the texts first
    (``CompressOnTrainBeginCallback`` samples ``num_samples + held_out_count`` training rows)."""
    if not _needs_evaluation(config):
        return 0
    if config.eval_samples is not None:
        return config.eval_samples
    return default_eval_samples(model, config.eval_loss, config.loss_fn)


def _peer_statistics(
    model: nn.Module, method: str, targets: dict, data, kfac_fisher: str = DEFAULT_KFAC_FISHER, seed: int = 0,
    cache: CalibrationCache | None = None, show_progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """The extra statistics of the peer methods, on the dense model (as their papers calibrate):
    ASVD's per-channel mean |x| (one forward pass), FWSVD's row Fisher (one forward+backward pass),
    loss-aware DRONE's output-gradient Grams and loss scale (one forward+backward pass). Empty for
    every other method; in sequential mode they stay those of the dense model. Each pass is
    resumable from ``cache`` like the Gram pass, in an entry of its own: a finished one serves any
    later run on the same folder (another budget, allocation or calibration mode)."""
    layers = {c: layer for c, (_, layer) in targets.items()}
    if method == "asvd" and layers:
        from .calibration.activation_stats import collect_abs_means

        return {c: {"abs_mean": obs.mean} for c, obs in collect_abs_means(model, layers, data, cache,
                                                                                     show_progress).items()}
    if method == "fwsvd" and layers:
        from .calibration.fisher import collect_row_fisher

        # The row Fisher is the weights' own gradient: an offloaded layer's weight is a placeholder that
        # accelerate swaps for a fresh tensor at each forward, so autograd would never reach it and the
        # Fisher would stay zero (plain SVD, silently). Its weights are loaded first, as the one-shot solve
        # loads them anyway; in sequential mode this gives up offloading for the targets.
        materialise(layers.values())
        return {c: {"row_fisher": f} for c, f in collect_row_fisher(model, layers, data, cache,
                                                                                     show_progress).items()}
    if method == "drone-kfac" and layers:
        from .calibration.output_gradients import collect_output_grams

        grads = collect_output_grams(model, layers, data, fisher=kfac_fisher, seed=seed, cache=cache,
                                     show_progress=show_progress)
        return {c: {"out_gram": obs.gram, "loss_scale": grads.loss_scale(c)} for c, obs in grads.observers.items()}
    return {}


def check_method_options(config: DroneConfig) -> None:
    """Refuse options the chosen solver would ignore, before any calibration.

    ``damp`` is DRONE's input ridge: plain SVD and the peers (ASVD, FWSVD, SVD-LLM, implemented as
    published, without one) would drop it silently, and a ridge is what a user reaches for when
    SVD-LLM's Cholesky factorisation fails. The query-key stage has a DRONE and a plain-SVD form
    only: with a peer method it would run DRONE's and the row would be mislabelled. Checked here, at
    compression time, not in ``DroneConfig.post_init``: a checkpoint whose record holds such a pair
    (it only ever meant the linear layers) must still load."""
    method = config.method
    if config.damp and method not in ("drone", "drone-kfac"):  # drone-kfac: refused by DroneConfig itself
        raise ValueError(
            f"damp={config.damp:g} is DRONE's input ridge and method={method!r} does not use it. Set damp=0, or use "
            "method='drone' with damp (for a near-singular Gram, e.g. SVD-LLM's Cholesky failure)."
        )
    if config.compress_attention and method in PEER_METHODS:
        raise ValueError(
            f"compress_attention=True with method={method!r}: the query-key stage has a DRONE and a plain-SVD form "
            f"only. Use method='drone' or 'svd' with compress_attention, or method={method!r} without it."
        )


def compress_in_place(model: nn.Module, config: DroneConfig, show_progress: bool = True) -> nn.Module:
    """Factor ``model``'s targeted layers with ``config`` and record the result in ``config``.

    ``config`` is mutated: ``ranks`` becomes the real rank per factored layer, ``relative_errors``,
    ``calibration`` and ``allocation_result`` are filled in. Callers that must not mutate the user's
    object pass a copy. Every candidate is computed before the model is finally changed; on any
    error the model keeps its dense layers. A multiple-choice model is calibrated with one choice per
    text (:mod:`drone_hf.calibration.choices`).
    """
    refuse_choice_losses(model, config.method)
    with one_choice_per_text(model):
        return _compress_in_place(model, config, show_progress)


def already_compressed(model: nn.Module) -> str | None:
    """What makes ``model`` DRONE-compressed (``"12 factored layers, e.g. 'x'"``), ``None`` for a dense one.

    Factored linear layers and compressed attention both count: compressing an attention-only
    compressed model again factored the narrowed query/key inside its ``DroneAttention`` modules and
    recorded a second compression over the first."""
    linear = [n for n, m in model.named_modules() if isinstance(m, DroneLinear)]
    attention = list(drone_attention_modules(model))
    pruned = list(recorded_mlp_widths(model))  # narrowed MLPs are plain layers: only the record knows
    if not linear and not attention and not pruned:
        return None
    parts = ([f"{len(linear)} factored layers"] if linear else []) + (
        [f"{len(attention)} compressed attention modules"] if attention else []) + (
        [f"{len(pruned)} pruned MLP blocks"] if pruned else [])
    return f"{' and '.join(parts)}, e.g. {(linear or attention or pruned)[0]!r}"


def _compress_in_place(model: nn.Module, config: DroneConfig, show_progress: bool) -> nn.Module:
    existing = already_compressed(model)
    if existing:
        raise ValueError(
            f"The model is already DRONE-compressed ({existing}). "
            "Compress the dense model, or call model.dequantize() first to merge the factors."
        )
    config.post_init()  # overrides, and fields set on the object after it was built, are checked too
    check_method_options(config)
    targets = resolve_targets(model, config.target_modules, config.modules_to_not_convert)
    # --- attention (query-key) compression, see attention_stage.py: q/k leave the linear targets.
    attention = AttentionStage(model, config, targets) if config.compress_attention else None
    if attention is not None:
        targets = attention.linear_targets
    check_rank_keys(config.ranks, targets)
    if _needs_evaluation(config) and config.loss_fn is None:
        resolve_eval_loss(model, config.eval_loss)  # e.g. eval_loss="lm" on an encoder: refused before any work
    # accelerate offload (device_map with cpu/disk entries): weights are loaded when solved (calibration/offload.py)
    check_materialisable({c: layer for c, (_, layer) in targets.items()})
    shapes = {c: tuple(int(v) for v in dense_weight_of(layer).shape) for c, (_, layer) in targets.items()}
    fixed = {c: k for c, (full, _) in targets.items() if (k := rank_for(c, full, config.ranks)) is not None}
    for c, k in fixed.items():
        check_fixed_rank(c, k, *shapes[c])
    # --- MLP width pruning, see width_stage.py: block outputs are observed on their input (the neurons)
    width = WidthStage(model, config, targets, fixed) if config.prune_mlp else None
    pruned_outputs = width.outputs if width is not None else set()
    # Layers that narrow (out < in) are observed through their output Gram: out² per token instead
    # of in², the same optimum (solver.decompose_output_gram). Damping needs the input Gram.
    observe_output = {c for c, (o, i) in shapes.items()
                      if config.method == "drone" and config.damp == 0 and o < i and c not in pruned_outputs}
    widths = {c: shapes[c][0] if c in observe_output else shapes[c][1] for c in targets}

    peer_stats: dict[str, dict[str, Any]] = {}  # asvd/fwsvd/drone-kfac statistics, filled after tokenising

    def solve(c: str, gram: torch.Tensor) -> Decomposition:
        weight = dense_weight_of(targets[c][1])  # read now: an offloaded layer is materialised just before
        if c in observe_output:
            return decompose_output_gram(weight, gram)
        if config.method == "drone-kfac":
            stats = peer_stats[c]
            return decompose_kfac(weight, gram, stats["out_gram"], damp=config.kfac_damp,
                                  loss_scale=stats["loss_scale"])
        if config.method in PEER_METHODS:
            return decompose_peer(config.method, weight, gram, asvd_alpha=config.asvd_alpha, name=c,
                                  **peer_stats.get(c, {}))
        return decompose(weight, gram, method=config.method, damp=config.damp)

    def solve_compensated(c: str, stats: PairedObserver) -> Decomposition:
        weight = dense_weight_of(targets[c][1])
        if config.method == "drone-kfac":  # the dense model's output-gradient Gram weighs the compensated error
            return decompose_kfac_compensated(
                weight, stats.gram, stats.cross, stats.dense_energy, peer_stats[c]["out_gram"],
                kfac_damp=config.kfac_damp, loss_scale=peer_stats[c]["loss_scale"], precision=weight.dtype,
            )
        return decompose_compensated(weight, stats.gram, stats.cross, stats.dense_energy, damp=config.damp,
                                     precision=weight.dtype)  # the activations' dtype: the model's

    tokenizer = _resolve_tokenizer(config.tokenizer, model)
    max_length = config.max_length
    limit = usable_positions(model)
    if limit is not None and max_length > limit:
        logger.warning(f"max_length={max_length} exceeds the model's {limit} positions; calibrating at {limit}.")
        max_length = limit
    evaluate = _needs_evaluation(config)
    _note_unused_options(config)
    held_out = held_out_count(model, config)
    texts = load_texts(config.dataset, config.num_samples + held_out, config.seed)
    if evaluate:
        calib_texts, eval_texts = _split_texts(texts, held_out, config.seed, config.num_samples)
    else:
        calib_texts, eval_texts = texts, []
    # torchrun / accelerate launch: each process calibrates on its shard; statistics are all-reduced
    data = tokenize_batches(shard_texts(calib_texts), tokenizer, max_length, config.batch_size)
    cache = open_cache(config.calibration_cache, model, data.batches, {
        "mode": {False: "one-shot", True: "sequential"}.get(config.sequential, f"sequential-{config.sequential}"),
        "widths": sorted(widths.items()), "observe_output": sorted(observe_output),
        "attention": config.compress_attention, "attention_rank": config.attention_rank,
        # later blocks see solved ones
        # (kfac_fisher only when not "empirical", what every cache written before the option existed
        # used: those stay valid, and a default ("true") run does not reuse them)
        "solver": [config.method, config.damp, config.asvd_alpha, config.kfac_damp]
        + ([config.kfac_fisher] if config.kfac_fisher != "empirical" else []) if config.sequential else None,
    })
    peer_stats.update(_peer_statistics(model, config.method, targets, data, config.kfac_fisher, config.seed,
                                       cache, show_progress))
    one_shot = not (config.sequential and config.allocation == "uniform" and config.param_ratio is not None)
    plan = RankPlanner(model, config, targets, shapes, {}, fixed, tokenizer, show_progress)
    if evaluate and targets:
        plan.evaluation_batches = tokenize_batches(eval_texts, tokenizer, max_length, config.batch_size).batches
        # the dense model's reference outputs, now: a loss it cannot give fails before calibration, on every
        # process (a loss_fn failing on one process alone left the others waiting in the calibration's all_reduce)
        on_every_process(plan.evaluator, "measuring the dense model's evaluation loss")
        plan.result["eval_samples"] = len(eval_texts)
    if one_shot:  # statistics of the dense model for every layer at once
        materialise(layer for _, layer in targets.values())  # offloaded targets: their dense weights, all at once
        layers = {c: layer for c, (_, layer) in targets.items()}
        in_features = dict(widths)
        if attention is not None:  # attention inputs are observed in the same calibration pass
            attention_layers, attention_widths = attention.observed_layers()
            layers, in_features = layers | attention_layers, in_features | attention_widths
        grams = collect_grams(
            model, layers, data, in_features, show_progress, observe_output=observe_output, cache=cache,
            token_sums=attention is not None,  # only the query-key solver needs Σx
        )
        if attention is not None:
            attention.take_statistics(grams)
        if width is not None:
            width.take_statistics({c: grams[c].gram for c in pruned_outputs}, peer_stats, show_progress)
            plan.width = width
        bar = hf_logging.tqdm(targets, desc="Solving", unit="layer", disable=not show_progress or None)
        for c in bar:
            plan.decompositions[c] = solve(c, grams.pop(c).gram)
        def choose() -> tuple[dict[str, int], dict[str, Any]]:
            """The ranks and the planner's record; no ranks without a linear target (attention-only)."""
            return (plan.choose() if targets else {}), plan.result

        # Timings (and a user loss_fn) differ between processes, and the planner refuses a budget from what
        # its own process measured: a target_speedup out of reach, no rank faster than its dense matmul or a
        # max_loss too small (greedy and drone factor only layers that time faster), a loss_fn that fails.
        # Every process takes process 0's ranks, or raises process 0's error (decided_by_process_zero).
        ranks, plan.result = decided_by_process_zero(choose, "choosing ranks")
        plan.width_steps = plan.result.pop("mlp_width_steps", {})  # process 0's widths, like its ranks
        if targets and not ranks and not plan.width_steps and attention is None:
            raise ValueError(_nothing_to_factor(config, len(targets)))
    else:  # uniform ranks are known from the shapes alone
        ranks = dict(fixed) | {c: uniform_rank(*shapes[c], config.param_ratio) for c in targets if c not in fixed}
        plan.result = {"strategy": "uniform", "budget": {"param_ratio": config.param_ratio},
                       "factored_layers": len(ranks), "dense_layers": len(targets) - len(ranks)}

    if config.sequential:
        originals = {full: layer for full, layer in targets.values()}
        try:
            replacements = compress_sequentially(
                model, targets, data, widths, observe_output, solve, ranks, show_progress, cache=cache,
                compensated=solve_compensated if config.sequential == "compensated" else None,
                input_widths={c: shapes[c][1] for c in targets},
                pruned=width.sequential_blocks(plan.width_steps) if width is not None else None,
                narrow=functools.partial(width.narrowed_from, plan.width_steps) if width is not None else None,
            )
        except BaseException:
            replace_modules(model, {f: m for f, m in originals.items() if model.get_submodule(f) is not m})
            raise
        plan.result["sequential"] = config.sequential
        if config.max_loss is not None and (ranks or plan.width_steps) and one_shot:
            replacements = _keep_loss_budget(model, plan, targets, ranks, replacements, config.max_loss)
    else:
        replacements = {targets[c][0]: plan.factored(c, k) for c, k in ranks.items()}
        if width is not None:
            replacements |= width.replacements(plan.width_steps)
        if attention is not None:
            attention.solve(show_progress)  # all math before anything is swapped
        replace_modules(model, replacements)
        if attention is not None:
            attention.install(model)  # after the linear swap: factored values are carried over
    config.ranks = {c: replacements[targets[c][0]].rank for c in ranks}
    config.relative_errors = {c: replacements[targets[c][0]].relative_error for c in ranks}
    config.calibration = {
        "dataset": _describe_dataset(config.dataset),
        "num_texts": all_reduce_count(data.num_texts),
        "num_tokens": all_reduce_count(data.num_tokens),
        "max_length": max_length,
        "eval_texts": len(eval_texts),
    }
    config.allocation_result = plan.result if targets else None
    if targets:
        total = sum(o * i for o, i in shapes.values())
        narrowed = width.parameters(plan.width_steps) if width is not None else {}
        kept = sum(
            replacements[targets[c][0]].factored_parameters if c in ranks else narrowed.get(c, o * i)
            for c, (o, i) in shapes.items()
        )
        config.allocation_result["targeted_param_ratio"] = kept / total
        if config.allocation == "uniform" and config.param_ratio is not None:
            _note_uniform_overshoot(config, shapes, fixed, kept / total)
    if attention is not None:
        attention.record(config)
    if width is not None:
        width.record(config, plan.width_steps)
    return model


def _note_uniform_overshoot(config: DroneConfig, shapes: dict[str, tuple[int, int]], fixed: dict[str, int],
                            achieved: float) -> None:
    """Warn when uniform ranks keep more than ``param_ratio`` of the targeted weights, naming why.

    Uniform gives every free layer the largest rank within ``param_ratio``, with a floor of rank 1,
    and layers pinned by ``ranks=`` keep their rank: below what rank 1 keeps, or with large pinned
    ranks, the whole comes out above the ratio asked for. Greedy refuses such a budget; uniform is a
    per-layer rule, so it compresses and says by how much the total differs.
    """
    ratio = float(config.param_ratio)
    if achieved <= ratio + 1e-9:
        return
    floor = [c for c in shapes if c not in fixed and ratio * math.prod(shapes[c]) < sum(shapes[c])]
    causes, fixes = [], []
    if floor:
        causes.append(f"{len(floor)} layers are at the rank-1 floor (rank 1 keeps more than {ratio:g} of them)")
        fixes.append("accept the larger total (rank 1 is the least a factored layer keeps) or leave those "
                     "layers out (modules_to_not_convert)")
    if fixed:
        causes.append(f"{len(fixed)} layers keep the ranks given in ranks=")
        fixes.append("lower the ranks= entries (allocation='greedy' spends the rest of the budget around them)")
    fix = "; or ".join(fixes) or "raise param_ratio"
    logger.warning(
        f"allocation='uniform' with param_ratio={ratio:g} keeps {achieved:.3f} of the targeted weights: "
        f"{' and '.join(causes) or 'rank rounding'}. {fix[:1].upper() + fix[1:]}."
    )


def _keep_loss_budget(
    model: nn.Module, plan: RankPlanner, targets: dict, ranks: dict[str, int], replacements: dict[str, nn.Module],
    max_loss: float,
) -> dict[str, nn.Module]:
    """Measure the sequentially solved model against ``max_loss``; keep the one-shot factors if it misses.

    The planner chose the ranks on one-shot factors and measured their loss; the sequential re-solve
    changes every factor after the first block, and on some models (a tiny random Llama: 0.00095
    planned, 0.00208 after the re-solve) the loss rises past the budget. The budget is the promise,
    so the one-shot factors, measured within it, are installed instead, with a warning.
    """
    def measure() -> tuple[float, bool]:
        measured = plan.evaluator().increase(model)
        return measured, measured <= max_loss

    # process 0 decides for all: a loss_fn may measure (or fail) differently per process
    measured, keep = decided_by_process_zero(measure, "measuring the sequentially solved model")
    plan.result["sequential_loss_increase"] = measured
    if keep:
        plan.result["measured_loss_increase"] = measured
        return replacements
    one_shot = plan.full(ranks)  # the one-shot factors and narrowed MLP blocks
    replace_modules(model, one_shot)
    plan.result["sequential_kept"] = False
    logger.warning(
        f"sequential={plan.config.sequential!r} re-solved the layers to a loss increase of {measured:.4g}, above "
        f"max_loss={max_loss:g}; keeping the one-shot factors ({plan.result['measured_loss_increase']:.4g}), "
        "which meet it. Use sequential=False to skip the re-solve, or allow a larger max_loss."
    )
    return one_shot


def attach_quantizer(model: nn.Module, config: DroneConfig) -> None:
    """Mark an in-memory model as DRONE-compressed exactly as ``from_pretrained`` would, so
    ``save_pretrained``, ``dequantize`` and ``Trainer`` treat it the same way."""
    from .quantizer import DroneHfQuantizer

    quantizer = DroneHfQuantizer(config, pre_quantized=True)
    quantizer.quantization_config = config  # keep the very record just filled in
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.quantization_config = config
    from transformers.quantizers.base import _assign_is_quantized

    _assign_is_quantized(model)


def compress(
    model: nn.Module, config: DroneConfig | None = None, *, show_progress: bool = True, **overrides: Any
) -> nn.Module:
    """Compress an already loaded model in place with DRONE, and return it.

    Use this for a model you fine-tuned in memory; it runs the same engine as
    ``from_pretrained(..., drone_config=...)``. The given ``config`` is not modified: the model
    carries its own copy (``model.config.quantization_config``) with the real ranks filled in, so
    ``model.save_pretrained`` writes a DRONE checkpoint that plain ``from_pretrained`` rebuilds.

    Args:
        model: a transformers ``PreTrainedModel`` (or any module with linear layers and a tokenizer
            given in the config).
        config: a :class:`DroneConfig`; ``None`` for the defaults.
        show_progress: progress bars for calibration and solving.
        **overrides: shorthand for config fields, e.g. ``compress(model, param_ratio=0.3)``.

    Raises:
        ValueError: bad configuration or data (the message names the fix); the model is unchanged.

    Example::

        >>> import drone_hf
        >>> model = drone_hf.compress(model, drone_hf.DroneConfig(param_ratio=0.5))
        >>> print(drone_hf.report(model))
    """
    if config is None:
        config = DroneConfig(**overrides)
    else:
        if not isinstance(config, DroneConfig):
            raise TypeError(f"config must be a DroneConfig, got {type(config).__name__}.")
        config = copy.deepcopy(config)
        if overrides:
            unknown = [k for k in overrides if not hasattr(config, k)]
            if unknown:
                raise ValueError(
                    f"Unknown DroneConfig field(s) {unknown} passed to compress(); known fields are "
                    f"{sorted(k for k in config.to_dict() if k != 'quant_method')}."
                )
            for key, value in overrides.items():
                setattr(config, key, value)
    with torch.no_grad():
        compress_in_place(model, config, show_progress=show_progress)
    attach_quantizer(model, config)
    return model
