"""The outer loop of every calibration pass: progress, snapshots to the cache, and resuming.

drone-hf's statistics passes (input Grams, ASVD's mean ``|x|``, FWSVD's row Fisher, loss-aware
DRONE's output-gradient Grams) all walk the calibration batches once and add each batch into
running sums. :func:`resumable_batches` is that walk: a tqdm bar, and, with a
:class:`~drone_hf.calibration.cache.CalibrationCache`, a snapshot of the running sums every
``SNAPSHOT_SECONDS`` and after the last batch. A run that finds a snapshot restores it and feeds
only the batches it does not cover. The sums are restored exactly and the remaining batches are
added in the same order (batch-seeded label draws included), so a resumed pass ends bit-identical
to an uninterrupted one, and a finished entry serves any later run on the same cache that
calibrates on the same texts (another budget; another allocation that holds out as many texts for
evaluation: a uniform run holds out none, so it and a greedy run calibrate on different texts and
do not share entries) without a forward pass.

Each process of a ``torch.distributed`` run walks its own shard and keeps its own entries; the
passes all-reduce after the walk, so processes may resume at different batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from transformers.utils import logging as hf_logging

if TYPE_CHECKING:
    from .cache import CalibrationCache


def _snapshot_seconds() -> float:
    from . import cache as cache_mod

    return cache_mod.SNAPSHOT_SECONDS


def resumable_batches(
    total: int,
    desc: str,
    snapshot: Callable[[], dict[str, Any]],
    restore: Callable[[dict[str, Any]], bool],
    cache: CalibrationCache | None = None,
    entry: str = "oneshot",
    show_progress: bool = True,
) -> Iterator[int]:
    """Yield the indices of the batches still to feed, ``0 .. total-1`` or the rest after a snapshot.

    The caller feeds batch ``i`` into its running sums between two ``next`` calls; the entry is
    written after the batch is added, never mid-batch.

    Args:
        total: batches in this process's calibration set.
        desc: the progress bar's label (``"(resumed at batch k)"`` is appended on a resume).
        snapshot: the running sums as an entry payload (tensors, numbers, dicts and lists of them),
            merged with ``{"batches_done": i + 1}``.
        restore: puts a payload back into the running sums; returns ``False`` (and changes nothing)
            when the payload does not fit this pass, which then starts from batch 0.
        cache: ``None``: no snapshots, every batch is fed.
        entry: the cache entry's name; one per pass and statistics (see the callers).
        show_progress: honours ``transformers``' progress-bar settings.
    """
    start = 0
    if cache is not None:
        snap = cache.load(entry)
        if snap is not None and 0 < int(snap.get("batches_done", 0)) <= total and restore(snap):
            start = int(snap["batches_done"])
    bar = hf_logging.tqdm(
        total=total, initial=start, unit="batch", disable=not show_progress or None,
        desc=desc + (f" (resumed at batch {start})" if start else ""),
    )
    saved = time.monotonic()
    try:
        for i in range(start, total):
            yield i
            bar.update(1)
            if cache is not None and (i + 1 == total or time.monotonic() - saved >= _snapshot_seconds()):
                cache.save(entry, {"batches_done": i + 1, **snapshot()})
                saved = time.monotonic()
    finally:
        bar.close()
