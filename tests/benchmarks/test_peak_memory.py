"""``benchmarks.common.PeakMemory``: a per-block peak of the process's resident memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import PeakMemory  # noqa: E402


@pytest.mark.skipif(sys.platform != "linux", reason="the high-water mark reset is Linux's /proc/self/clear_refs")
def test_each_block_gets_its_own_peak():
    with PeakMemory() as big:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    # freed after the block: the kernel updates the high-water mark lazily, and once (1 of ~1,100 suite
    # runs) the mark missed a tensor freed inside the block; the resident size at exit cannot miss it
    del x
    with PeakMemory() as small:
        y = torch.ones(1024)
        del y
    assert big.added_mib is not None and small.added_mib is not None
    assert big.added_mib > 200  # the 256 MiB tensor was resident inside the first block
    assert small.added_mib < 100  # the reset forgot it: the second block's peak is its own
    assert big.peak_mib > small.added_mib
