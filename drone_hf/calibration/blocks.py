"""Block-by-block (layer-sequential) calibration support: find the repeated blocks, capture what
the first one receives, and replay any block on stored inputs.

Assumptions, checked where possible: the model's repeated blocks (its ``_no_split_modules`` classes,
else the longest ``nn.ModuleList`` of one module type) form a chain, each block's first input (or
``hidden_states`` keyword) is the previous block's first output, and every other argument (masks,
position embeddings) is the same for all blocks. This holds for BERT/RoBERTa/MPNet/DistilBERT-style
encoders and GPT-2/Llama-style decoders; encoder-decoder models do not fit and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Keyword arguments holding a KV cache: stored as ``None`` so replaying a block never grows a cache.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first block's inputs are stored."""


@dataclass
class BlockInputs:
    """What one block receives for one calibration batch."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    uses_keyword: bool = False


def find_blocks(model: nn.Module, targets: set[str]) -> list[tuple[str, nn.Module]]:
    """The chain of repeated blocks (full name, module) from the first to the last that holds a target.

    Blocks between two target-holding ones stay in the chain even when they hold no target (all
    their layers kept dense): the replay must run them, or the blocks after them would be
    calibrated on the outputs of the wrong block. Blocks before the first are run by the model
    itself (the first block's inputs are captured from a full forward pass), blocks after the last
    are not needed.

    Raises:
        ValueError: no block structure is found, or the model is an encoder-decoder.
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(
            "sequential=True is not supported for encoder-decoder models (their blocks do not form one chain); "
            "use the default one-shot calibration."
        )
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in kinds]
    if not candidates:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        lists = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1]
        if lists:
            name, best = max(lists, key=lambda x: len(x[1]))
            candidates = [(f"{name}.{i}", c) for i, c in enumerate(best)]
    # outermost blocks only, from the first to the last holding a target
    blocks = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates if o != n)]
    holding = [i for i, (n, _) in enumerate(blocks) if any(t == n or t.startswith(n + ".") for t in targets)]
    blocks = blocks[holding[0] : holding[-1] + 1] if holding else []
    if not blocks:
        raise ValueError(
            f"sequential=True found no repeated blocks holding the target layers in {type(model).__name__}; "
            "use the default one-shot calibration."
        )
    return blocks


def _block_call(module: nn.Module, args: tuple, kwargs: dict) -> BlockInputs:
    """What a block was called with, split into its hidden states and the rest; KV caches are left
    out (replays must not append to them)."""
    kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
    if args:
        return BlockInputs(hidden=args[0], args=args[1:], kwargs=dict(kwargs))
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return BlockInputs(hidden=kwargs["hidden_states"], kwargs=rest, uses_keyword=True)
    raise ValueError(f"{type(module).__name__} was called without hidden states; sequential mode cannot follow it.")


def capture_first_block_inputs(
    model: nn.Module, first: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> list[BlockInputs]:
    """Run the model up to ``first`` on each batch and keep what ``first`` was called with."""
    stored: list[BlockInputs] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stored.append(_block_call(module, args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    model(**{k: v.to(device) for k, v in batch.items()})
                except _Captured:
                    continue
                raise RuntimeError("The first block never ran; sequential calibration cannot capture its inputs.")
    finally:
        handle.remove()
    return stored


#: Config fields that give each block its own kind (and so its own mask): transformers'
#: ``layer_types`` (sliding-window / full-attention layers of Qwen2, Gemma, Mistral-style models...)
#: and GPT-Neo's ``attention_layers``.
_PER_BLOCK_KINDS = ("layer_types", "attention_layers")


def blocks_differ(model: nn.Module) -> bool:
    """Whether the model's blocks are of several kinds, each called with its own side inputs (the
    attention mask of a sliding-window layer differs from a full-attention layer's)."""
    cfg = getattr(model, "config", None)
    for key in _PER_BLOCK_KINDS:
        kinds = getattr(cfg, key, None)
        if isinstance(kinds, (list, tuple)) and len({str(k) for k in kinds}) > 1:
            return True
    return False


def capture_all_block_inputs(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[dict[str, torch.Tensor]],
    device: torch.device,
) -> tuple[list[BlockInputs], list[list[tuple[tuple, dict[str, Any]]]]]:
    """The first block's inputs per batch (as :func:`capture_first_block_inputs`) and what every
    block is called with besides its hidden states, per block and batch: ``(args, kwargs)``.

    Sequential calibration replays block ``i`` on stored hidden states; with blocks of several kinds
    (:func:`blocks_differ`) it must replay each with its own side inputs, not the first block's: a
    sliding-window layer replayed with the full-attention mask is calibrated on the wrong attention
    pattern (measured by a review on a tiny Qwen2 with one sliding-window layer: the second layer's
    Gram off by 39% at full rank). One dense forward per batch records both; blocks of one kind
    share the same tensors, so this holds little more than one set of masks per kind."""
    calls: list[list[BlockInputs | None]] = [[None] * len(batches) for _ in blocks]
    current = [0]
    handles = []
    for j, (_, block) in enumerate(blocks):
        def hook(module: nn.Module, args: tuple, kwargs: dict, j: int = j) -> None:
            calls[j][current[0]] = _block_call(module, args, kwargs)
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                current[0] = i
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in calls[0]):
        raise RuntimeError("The first block never ran; sequential calibration cannot capture its inputs.")
    side = [[(c.args, c.kwargs) for c in per_block] for per_block in calls]  # type: ignore[union-attr]
    return calls[0], side  # type: ignore[return-value]


def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """The block's first output (the next block's hidden states) on stored inputs."""
    if inputs.uses_keyword:
        out = block(hidden_states=inputs.hidden, **inputs.kwargs)
    else:
        out = block(inputs.hidden, *inputs.args, **inputs.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out) or out.shape != inputs.hidden.shape:
        raise ValueError(
            f"{type(block).__name__} does not return hidden states of its input's shape; sequential mode needs "
            "blocks whose first output feeds the next block. Use the default one-shot calibration."
        )
    return out
