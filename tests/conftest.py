"""Suite-wide guards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """A test that pins torch's thread count (benchmarks run in-process do) must not leak it: later
    bit-for-bit comparisons against a fresh process assume the default reduction order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
