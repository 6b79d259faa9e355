"""Multi-process calibration through ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

Each process takes a shard of the calibration texts; the Gram statistics are summed over processes
with one ``all_reduce`` per layer (gloo on CPU, NCCL on GPU), so every process ends with the
statistics of the whole set and solves the same problem: identical factors everywhere, up to the
order of floating-point sums. Nothing happens in a single process.
"""

from __future__ import annotations

import torch

from .observer import GramObserver


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
    """Process 0's ``obj`` on every process (e.g. ranks chosen from timings, which differ per process)."""
    _, size = world()
    if size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
