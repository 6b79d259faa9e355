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


def test_llm_study_statistics_are_paired_and_token_weighted():
    from benchmarks.allocation import paired_log_ratio, perplexity

    # windows of 10 and 30 tokens, mean NLL 2.0/3.0 for a and 1.0/3.0 for b
    a, b = [(20.0, 10), (90.0, 30)], [(10.0, 10), (90.0, 30)]
    assert perplexity(a) == math.exp(110 / 40) and perplexity(b) == math.exp(100 / 40)
    mean, se = paired_log_ratio(a, b)
    assert mean == 10 / 40 and math.isclose(mean, math.log(perplexity(a) / perplexity(b)), rel_tol=1e-12)
    # weighted variance of the per-window differences (1.0 and 0.0, weights 10/30), over n - 1 = 1
    assert math.isclose(se, math.sqrt((10 * 0.75**2 + 30 * 0.25**2) / 40), rel_tol=1e-12)
    assert paired_log_ratio(a, a) == (0.0, 0.0)
