"""Layer-sequential compression: calibrate and factor one block at a time, each on the outputs of
the blocks already compressed (error propagation, as GPTQ-style pipelines do).

One-shot calibration measures every layer on the *dense* model's activations, but the compressed
model feeds later layers slightly different inputs. Here block ``i`` is calibrated on what the
compressed blocks ``0..i-1`` produce, factored, and then run again to produce the inputs of block
``i+1``; layers outside the blocks (a pooler) are calibrated last, through the whole compressed
model. Only one block's statistics exist at a time.

``sequential="compensated"`` also carries the dense model's activations block by block beside the
compressed ones and solves ``min ||W X - W' X̂||`` (dense outputs from the compressed model's inputs,
:mod:`drone_hf.solver.compensated`) instead of ``min ||(W - W') X̂||``: each layer then also corrects
the error its predecessors left, instead of passing it on (``method="drone-kfac"``: the same with
the error weighted by the dense model's output-gradient Gram). A block is calibrated one execution group
at a time (query/key/value, attention output, gate/up, down: ``calibration.paired.execution_groups``),
each on what the factored groups before it produce. Cost: two partial block passes per group and
batch, and a second ``n x n`` matrix (the cross-Gram) per distinct layer input.

Ranks are decided before the sequential pass: uniform and fixed ranks directly from the shapes;
budgets that need spectra, latency or loss (greedy, drone, target_speedup, max_loss) from a
one-shot plan, whose ranks the sequential pass then re-solves. MLP blocks the plan width-prunes
(``prune_mlp``) keep the plan's neurons; their output layer is calibrated like a factored one (its
input at full width, the block's input layers still dense) and its compensated weight re-solved on
the compressed stream, then the whole block is narrowed (``narrow``).

With accelerate offload (``device_map`` with ``"cpu"``/``"disk"`` entries) each block's target layers
are materialised right before the block is calibrated and replaced by their factors after it, so at
most one dense block is held in memory (see :mod:`drone_hf.calibration.offload`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .calibration import CalibrationBatches, collect_grams
from .calibration.blocks import (
    BlockInputs,
    blocks_differ,
    capture_all_block_inputs,
    capture_first_block_inputs,
    find_blocks,
    run_block,
)
from .calibration.offload import materialise
from .calibration.paired import PairedObserver, collect_paired, execution_groups
from .calibration.pipeline import _eval_mode
from .modules.low_rank_linear import DroneLinear
from .modules.targets import replace_modules
from .solver import Decomposition
from .utils.logging import get_logger

if TYPE_CHECKING:
    from .calibration.cache import CalibrationCache

logger = get_logger(__name__)


def compress_sequentially(
    model: nn.Module,
    targets: dict[str, tuple[str, nn.Module]],
    data: CalibrationBatches,
    widths: dict[str, int],
    observe_output: set[str],
    solve: Callable[[str, torch.Tensor], Decomposition],
    ranks: dict[str, int],
    show_progress: bool,
    cache: CalibrationCache | None = None,
    compensated: Callable[[str, PairedObserver], Decomposition] | None = None,
    input_widths: dict[str, int] | None = None,
    pruned: dict[str, tuple[tuple[str, ...], int]] | None = None,
    narrow: Callable[[str, Any], dict[str, nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """Factor ``targets`` at ``ranks`` (and narrow the ``pruned`` MLP blocks) block by block; returns
    full name -> installed ``DroneLinear`` (or narrowed layer).

    Args:
        targets: canonical name -> (full name, layer).
        widths: canonical name -> width of the observed statistic (input, or output for
            ``observe_output`` layers).
        solve: ``(canonical name, gram) -> Decomposition`` (the engine's solver choice).
        ranks: canonical name -> rank; layers absent stay dense.

        cache: resumable calibration (:mod:`~drone_hf.calibration.cache`): each block's statistics
            and the latest block's outputs are written as blocks finish; finished blocks found there
            are re-solved from their statistics without running them.
        compensated: ``(canonical name, paired statistics) -> Decomposition``: the error-compensated
            solver; given, the blocks' layers are solved from paired dense/compressed statistics
            (layers outside the blocks still by ``solve``).
        input_widths: canonical name -> input width (needed with ``compensated``: paired statistics
            are always input-side).
        pruned: output layer -> (input layers, kept width) of each MLP block to narrow (canonical names).
        narrow: ``(output layer, its statistics) -> {full name: narrowed layer}`` for the whole block
            (a ``GramObserver``, or a ``PairedObserver`` with ``compensated``).

    The model is modified as it goes (block ``i`` is swapped before block ``i+1`` is calibrated); on
    an error the caller restores the dense layers from its own references.
    """
    pruned = pruned or {}
    full_to_c = {full: c for c, (full, _) in targets.items()}
    # module order: deterministic
    chosen = [full for c, (full, _) in targets.items() if c in ranks or c in pruned]
    blocks = find_blocks(model, set(chosen))
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    installed: dict[str, nn.Module] = {}

    def block_inputs(names: list[str]) -> list[str]:
        """Full names of the input layers of the pruned MLP blocks whose output layer is in ``names``."""
        return [targets[m][0] for full in names for m in pruned.get(full_to_c[full], ((), 0))[0]]

    def factor(names: list[str], grams: dict) -> None:
        replacements = {}
        materialise(model.get_submodule(full) for full in names + block_inputs(names))  # offloaded: dense weights
        for full in names:
            c = full_to_c[full]
            stats = grams.pop(c)
            if c in pruned:
                assert narrow is not None
                replacements |= narrow(c, stats)
                continue
            dec = compensated(c, stats) if isinstance(stats, PairedObserver) else solve(c, stats.gram)
            fact = dec.factors(ranks[c])
            layer = targets[c][1]
            replacements[full] = DroneLinear.from_factors(layer, fact.up, fact.down, fact.relative_error)
        replace_modules(model, replacements)
        installed.update(replacements)

    def calibrate_plain(block: nn.Module, inside: list[str], layers: dict[str, nn.Module]) -> dict:
        """Statistics of the block's targets on the compressed stream, then the targets factored."""
        if not inside:
            return {}

        def forward(i: int, batch: dict) -> None:
            run_block(block, stored[i])

        grams = collect_grams(
            model, layers, data, {c: widths[c] for c in layers}, False,
            forward=forward, observe_output=observe_output & set(layers),
        )
        states = {c: o.state() for c, o in grams.items()}
        factor(inside, grams)
        return states

    def calibrate_compensated(block: nn.Module, inside: list[str], layers: dict[str, nn.Module]) -> dict:
        """Group by group (q/k/v, o, gate/up, down): each calibrated behind its own block's factored
        groups, then factored; then the dense block's outputs advance the dense stream."""
        assert dense is not None and input_widths is not None
        # the dense layers, a narrowed block's input layers too (they are swapped with its output layer)
        originals = {full: targets[full_to_c[full]][1] for full in inside + block_inputs(inside)}

        def dense_block():
            return _swapped(model, originals)

        states = {}
        for group in execution_groups(block, layers, stored[0]) if layers else []:
            paired = collect_paired(
                block, {c: layers[c] for c in group}, {c: input_widths[c] for c in group}, dense, stored,
                masks, dense_block,
            )
            states.update({c: o.state() for c, o in paired.items()})
            factor([targets[c][0] for c in group], paired)
        with torch.inference_mode(), dense_block():
            for item in dense:  # the dense block's outputs feed the dense stream's next block
                item.hidden = run_block(block, item)
        return states

    with _eval_mode(model):
        # blocks of several kinds (sliding-window and full attention): each is replayed with its own mask
        side = None
        if blocks_differ(model):
            stored, side = capture_all_block_inputs(model, blocks, data.batches, device)
        else:
            stored = capture_first_block_inputs(model, blocks[0][1], data.batches, device)
        # the dense model's stream beside the compressed one (compensated mode): same batches, own hidden states
        dense = [BlockInputs(s.hidden, s.args, s.kwargs, s.uses_keyword) for s in stored] if compensated else None
        masks = [b["attention_mask"] for b in data.batches]
        start = 0
        if cache is not None:
            from .calibration.cache import value_fingerprint

            bound = {"ranks": value_fingerprint(sorted((c, int(k)) for c, k in ranks.items()))}
            if pruned:  # the narrowed blocks change the stream as ranks do (only then bound: old caches stay valid)
                bound["pruned"] = value_fingerprint(sorted((c, list(ins), int(w)) for c, (ins, w) in pruned.items()))
            cache.bind(bound)
            start = _resume(cache, blocks, chosen, full_to_c, widths if dense is None else input_widths, stored,
                            device, factor, dense)
        bar = hf_logging.tqdm(
            total=len(blocks), initial=start, unit="block", disable=not show_progress or None,
            desc="Sequential blocks" + (f" ({start} resumed from cache)" if start else ""),
        )
        for index in range(start, len(blocks)):
            block_name, block = blocks[index]
            if side is not None:
                for stream in [stored] + ([dense] if dense is not None else []):
                    for item, (args, kwargs) in zip(stream, side[index], strict=True):
                        item.args, item.kwargs = args, kwargs
            inside = [f for f in chosen if f.startswith(block_name + ".")]
            layers = {full_to_c[f]: model.get_submodule(f) for f in inside}
            materialise(layers.values())  # offloaded: this block's dense targets, once, not per batch
            calibrate = calibrate_plain if dense is None else calibrate_compensated
            states = calibrate(block, inside, layers)  # statistics taken and the block's targets factored
            if cache is not None:
                cache.save(_block_entry(index), states)
            with torch.inference_mode():
                for item in stored:  # the compressed block's outputs feed the next block
                    item.hidden = run_block(block, item)
            if cache is not None:  # only the latest outputs are kept: they are what a resume needs
                latest = {"block": index, "hidden": [item.hidden for item in stored]}
                if dense is not None:
                    latest["dense_hidden"] = [item.hidden for item in dense]
                cache.save("outputs", latest)
            bar.update(1)
        bar.close()
        rest = [f for f in chosen if f not in installed]
        if rest:  # layers outside the block chain (e.g. a pooler): through the whole compressed model
            layers = {full_to_c[f]: model.get_submodule(f) for f in rest}
            materialise(layers.values())
            grams = collect_grams(model, layers, data, {c: widths[c] for c in layers}, False,
                                  observe_output=observe_output & set(layers), cache=cache, cache_entry="rest")
            factor(rest, grams)
    return installed


@contextmanager
def _swapped(model: nn.Module, modules: dict[str, nn.Module]):
    """``model`` with ``modules`` (full name -> module) installed, and what was there put back after."""
    previous = {full: model.get_submodule(full) for full in modules}
    replace_modules(model, modules)
    try:
        yield
    finally:
        replace_modules(model, previous)


def _block_entry(index: int) -> str:
    return f"block-{index:05d}"


def _resume(
    cache: CalibrationCache,
    blocks: list[tuple[str, nn.Module]],
    chosen: list[str],
    full_to_c: dict[str, str],
    widths: dict[str, int],
    stored: list[BlockInputs],
    device: torch.device,
    factor: Callable[[list[str], dict], None],
    dense: list[BlockInputs] | None = None,
) -> int:
    """Install the blocks the cache has finished and return the index of the first block to run.

    A resume needs the statistics of every block up to ``j`` and the outputs of block ``j`` (only
    the latest outputs are kept); anything less, or a damaged entry, resumes earlier (at worst from
    the start). Several processes agree on the smallest resume point; a process whose stored outputs
    are not at that point makes everyone start over (all processes must replay the same blocks).
    """
    from .calibration.distributed import agree_min
    from .calibration.observer import GramObserver

    outputs = cache.load("outputs")
    start, states = 0, []
    paired = dense is not None
    if (
        outputs is not None and len(outputs["hidden"]) == len(stored) and outputs["block"] < len(blocks)
        and paired == ("dense_hidden" in outputs)
    ):
        for index in range(int(outputs["block"]) + 1):
            st = cache.load(_block_entry(index))
            if st is None:
                break
            states.append(st)
        else:
            start = len(states)
    agreed = agree_min(start)
    if agree_min(int(agreed == start)) == 0:
        agreed = 0
    if agreed == 0:
        return 0
    for index in range(agreed):
        block_name = blocks[index][0]
        inside = [f for f in chosen if f.startswith(block_name + ".")]
        grams = {}
        for f in inside:
            c = full_to_c[f]
            if c not in states[index]:
                raise ValueError(f"Calibration cache entry {_block_entry(index)} has no statistics for {c!r}.")
            grams[c] = PairedObserver(widths[c], c) if paired else GramObserver(widths[c], c)
            grams[c].load_state(states[index][c], device)
        if inside:
            factor(inside, grams)
    for item, hidden in zip(stored, outputs["hidden"], strict=True):
        item.hidden = hidden.to(device)
    for item, hidden in zip(dense or [], outputs.get("dense_hidden", []), strict=True):
        item.hidden = hidden.to(device)
    logger.info(f"Calibration cache: {agreed} of {len(blocks)} blocks finished earlier; resuming at block {agreed}.")
    return agreed
