"""The page-fault counter behind the planner's allocator note, checked against the kernel's rule:
touching a fresh anonymous mapping faults once per page."""

from __future__ import annotations

import mmap
import sys

import pytest

from drone_hf.utils.page_faults import minor_page_faults


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
