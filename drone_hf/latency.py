"""Latency model: how long one layer takes, dense and factored, on *this* device.

Factoring pays only where two thin matrix products beat one wide one, and that depends on the
device, the dtype, the token count and the thread count, not on a formula. The model measures each
distinct layer shape once, dense and factored at every candidate rank, runs interleaved and reports
the median; results are cached on disk per device/dtype/threads/tokens/shape, so a second run costs
nothing. Allocation uses it so that a layer is only factored at ranks where it is measurably faster:
"no speedup" cannot happen by construction.

Only ratios between variants mean anything, and only between variants timed in the same interleaved
run: a machine that was busy for one run and quiet for the next gives times that cannot be compared.
So one shape's times are always one run (a rank not yet measured re-measures the whole shape), and
each shape's table is checked for plausibility once per process before it is used: a rank much
slower than a larger rank of the same shape, or a dense layer much slower per multiply-add than a
factored one, cannot be a property of the device, so the shape is measured again. Without this one
contended run would poison every later allocation on the machine, the cache being forever.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from .utils.allocator import freed_memory_kept
from .utils.logging import get_logger

logger = get_logger(__name__)

#: Candidate ranks are multiples of this (hardware-friendly tiles), see :func:`rank_grid`.
RANK_MULTIPLE = 8
#: A time this many times above what a variant doing no less work took in the same table is taken for
#: a measurement disturbed by other load, not a property of the device (see :func:`implausible`).
IMPLAUSIBLE_FACTOR = 2.0


def default_cache_dir() -> Path:
    """``$DRONE_HF_CACHE``, else ``$XDG_CACHE_HOME/drone-hf``, else ``~/.cache/drone-hf``."""
    if os.environ.get("DRONE_HF_CACHE"):
        return Path(os.environ["DRONE_HF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "drone-hf"


def rank_grid(out_features: int, in_features: int, step: int = RANK_MULTIPLE, limit: int | None = None) -> list[int]:
    """Candidate ranks ``step, 2·step, ...`` below the parameter break-even ``in·out/(in+out)``.

    Ranks at or above break-even never save parameters or multiply-adds, so they are not candidates.
    Very small layers get at least rank 1.
    """
    breakeven = out_features * in_features / (out_features + in_features)
    top = min(breakeven, limit) if limit is not None else breakeven
    grid = list(range(step, int(top - 1e-9) + 1, step))
    if not grid and top > 1:
        grid = [max(1, int(top) // 2)]
    return [k for k in grid if k < breakeven]


def implausible(dense: float, times: dict[int, float], out_features: int, in_features: int) -> str | None:
    """Why one shape's timings cannot all be right, or ``None`` where they can.

    Two checks, each comparing a variant with one that does at least as much work: a factored rank
    ``k`` against every larger rank (more multiply-adds in the same two kernels), and the dense layer
    against each factored rank scaled by their multiply-add ratio (one large matmul is never much less
    efficient per multiply-add than two thin ones). Either being over :data:`IMPLAUSIBLE_FACTOR`
    slower says the run was disturbed.
    """
    ranks = sorted(times)
    fastest_above = float("inf")
    for k in reversed(ranks):
        if times[k] > IMPLAUSIBLE_FACTOR * fastest_above:
            return f"rank {k} took {times[k]:.3g} s, a larger rank {fastest_above:.3g} s"
        fastest_above = min(fastest_above, times[k])
    dense_work = out_features * in_features
    for k in ranks:
        allowed = IMPLAUSIBLE_FACTOR * times[k] * dense_work / (k * (out_features + in_features))
        if dense > allowed:
            return f"dense took {dense:.3g} s, {dense / times[k]:.1f}x rank {k} ({times[k]:.3g} s)"
    return None


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = platform.processor() or platform.machine()
    return f"{device.type}:{name}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}"


class LatencyModel:
    """Measured time (seconds) of one linear layer of a given shape, dense or at rank ``k``.

    Args:
        tokens: rows per call, ``batch x sequence`` of the shape the model will serve.
        device, dtype: where and in what precision to measure (the model's own).
        repeats: timed runs per variant (median reported); ``warmup`` untimed runs first.
        cache_dir: where measurements persist (``None``: :func:`default_cache_dir`); ``False``
            disables the disk cache.
    """

    def __init__(
        self,
        tokens: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        repeats: int = 7,
        warmup: int = 2,
        cache_dir: Path | str | None | bool = None,
    ) -> None:
        self.tokens = int(tokens)
        self.device = torch.device(device)
        self.dtype = dtype
        self.repeats = repeats
        self.warmup = warmup
        self._key = f"{_device_key(self.device, dtype)}|tokens={self.tokens}"
        self._path = None if cache_dir is False else Path(cache_dir or default_cache_dir()) / "latency.json"
        self._table: dict[str, float] = self._load()
        self._checked: set[str] = set()  # shapes whose table passed (or was re-measured for) :func:`implausible`

    def _load(self) -> dict[str, float]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            return json.loads(self._path.read_text()).get(self._key, {})
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged cache is re-measured, never trusted

    def _save(self) -> None:
        if self._path is None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(self._path.read_text()) if self._path.exists() else {}
        except (OSError, json.JSONDecodeError):
            data = {}
        data[self._key] = self._table
        tmp = self._path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(self._path)
        except OSError:
            pass  # caching is an optimisation; a read-only home must not break compression

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _measure(self, out_features: int, in_features: int, ranks: list[int]) -> dict[str, float]:
        """Interleaved median times for the dense layer and each factored rank."""
        x = torch.randn(self.tokens, in_features, device=self.device, dtype=self.dtype)
        w = torch.randn(out_features, in_features, device=self.device, dtype=self.dtype)
        pairs = {
            k: (
                torch.randn(k, in_features, device=self.device, dtype=self.dtype),
                torch.randn(out_features, k, device=self.device, dtype=self.dtype),
            )
            for k in ranks
        }
        fns = {"dense": lambda: torch.nn.functional.linear(x, w)}
        for k, (d, u) in pairs.items():
            fns[str(k)] = lambda d=d, u=u: torch.nn.functional.linear(torch.nn.functional.linear(x, d), u)
        times: dict[str, list[float]] = {name: [] for name in fns}
        with freed_memory_kept():  # the allocator state of the planner's end-to-end timings
            for i in range(self.warmup + self.repeats):
                for name, fn in fns.items():
                    self._sync()
                    start = time.perf_counter()
                    fn()
                    self._sync()
                    if i >= self.warmup:
                        times[name].append(time.perf_counter() - start)
        return {name: statistics.median(ts) for name, ts in times.items()}

    def _cached_ranks(self, shape: str) -> list[int]:
        prefix = f"{shape}@"
        return sorted(int(key[len(prefix):]) for key in self._table
                      if key.startswith(prefix) and key[len(prefix):].isdigit())

    def _measure_shape(self, out_features: int, in_features: int, ranks: list[int]) -> None:
        """Time dense and ``ranks`` in one run and make them the shape's whole table."""
        shape = f"{out_features}x{in_features}"
        measured = self._measure(out_features, in_features, ranks)
        for k in self._cached_ranks(shape):
            del self._table[f"{shape}@{k}"]
        self._table[f"{shape}@dense"] = measured.pop("dense")
        self._table.update({f"{shape}@{k}": t for k, t in measured.items()})

    def _implausible(self, out_features: int, in_features: int) -> str | None:
        """:func:`implausible` of the shape's whole table as it is held now."""
        shape = f"{out_features}x{in_features}"
        held = {k: self._table[f"{shape}@{k}"] for k in self._cached_ranks(shape)}
        return implausible(self._table[f"{shape}@dense"], held, out_features, in_features)

    def layer_times(self, out_features: int, in_features: int, ranks: list[int]) -> tuple[float, dict[int, float]]:
        """(dense time, {rank: factored time}) for one shape, measuring only what is not cached.

        A rank not in the table re-measures the shape with every rank it already holds, so that all
        its times come from one run; a table failing :func:`implausible` is measured once more.
        """
        shape = f"{out_features}x{in_features}"
        cached = self._cached_ranks(shape)
        if f"{shape}@dense" not in self._table or not set(ranks) <= set(cached):
            self._measure_shape(out_features, in_features, sorted(set(cached) | set(ranks)))
            self._save()
        if shape not in self._checked:
            self._checked.add(shape)
            reason = self._implausible(out_features, in_features)
            if reason is not None:
                logger.info(f"Latency of {shape} at {self.tokens} tokens re-measured: {reason}, "
                            "which the device cannot explain (the run was disturbed by other load).")
                self._measure_shape(out_features, in_features, self._cached_ranks(shape))
                self._save()
                again = self._implausible(out_features, in_features)
                if again is not None:
                    logger.warning(f"Latency of {shape} at {self.tokens} tokens is still implausible after "
                                   f"re-measuring ({again}): this machine is busy, and ranks allocated "
                                   "against these times may not be the fastest. Compress on a quiet machine.")
        return self._table[f"{shape}@dense"], {k: self._table[f"{shape}@{k}"] for k in ranks}
