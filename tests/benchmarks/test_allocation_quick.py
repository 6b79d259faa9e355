"""The allocation benchmark runs end to end on tiny settings, so the harness cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.allocation import main  # noqa: E402


def test_allocation_benchmark_quick(tmp_path):
    for study in ("size", "loss"):
        assert main(["--study", study, "--quick", "--out", str(tmp_path)]) == 0
        text = (tmp_path / f"allocation_{study}.md").read_text()
        assert "git commit" in text and "| uniform |" in text and "| greedy |" in text
        records = json.loads((tmp_path / f"allocation_{study}.json").read_text())[study]
        assert records and all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    loss = json.loads((tmp_path / "allocation_loss.json").read_text())["loss"]
    assert {r["strategy"] for r in loss} == {"uniform", "greedy", "drone"}
    assert all(r["planner"] <= r["max_loss"] for r in loss)  # the planner never returns over budget
    assert (tmp_path / "allocation_size.png").exists()
