"""Timing forward passes in one allocator state: glibc told to keep freed memory while a timing runs.

Why: ``target_speedup`` is met by measuring the model end to end inside ``compress``. There the
process's heap is full of the solver's live data, so glibc trims the freed top of its heap after
every forward pass and the next pass page-faults its activations back in (MiniLM at 32x128, 2
threads: about 50,000 faults per pass). That cost is the same for the dense and the factored model,
so the planner read speedups 15-20% below what the same model measured once ``compress`` had
returned (1.97x inside, 2.26-2.34x after), and it kept compressing further, and losing accuracy,
to reach a target the model had already passed (``docs/speed.md``). The speedup a budget asks for is
the model's, not the allocator's, so the planner times in the state a serving process reaches once
it reuses freed memory: for the span of each timing glibc serves every block from its heap
(``M_MMAP_MAX = 0``) and does not trim it (``M_TRIM_THRESHOLD`` at its maximum).

What stays changed afterwards: ``M_MMAP_MAX`` is put back to glibc's default and
``M_TRIM_THRESHOLD`` to 64 MiB, the ceiling of glibc's own adaptive rule (twice the 32 MiB mmap
threshold) that a process handling large tensors reaches anyway; but any ``mallopt`` call switches
glibc's adaptive thresholds off for the rest of the process (glibc has no call to switch them back
on), so the mmap threshold stays at the value it had reached.

Left alone: a process whose allocator the user configured (``GLIBC_TUNABLES`` with a
``glibc.malloc.*`` setting, or a ``MALLOC_*_`` environment variable: their choice, and already in
force), and C libraries other than glibc (macOS, musl, Windows): timings there run as before and
the page-fault counts say what state they ran in.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: ``mallopt`` parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: glibc's default ``M_MMAP_MAX`` (restored after a timing).
GLIBC_DEFAULT_MMAP_MAX = 65536
#: ``M_TRIM_THRESHOLD`` restored after a timing: glibc's adaptive ceiling on 64-bit (2 x 32 MiB).
RESTORED_TRIM_THRESHOLD = 64 * 2**20
#: ``M_TRIM_THRESHOLD`` while timing (``mallopt`` takes a C ``int``): never trim.
NO_TRIM = 2**31 - 1
#: Environment variables glibc reads its malloc settings from (a user's own allocator choice).
GLIBC_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")

#: What :func:`freed_memory_kept` did: glibc told to keep freed memory; the user's own settings left in
#: force; no glibc ``mallopt`` here.
KEPT, USER_SETTING, UNAVAILABLE = "kept by drone-hf", "user's allocator settings", "not available"

_lock = threading.Lock()
_depth = 0


def user_configured_allocator() -> bool:
    """Whether glibc's malloc was configured for this process at start (tunables or ``MALLOC_*_``)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(v in os.environ for v in GLIBC_MALLOC_ENV)


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt`` in this process, or ``None`` (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: mallopt may exist but means something else, or nothing
    fn = libc.mallopt
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


@contextmanager
def freed_memory_kept() -> Iterator[str]:
    """Run the block with glibc keeping freed memory in its heap; yields what was done (:data:`KEPT`,
    :data:`USER_SETTING` or :data:`UNAVAILABLE`). Nested blocks share the outermost one's setting."""
    global _depth
    if user_configured_allocator():
        yield USER_SETTING
        return
    mallopt = glibc_mallopt()
    if mallopt is None:
        yield UNAVAILABLE
        return
    with _lock:
        if _depth == 0:
            mallopt(M_MMAP_MAX, 0)
            mallopt(M_TRIM_THRESHOLD, NO_TRIM)
        _depth += 1
    try:
        yield KEPT
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
                mallopt(M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)
