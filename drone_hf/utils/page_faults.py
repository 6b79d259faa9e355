"""Page faults per forward pass: why a CPU speedup measured in one process can differ in another.

A forward pass allocates its activations anew (BERT-base at 32x128 tokens: about 3 GB of tensors,
the largest 50 MB). glibc's ``malloc`` serves large blocks with fresh ``mmap`` pages and trims the
freed top of its heap, so depending on the process's history each pass may page-fault its
activations back in (measured on MPNet at 32x128, 2 threads: about 528,000 minor faults and 3.0 s
per pass in a fresh process, none and 2.6 s once freed memory is reused). That cost is about the
same for the dense and the factored model, so it lowers the measured speedup. Counting faults
tells the two states apart; ``docs/speed.md`` has the numbers and the settings that avoid it.
"""

from __future__ import annotations

import os

#: Environment setting under which glibc reuses freed activation memory (set before Python starts):
#: no ``mmap`` for blocks under 2 GiB, no heap trimming under 4 GiB.
GLIBC_REUSE_TUNABLES = "glibc.malloc.mmap_threshold=2147483648:glibc.malloc.trim_threshold=4294967296"

#: Minor page faults per forward pass above which a measured speedup carries a note: the allocator
#: is handing activation memory back to the OS between passes (1,000 faults: 4 MiB re-faulted a pass).
PAGE_FAULT_NOTICE = 1000


def reuse_tunables_set() -> bool:
    """Whether this process started with glibc told to keep freed memory (``GLIBC_TUNABLES`` names an
    ``mmap_threshold``). glibc reads the variable once at start, so the environment seen here is the
    setting in force unless the program changed it afterwards."""
    return "glibc.malloc.mmap_threshold=" in os.environ.get("GLIBC_TUNABLES", "")


def worth_noting(faults_per_pass: float | None) -> bool:
    """Whether a fault count calls for the allocator advice: above :data:`PAGE_FAULT_NOTICE`, and the
    setting the advice recommends is not already in force (with it set, the remaining faults are the
    process's own few thousand, not activations re-faulted every pass: nothing to advise)."""
    return faults_per_pass is not None and faults_per_pass > PAGE_FAULT_NOTICE and not reuse_tunables_set()


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``); ``None`` where unavailable (Windows)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


class PageFaults:
    """Minor page faults over a ``with`` block; :meth:`per_pass` spreads them over its forward passes.

    ``count`` stays ``None`` where the counter is unavailable, so callers record "not measured"
    instead of a made-up zero.
    """

    def __init__(self) -> None:
        self._start: int | None = None
        self.count: int | None = None

    def __enter__(self) -> PageFaults:
        self._start = minor_page_faults()
        return self

    def __exit__(self, *exc: object) -> None:
        end = minor_page_faults()
        self.count = None if self._start is None or end is None else end - self._start

    def per_pass(self, passes: int) -> float | None:
        """Faults per forward pass when the block ran ``passes`` of them (``None``: not measured)."""
        return None if self.count is None else self.count / passes
