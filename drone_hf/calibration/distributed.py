"""Multi-process calibration through ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

Each process takes a shard of the calibration texts; the Gram statistics are summed over processes
with one ``all_reduce`` per layer (gloo on CPU, NCCL on GPU), so every process ends with the
statistics of the whole set and solves the same problem: identical factors everywhere, up to the
order of floating-point sums. Nothing happens in a single process.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..utils.logging import get_logger
from .observer import GramObserver

logger = get_logger(__name__)

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_texts(texts: list[str]) -> list[str]:
    """This process's share of ``texts`` (every ``world``-th text, starting at its rank).

    Raises:
        ValueError: fewer texts than processes: some process would calibrate on nothing.
    """
    rank, size = world()
    if size == 1:
        return texts
    if len(texts) < size:
        raise ValueError(
            f"{len(texts)} calibration texts cannot be shared by {size} processes; give at least {size} texts "
            "(num_samples and the dataset) or launch fewer processes."
        )
    return texts[rank::size]


def all_reduce_observers(observers: dict[str, GramObserver], shared: dict[str, str] | None = None) -> None:
    """Sum every observer's statistics over all processes, in place (sorted names: same order everywhere).

    ``shared`` maps layers that share another layer's accumulator to that layer: they are reduced once.
    """
    _, size = world()
    if size == 1:
        return
    dist = torch.distributed
    shared = shared or {}
    for name in sorted(observers):
        if name in shared:
            continue
        obs = observers[name]
        if obs.gram is None:  # a layer that saw no token here still takes part in the collective
            obs.gram = torch.zeros(obs.features, obs.features, dtype=torch.float64, device=_device())
        dist.all_reduce(obs.gram, op=dist.ReduceOp.SUM)
        counts = torch.tensor([obs.num_tokens, obs.summed_tokens], dtype=torch.float64, device=obs.gram.device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        obs.num_tokens, obs.summed_tokens = int(counts[0]), int(counts[1])
        has_sum = torch.tensor([0.0 if obs.token_sum is None else 1.0], dtype=torch.float64, device=obs.gram.device)
        dist.all_reduce(has_sum, op=dist.ReduceOp.MIN)
        if float(has_sum) > 0:
            dist.all_reduce(obs.token_sum, op=dist.ReduceOp.SUM)
        else:
            obs.token_sum, obs.summed_tokens = None, 0
    for name, leader in shared.items():
        src, dst = observers[leader], observers[name]
        dst.share_from(src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes, on ``t``'s device (``t`` itself in one process). The sum runs
    on the process group's device (CUDA for NCCL, CPU for gloo)."""
    _, size = world()
    if size == 1:
        return t
    total = t.to(_device(), copy=True)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total.to(t.device)


def _all_reduce_int(value: int, op: str) -> int:
    _, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return int(t)


def all_reduce_count(value: int) -> int:
    """The sum of an integer over all processes."""
    return _all_reduce_int(value, "SUM")


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes (e.g. the resume point every process can reach)."""
    return _all_reduce_int(value, "MIN")


def _device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj):
    """Process 0's ``obj`` on every process. Only for a value every process reaches: for a decision that can
    raise on one process and not another (from timings, a user ``loss_fn``), use
    :func:`decided_by_process_zero`, or the others wait for a broadcast that never comes."""
    _, size = world()
    if size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_process_zero(decide: Callable[[], T], what: str = "deciding") -> T:
    """Run ``decide`` on every process and give every process process 0's outcome: its value, or the
    exception it raised, raised on every process.

    For decisions taken from per-process measurements (timings, a user ``loss_fn``): each process may
    decide differently, and a process that *raises* (a speed budget out of reach on its timings only)
    would otherwise leave the others waiting in the broadcast for a value that never comes. ``decide``
    runs on every process, not on process 0 alone, because it may run collectives of its own (a user
    ``loss_fn`` under accelerate can gather); every process takes part in the one broadcast that follows.

    Decision for a process other than 0 whose own ``decide`` raised while process 0's did not: it takes
    process 0's value (logged as a warning), as it takes process 0's value over its own when both succeed.
    What it measured is discarded either way, and failing every process would let the slowest or
    noisiest process veto process 0's decision. Only :class:`Exception` is caught: a
    ``KeyboardInterrupt`` propagates at once (the launcher stops the other processes).

    In one process this is ``decide()``: same value, same exception, same traceback.
    """
    rank, size = world()
    if size == 1:
        return decide()
    error: Exception | None = None
    try:
        outcome: tuple[str, Any] = ("value", decide())
    except Exception as e:  # noqa: BLE001 - broadcast, then re-raised on every process
        error, outcome = e, ("error", _portable(e))
    if rank == 0:
        try:  # a value that cannot be sent is an error of process 0, not a hang of the others
            pickle.dumps(outcome)
        except Exception as e:  # noqa: BLE001 - sent as an error instead
            error = RuntimeError(f"Process 0 cannot send the outcome of {what} to the other processes: "
                                 f"{type(e).__name__}: {e}")
            error.__cause__ = e
            outcome = ("error", error)
    box = [outcome if rank == 0 else None]  # only process 0's is sent
    torch.distributed.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "error":
        # process 0 raises its own exception, traceback and all; the others its copy (the same type and
        # message, or a RuntimeError naming both when the exception cannot be pickled: _portable)
        raise error if rank == 0 else payload
    if error is not None:
        logger.warning(
            f"Process {rank} of {size} raised {type(error).__name__} while {what} ({error}); taking process 0's "
            "decision, as every process does."
        )
    return payload


def on_every_process(step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every process and go on only if it succeeded on all of them.

    For a step each process needs for itself (its own result, not process 0's) that can fail on one
    process only: the dense model's reference loss, where a user ``loss_fn`` fails on one process's
    device or data. Without this the failing process stops while the others go on into the next
    collective (the calibration's ``all_reduce``) and wait there for it. Every process then raises: the
    failing ones their own exception, the others a ``RuntimeError`` naming the first failing process
    and its error. In one process this is ``step()``.
    """
    rank, size = world()
    if size == 1:
        return step()
    error: Exception | None = None
    value: Any = None
    try:
        value = step()
    except Exception as e:  # noqa: BLE001 - reported to every process, then re-raised here
        error = e
    reports: list[str | None] = [None] * size
    torch.distributed.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(reports) if message is not None]
    if failed:
        first, message = failed[0]
        raise RuntimeError(f"Process {first} of {size} failed while {what} ({message}); every process stops with "
                           "it. Fix the cause there (its error is raised on that process).")
    return value


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling (what the broadcast does to it), else a ``RuntimeError`` with its
    type and message: an exception whose ``__init__`` takes other arguments than its ``args`` cannot be
    rebuilt on the receiving side, and a broadcast that fails on process 0 would hang the others."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - replaced by a plain error carrying the same text
        return RuntimeError(f"{type(error).__name__}: {error}")
