"""The page-fault counter behind the planner's allocator note, checked against the kernel's rule:
touching a fresh anonymous mapping faults once per page."""

from __future__ import annotations

import mmap
import sys

import pytest

from drone_hf.utils.page_faults import GLIBC_REUSE_TUNABLES, PAGE_FAULT_NOTICE, minor_page_faults, worth_noting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fresh-mapping fault counts are Linux behaviour")
def test_touching_fresh_pages_counts_one_fault_per_page():
    pages = 4096
    size = pages * mmap.PAGESIZE
    region = mmap.mmap(-1, size)  # anonymous, not yet backed by memory
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages even where transparent huge pages are "always"
    try:
        before = minor_page_faults()
        for offset in range(0, size, mmap.PAGESIZE):
            region[offset] = 1
        after = minor_page_faults()
        again = minor_page_faults()
        for offset in range(0, size, mmap.PAGESIZE):  # now backed: no new faults
            region[offset] = 2
        last = minor_page_faults()
    finally:
        region.close()
    assert pages <= after - before <= pages + 256  # + the interpreter's own few
    assert last - again <= 256


def test_counter_is_none_where_getrusage_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    assert minor_page_faults() is None


def test_page_faults_block_counts_and_spreads_over_passes(monkeypatch):
    import drone_hf.utils.page_faults as page_faults_mod

    readings = iter([100, 160])
    monkeypatch.setattr(page_faults_mod, "minor_page_faults", lambda: next(readings))
    with page_faults_mod.PageFaults() as faults:
        pass
    assert faults.count == 60 and faults.per_pass(4) == 15.0


def test_page_faults_block_without_a_counter_measures_nothing(monkeypatch):
    import drone_hf.utils.page_faults as page_faults_mod

    monkeypatch.setattr(page_faults_mod, "minor_page_faults", lambda: None)
    with page_faults_mod.PageFaults() as faults:
        pass
    assert faults.count is None and faults.per_pass(4) is None


@pytest.mark.parametrize(
    "faults, tunables, expected",
    [
        (None, None, False),  # not measured
        (PAGE_FAULT_NOTICE, None, False),
        (PAGE_FAULT_NOTICE + 1, None, True),
        (PAGE_FAULT_NOTICE + 1, "glibc.malloc.arena_max=1", True),  # another setting: advice still applies
        (10**6, GLIBC_REUSE_TUNABLES, False),  # the advised setting is in force already
        (10**6, "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=65536", False),  # the user's own threshold
    ],
)
def test_fault_advice_only_when_many_faults_and_not_already_followed(faults, tunables, expected, monkeypatch):
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert worth_noting(faults) is expected
