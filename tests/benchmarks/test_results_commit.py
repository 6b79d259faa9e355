"""Results headers: a result file names the code the run imported (not a later HEAD) and the allocator
setting the speeds were measured under."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402


def test_a_head_that_moved_during_the_run_is_named_beside_the_starting_one(monkeypatch):
    monkeypatch.setattr(common, "_HEAD_AT_START", "abc1234")
    monkeypatch.setattr(common, "_describe_head", lambda: "def5678")
    assert common.git_commit() == "abc1234 when the run started (HEAD is now def5678)"
    monkeypatch.setattr(common, "_describe_head", lambda: "abc1234")
    assert common.git_commit() == "abc1234"


def test_the_starting_commit_is_this_checkouts_head():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        assert common._HEAD_AT_START == "unknown (not a git checkout)"
        return
    assert common._HEAD_AT_START.startswith(head)


def test_the_header_states_the_allocator_setting(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert common.allocator_setting() == "default (GLIBC_TUNABLES not set)"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=2147483648")
    assert common.allocator_setting() == "`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483648`"
    assert common.machine_info(())["allocator"] == common.allocator_setting()


def test_the_command_line_reproduces_the_allocator_setting(monkeypatch):
    script = REPO_ROOT / "benchmarks" / "frontier.py"
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert common.command_line(script, ["--model", "mpnet"]) == "python benchmarks/frontier.py --model mpnet"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=4294967296")
    assert common.command_line(script, ["--quick"]) == (
        "GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296 python benchmarks/frontier.py --quick")
