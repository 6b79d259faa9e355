"""``freed_memory_kept``: the allocator state the planner times in, checked against glibc's behaviour
(a freed 64 MiB block, above any mmap threshold, is unmapped and faults in again on the next
allocation; kept in the heap it does not), and the cases it must leave alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import drone_hf.utils.allocator as allocator_mod
from drone_hf.utils.allocator import KEPT, UNAVAILABLE, USER_SETTING, freed_memory_kept

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): served by mmap unless told otherwise
PAGES = BLOCK // 4096


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


#: Run in a fresh interpreter: a long test process's heap (fragmented by earlier tests, its glibc
#: thresholds already set by earlier planner runs) need not hand a freed block back the same way.
_MEASURE = """
import ctypes, json
from drone_hf.utils.allocator import freed_memory_kept
from drone_hf.utils.page_faults import minor_page_faults
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def one_block():  # allocate, touch every byte of and free one block through C malloc
    before = minor_page_faults()
    pointer = libc.malloc(BLOCK)
    assert pointer, "malloc failed"
    ctypes.memset(pointer, 1, BLOCK)
    libc.free(pointer)
    return minor_page_faults() - before
out = {"before": [one_block() for _ in range(2)]}
with freed_memory_kept() as state:
    out["state"] = state
    one_block()  # the heap grows once
    out["inside"] = [one_block() for _ in range(3)]
one_block()  # the block kept in the heap is reused once more, then trimmed on free
out["after"] = [one_block() for _ in range(2)]
print(json.dumps(out))
""".replace("BLOCK", str(BLOCK))


@pytest.fixture
def default_allocator(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in allocator_mod.GLIBC_MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.skipif(allocator_mod.glibc_mallopt() is None, reason="glibc behaviour")
@pytest.mark.skipif(allocator_mod.user_configured_allocator(), reason="the process started with own malloc settings")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages 'always' fault per 2 MiB, not per page")
def test_freed_memory_is_reused_inside_and_unmapped_again_after(default_allocator):
    run = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True)
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert min(seen["before"]) >= PAGES // 2  # mmap, unmapped on free: every time
    assert seen["state"] == KEPT
    assert max(seen["inside"]) < 256  # reused: at most the interpreter's own few
    assert min(seen["after"]) >= PAGES // 2  # glibc's default mmap use is back


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_settings_applied_once_for_nested_blocks_and_restored_after_an_error(default_allocator, monkeypatch):
    mallopt = Recorder()
    monkeypatch.setattr(allocator_mod, "glibc_mallopt", lambda: mallopt)
    with pytest.raises(RuntimeError, match="boom"):
        with freed_memory_kept() as outer:
            with freed_memory_kept() as inner:
                assert mallopt.calls == [(allocator_mod.M_MMAP_MAX, 0), (allocator_mod.M_TRIM_THRESHOLD, 2**31 - 1)]
            assert len(mallopt.calls) == 2  # the inner block leaves the outer block's setting in force
            raise RuntimeError("boom")
    assert outer == inner == KEPT
    assert mallopt.calls[2:] == [
        (allocator_mod.M_MMAP_MAX, 65536),  # glibc's default
        (allocator_mod.M_TRIM_THRESHOLD, 64 * 2**20),  # the ceiling of glibc's adaptive trim threshold
    ]


@pytest.mark.parametrize(
    "variable, value",
    [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576"), ("MALLOC_MMAP_THRESHOLD_", "65536")],
)
def test_a_users_allocator_settings_are_left_alone(variable, value, default_allocator, monkeypatch):
    mallopt = Recorder()
    monkeypatch.setattr(allocator_mod, "glibc_mallopt", lambda: mallopt)
    monkeypatch.setenv(variable, value)
    with freed_memory_kept() as state:
        pass
    assert state == USER_SETTING and mallopt.calls == []


def test_another_setting_in_tunables_is_not_a_malloc_choice(default_allocator, monkeypatch):
    mallopt = Recorder()
    monkeypatch.setattr(allocator_mod, "glibc_mallopt", lambda: mallopt)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    with freed_memory_kept() as state:
        pass
    assert state == KEPT and len(mallopt.calls) == 4


def test_without_glibc_nothing_is_changed(default_allocator, monkeypatch):
    monkeypatch.setattr(allocator_mod, "glibc_mallopt", lambda: None)
    with freed_memory_kept() as state:
        pass
    assert state == UNAVAILABLE


def test_mallopt_is_only_looked_up_on_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator_mod.glibc_mallopt() is None


def test_layer_timings_run_with_freed_memory_kept(monkeypatch):
    """The per-layer latency model times in the same allocator state as the end-to-end timings."""
    import contextlib

    import drone_hf.latency as latency_mod

    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        yield KEPT

    monkeypatch.setattr(latency_mod, "freed_memory_kept", recording)
    model = latency_mod.LatencyModel(16, repeats=1, warmup=0, cache_dir=False)
    runs = []
    measure = model._measure
    monkeypatch.setattr(model, "_measure", lambda *a: runs.append(a) or measure(*a))
    dense, factored = model.layer_times(8, 8, [2])
    # one timed run, or two where a single repeat came out implausible and was measured again
    assert runs and len(entered) == len(runs) and dense > 0 and factored[2] > 0
