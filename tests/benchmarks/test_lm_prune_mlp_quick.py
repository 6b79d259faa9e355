"""benchmarks/lm_prune_mlp.py --quick: both rows are real compress calls, the budget holds, the
pruning row records its widths and the ranks-only row none, and the table names the verdict."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.lm_prune_mlp import main  # noqa: E402


def test_quick_run_writes_both_rows(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "lm_prune_mlp.json").read_text())
    assert rec["partial"] is False and set(rec["rows"]) == {"0.2/ranks + widths", "0.2/ranks only"}
    pruned, ranks_only = rec["rows"]["0.2/ranks + widths"], rec["rows"]["0.2/ranks only"]
    for row in (pruned, ranks_only):
        assert row["kept"] <= 0.8 + 1e-9 and row["ppl"] > 1
    assert pruned["mlp_widths"] and all(w < pruned["mlp_original_width"] for w in pruned["mlp_widths"].values())
    assert ranks_only["mlp_widths"] == {}
    text = (tmp_path / "lm_prune_mlp.md").read_text()
    assert "| 20% | ranks + widths |" in text and "Target at a 20% cut" in text


def test_cuts_outside_zero_one_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path), "--cuts", "1.5"])
    assert "--cuts must be fractions in (0, 1)" in capsys.readouterr().err
