"""The LM calibration-modes benchmark runs end to end on a tiny Llama built in code."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import benchmarks.lm_sequential as bench  # noqa: E402
from benchmarks.lm_sequential import main  # noqa: E402


def test_lm_sequential_quick(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "lm_sequential.json").read_text())
    runs = rec["runs"]
    assert set(runs) == {f"{a}/{m}" for a in ("uniform", "greedy") for m in ("one-shot", "sequential", "compensated")}
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in runs.values())
    # the sequential modes re-solve at the ranks their allocation planned: the same ranks in every mode
    for allocation in ("uniform", "greedy"):
        ranks = [runs[f"{allocation}/{m}"]["ranks"] for m in ("one-shot", "sequential", "compensated")]
        assert ranks[0] == ranks[1] == ranks[2]
    text = (tmp_path / "lm_sequential.md").read_text()
    assert "git commit" in text and "| greedy | compensated |" in text
    assert rec["partial"] is False and "Partial run" not in text


def test_a_stopped_run_keeps_its_finished_rows(tmp_path, monkeypatch):
    real, calls = bench.perplexity, []

    def stop_at_third(*args, **kwargs):  # dense, then row one, then row two: stopped
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "perplexity", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--out", str(tmp_path), "--allocations", "uniform"])
    rec = json.loads((tmp_path / "lm_sequential.json").read_text())
    assert rec["partial"] is True and list(rec["runs"]) == ["uniform/one-shot"]
    assert "**Partial run**" in (tmp_path / "lm_sequential.md").read_text()


def test_lm_sequential_quick_loss_aware_rows(tmp_path):
    """--method drone-kfac: its own result files (true Fisher, the library's default), only the rows
    asked for, the same greedy ranks in every mode (planned once from the predicted loss), and the
    method and Fisher recorded."""
    assert main(["--quick", "--out", str(tmp_path), "--method", "drone-kfac", "--allocations", "greedy",
                 "--modes", "one-shot", "compensated"]) == 0
    assert not (tmp_path / "lm_sequential.json").exists() and not (tmp_path / "lm_sequential_kfac.json").exists()
    rec = json.loads((tmp_path / "lm_sequential_kfac_true.json").read_text())
    assert rec["method"] == "drone-kfac" and set(rec["runs"]) == {"greedy/one-shot", "greedy/compensated"}
    assert rec["kfac_fisher"] == "true"
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rec["runs"].values())
    assert rec["runs"]["greedy/one-shot"]["ranks"] == rec["runs"]["greedy/compensated"]["ranks"]
    assert rec["runs"]["greedy/one-shot"]["ppl"] != rec["runs"]["greedy/compensated"]["ppl"]
    assert "`method='drone-kfac'`, `kfac_fisher='true'`" in (tmp_path / "lm_sequential_kfac_true.md").read_text()


def test_lm_sequential_quick_empirical_fisher_rows(tmp_path):
    """--kfac-fisher empirical: its own result files, the setting recorded and printed; refused
    without --method drone-kfac."""
    assert main(["--quick", "--out", str(tmp_path), "--method", "drone-kfac", "--kfac-fisher", "empirical",
                 "--allocations", "uniform", "--modes", "one-shot"]) == 0
    assert not (tmp_path / "lm_sequential_kfac_true.json").exists()
    rec = json.loads((tmp_path / "lm_sequential_kfac.json").read_text())
    assert rec["kfac_fisher"] == "empirical" and list(rec["runs"]) == ["uniform/one-shot"]
    assert math.isfinite(rec["runs"]["uniform/one-shot"]["ppl"])
    assert "`kfac_fisher='empirical'`" in (tmp_path / "lm_sequential_kfac.md").read_text()
    for fisher in ("empirical", "true"):
        with pytest.raises(SystemExit):
            main(["--quick", "--out", str(tmp_path), "--kfac-fisher", fisher])


def test_lm_sequential_quick_calibration_amount(tmp_path):
    """--calib-texts N: that many passages reach compress (recorded and printed), the results go to
    files of their own (the 256-passage ones are never overwritten), and a count the pool cannot give
    or a non-positive one is refused with the limit named."""
    assert main(["--quick", "--out", str(tmp_path), "--calib-texts", "8", "--allocations", "uniform",
                 "--modes", "one-shot"]) == 0
    assert not (tmp_path / "lm_sequential.json").exists()
    rec = json.loads((tmp_path / "lm_sequential_calib8.json").read_text())
    assert rec["calib_texts"] == 8 and math.isfinite(rec["runs"]["uniform/one-shot"]["ppl"])
    assert "8 calibration passages (lm.py: 256" in (tmp_path / "lm_sequential_calib8.md").read_text()
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path), "--calib-texts", "0"])
    with pytest.raises(ValueError, match="ask for at most"):
        main(["--quick", "--out", str(tmp_path), "--calib-texts", "100000"])
