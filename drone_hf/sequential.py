"""Layer-sequential compression: calibrate and factor one block at a time, each on the outputs of
the blocks already compressed (error propagation, as GPTQ-style pipelines do).

One-shot calibration measures every layer on the *dense* model's activations, but the compressed
model feeds later layers slightly different inputs. Here block ``i`` is calibrated on what the
compressed blocks ``0..i-1`` produce, factored, and then run again to produce the inputs of block
``i+1``; layers outside the blocks (a pooler) are calibrated last, through the whole compressed
model. Only one block's statistics exist at a time.

Ranks are decided before the sequential pass: uniform and fixed ranks directly from the shapes;
budgets that need spectra, latency or loss (greedy, drone, target_speedup, max_loss) from a
one-shot plan, whose ranks the sequential pass then re-solves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .calibration import CalibrationBatches, collect_grams
from .calibration.pipeline import _eval_mode
from .calibration.blocks import BlockInputs, capture_first_block_inputs, find_blocks, run_block
from .modules.low_rank_linear import DroneLinear
from .modules.targets import replace_modules
from .solver import Decomposition


def compress_sequentially(
    model: nn.Module,
    targets: dict[str, tuple[str, nn.Module]],
    data: CalibrationBatches,
    widths: dict[str, int],
    observe_output: set[str],
    solve: Callable[[str, torch.Tensor], Decomposition],
    ranks: dict[str, int],
    show_progress: bool,
) -> dict[str, DroneLinear]:
    """Factor ``targets`` at ``ranks`` block by block; returns full name -> installed ``DroneLinear``.

    Args:
        targets: canonical name -> (full name, layer).
        widths: canonical name -> width of the observed statistic (input, or output for
            ``observe_output`` layers).
        solve: ``(canonical name, gram) -> Decomposition`` (the engine's solver choice).
        ranks: canonical name -> rank; layers absent stay dense.

    The model is modified as it goes (block ``i`` is swapped before block ``i+1`` is calibrated); on
    an error the caller restores the dense layers from its own references.
    """
    full_to_c = {full: c for c, (full, _) in targets.items()}
    chosen = [full for c, (full, _) in targets.items() if c in ranks]  # module order: deterministic
    blocks = find_blocks(model, set(chosen))
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    installed: dict[str, DroneLinear] = {}

    def factor(names: list[str], grams: dict) -> None:
        replacements = {}
        for full in names:
            c = full_to_c[full]
            fact = solve(c, grams.pop(c).gram).factors(ranks[c])
            layer = targets[c][1]
            replacements[full] = DroneLinear.from_factors(layer, fact.up, fact.down, fact.relative_error)
        replace_modules(model, replacements)
        installed.update(replacements)

    with _eval_mode(model):
        stored: list[BlockInputs] = capture_first_block_inputs(model, blocks[0][1], data.batches, device)
        bar = hf_logging.tqdm(blocks, desc="Sequential blocks", unit="block", disable=not show_progress or None)
        for block_name, block in bar:
            inside = [f for f in chosen if f.startswith(block_name + ".")]
            if inside:
                layers = {full_to_c[f]: model.get_submodule(f) for f in inside}

                def forward(i: int, batch: dict, block: nn.Module = block) -> None:
                    run_block(block, stored[i])

                grams = collect_grams(
                    model, layers, data, {c: widths[c] for c in layers}, False,
                    forward=forward, observe_output=observe_output & set(layers),
                )
                factor(inside, grams)
            with torch.inference_mode():
                for item in stored:  # the compressed block's outputs feed the next block
                    item.hidden = run_block(block, item)
        rest = [f for f in chosen if f not in installed]
        if rest:  # layers outside the block chain (e.g. a pooler): through the whole compressed model
            layers = {full_to_c[f]: model.get_submodule(f) for f in rest}
            grams = collect_grams(model, layers, data, {c: widths[c] for c in layers}, False,
                                  observe_output=observe_output & set(layers))
            factor(rest, grams)
    return installed
