"""Paired statistics for error-compensated sequential calibration: the same tokens, seen by a block
of the dense model and by the same block in the partly compressed model.

For each target layer the compensated solver (:mod:`drone_hf.solver.compensated`) needs, over the
calibration tokens, ``Ĝ = Σ x̂ x̂ᵀ`` (inputs in the compressed model), ``C = Σ x x̂ᵀ`` (dense input
``x`` of the same token times ``x̂``) and ``||W X||² = Σ ||W x||²``.

A block is calibrated one execution group at a time (query/key/value, then the attention output,
then gate/up, then down): per group and batch the block runs on the dense stream with all its layers
dense, and on the compressed stream with the earlier groups already factored, each only as far as
the group's last layer. Calibrating the whole block at once would pair, say, the attention output's
inputs from *dense* query/key/value with the dense model's, so it would correct again an error the
factored query/key/value already correct: on SmolLM2 that double correction made perplexity worse
than no correction at all. Memory: two ``n x n`` float64 matrices per distinct layer input, and one
batch of dense activations.

Layers that read the very same tensor (query/key/value, gate/up) share one ``Ĝ`` and ``C``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from .blocks import BlockInputs, run_block
from .distributed import all_reduce_observers, all_reduce_sum, world
from .observer import GramObserver
from .pipeline import real_tokens


class PairedObserver:
    """``Ĝ`` (a :class:`GramObserver` of the compressed-model inputs), ``C`` and ``||W X||²`` of one layer."""

    def __init__(self, features: int, name: str = "") -> None:
        self.name = name
        self.hat = GramObserver(features, name)
        self.cross: torch.Tensor | None = None
        self.dense_energy = 0.0

    @property
    def gram(self) -> torch.Tensor | None:
        """``Ĝ`` so far (float64)."""
        return self.hat.gram

    def add_cross(self, dense: torch.Tensor, hat: torch.Tensor) -> None:
        """Add ``Σ x x̂ᵀ`` of [N, n] paired real tokens (one float32 product per batch, summed in float64)."""
        wide = torch.float64 if hat.dtype == torch.float64 else torch.float32
        product = (dense.to(wide).T @ hat.to(wide)).to(torch.float64)
        self.cross = product if self.cross is None else self.cross + product

    def share_from(self, leader: PairedObserver) -> None:
        """Take ``leader``'s ``Ĝ`` and ``C`` (a layer reading the same tensors); the energy stays own."""
        self.hat.share_from(leader.hat)
        self.cross = leader.cross

    def state(self) -> dict[str, Any]:
        return {"hat": self.hat.state(), "cross": self.cross, "dense_energy": self.dense_energy}

    def load_state(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.hat.load_state(state["hat"], device)
        cross = state["cross"]
        self.cross = cross.to(device) if cross is not None and device is not None else cross
        self.dense_energy = float(state["dense_energy"])


class _Stop(Exception):
    """Raised by the hook of a group's last layer: the rest of the block is not needed for its statistics."""


def execution_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """``layers`` (name -> module inside ``block``) in the order the block runs them, layers that read
    the very same tensor (query/key/value, gate/up) in one group.

    Compensated calibration factors a block group by group, so that each group is calibrated on what
    the already factored groups of its own block produce (GPTQ's "true sequential" order).

    Raises:
        RuntimeError: a layer never runs in the block's forward pass.
    """
    order: list[tuple[str, Any]] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if all(n != name for n, _ in order):
                order.append((name, args[0]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - {n for n, _ in order})
    if missing:
        raise RuntimeError(
            f"Layer {missing[0]!r} never ran in its block's forward pass; compensated calibration cannot order it. "
            "Exclude it with modules_to_not_convert."
        )
    groups: list[list[str]] = []
    for i, (name, x) in enumerate(order):
        if i and order[i - 1][1] is x:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def collect_paired(
    block: nn.Module,
    layers: dict[str, nn.Module],
    widths: dict[str, int],
    dense_stream: list[BlockInputs],
    compressed_stream: list[BlockInputs],
    masks: list[torch.Tensor],
    dense_block: Callable[[], AbstractContextManager],
) -> dict[str, PairedObserver]:
    """Paired statistics of ``layers`` (one execution group inside ``block``) over every calibration batch.

    Each batch runs ``block`` twice, each time only up to the group's last layer: on the dense
    stream inside ``dense_block()`` (a context in which every layer of the block is dense again) and
    on the compressed stream as the block now is (earlier groups factored). Neither stream is changed.

    Args:
        widths: name -> the layer's input width.
        masks: per batch, the attention mask selecting its real tokens.
    """
    observers = {name: PairedObserver(widths[name], name) for name in layers}
    leader_of: dict[str, str] = {}
    batch: dict[str, Any] = {}  # what the current batch's hooks share
    remaining: set[str] = set()

    def finish(name: str) -> None:
        remaining.discard(name)
        if not remaining:
            raise _Stop

    def dense_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            state = batch["dense_state"]
            batch["dense_input"][name] = x
            batch["dense_rows"][name] = real_tokens(x, state, name)
            bias = getattr(module, "bias", None)
            y = output - bias if bias is not None else output  # W x: the bias cancels in W x - W' x̂
            rows = real_tokens(y, state, name)
            observers[name].dense_energy += float(rows.to(torch.float64).square().sum())
            finish(name)

        return hook

    def compressed_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x_hat = args[0]
            last = batch["last"]
            shared = (
                last is not None
                and last[0] is x_hat
                and batch["dense_input"][last[1]] is batch["dense_input"][name]
            )
            if batch["index"] == 0 and shared and name not in leader_of:
                leader_of[name] = leader_of.get(last[1], last[1])
            if shared != (name in leader_of):
                raise RuntimeError(
                    f"Layer {name!r} shares its input with another layer in some calibration batches but not in "
                    "others; compensated calibration cannot pair its statistics."
                )
            if not shared:
                rows = real_tokens(x_hat, batch["hat_state"], name)
                obs = observers[name]
                obs.hat.accumulate(rows, batch["index"])
                obs.add_cross(batch["dense_rows"][name], rows)
                batch["last"] = (x_hat, name)
            finish(name)

        return hook

    def run_until_done(item: BlockInputs, hook) -> None:
        remaining.update(layers)
        handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
        try:
            run_block(block, item)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if remaining:
            raise RuntimeError(f"Layer {sorted(remaining)[0]!r} did not run in its block; it cannot be calibrated.")

    with torch.inference_mode():
        for index, (dense_item, item) in enumerate(zip(dense_stream, compressed_stream, strict=True)):
            mask = masks[index].bool()
            batch.clear()
            batch.update(
                index=index, last=None, dense_input={}, dense_rows={},
                dense_state={"mask": mask, "rows": {}}, hat_state={"mask": mask, "rows": {}},
            )
            with dense_block():
                run_until_done(dense_item, dense_hook)
            run_until_done(item, compressed_hook)
    if world()[1] > 1:  # torchrun / accelerate launch: every process gets the whole set's statistics
        all_reduce_observers({n: o.hat for n, o in observers.items()}, shared=leader_of)
        for name in sorted(observers):
            obs = observers[name]
            if name not in leader_of:
                n = obs.hat.features
                cross = obs.cross if obs.cross is not None else torch.zeros(n, n, dtype=torch.float64)
                obs.cross = all_reduce_sum(cross)
            obs.dense_energy = float(all_reduce_sum(torch.tensor([obs.dense_energy], dtype=torch.float64)))
    for name, leader in leader_of.items():
        observers[name].share_from(observers[leader])
    return observers
