"""The LM benchmark runs end to end on a tiny Llama built in code, so the harness cannot rot (about 6 s on an
idle 2-core machine, so not marked slow)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.lm import KFAC_DAMPS, RATIOS, main  # noqa: E402
from drone_hf.calibration.fisher import DEFAULT_KFAC_FISHER  # noqa: E402
from drone_hf.solver import DEFAULT_KFAC_DAMP  # noqa: E402


def test_lm_benchmark_quick(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "lm.md").read_text()
    assert "git commit" in text and "| drone |" in text and "**Target**" in text
    rec = json.loads((tmp_path / "lm.json").read_text())
    pruned = "drone-kfac greedy + MLP widths"
    assert set(rec["methods"]) == {"drone", "drone-kfac", "svd", "asvd", "fwsvd", "svdllm", "drone greedy",
                                   "drone-kfac greedy", pruned}
    assert math.isfinite(rec["dense_ppl"]) and rec["dense_ppl"] > 1
    for method, entry in rec["methods"].items():
        assert "failed" not in entry, method
        for r in (RATIOS if method != pruned else (0.8,)):  # the pruning row: the target cut only
            assert math.isfinite(entry["ppl"][str(r)]) and entry["ppl"][str(r)] > 1
            # uniform and greedy ranks keep at most the asked fraction, and not much less
            assert r - 0.1 < entry["kept"][str(r)] <= r + 1e-9, (method, r)
    greedy = rec["methods"]["drone greedy"]
    assert all(isinstance(greedy["dense_layers"][str(r)], int) for r in RATIOS)
    variants = ("drone", "drone greedy", "drone-kfac", "drone-kfac greedy", pruned)
    assert rec["target"]["variant"] in variants  # judged on DRONE's best row, the pruning row included
    assert rec["target"]["drone_ppl"] == min(rec["methods"][m]["ppl"]["0.8"] for m in variants)
    assert "| drone greedy |" in text and "| drone-kfac greedy |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {pruned} |"))
    assert row.count("not run") == len(RATIOS) - 1 and text.count("not run") == len(RATIOS) - 1
    # prune_mlp=True narrowed MLP blocks of the tiny Llama (the record names each block's kept width),
    # on drone-kfac greedy's statistics: the same cache folder, nothing calibrated again
    widths = rec["methods"][pruned]["mlp_widths"]["0.8"]
    assert widths and all(0 < w < 64 for w in widths.values())  # the tiny Llama's intermediate size: 64
    assert f"{len(widths)} MLP blocks narrowed" in text
    assert rec["methods"][pruned]["cache_entries"] == rec["methods"]["drone-kfac greedy"]["cache_entries"]
    # each greedy row's cuts share one calibration_cache folder: the input Grams, and for drone-kfac
    # its output-gradient pass, are kept there (what the later cuts load instead of calibrating)
    kfac_entry = f"output-grams-{DEFAULT_KFAC_FISHER}-seed0.pt"
    assert "oneshot.pt" in greedy["cache_entries"] and kfac_entry not in greedy["cache_entries"]
    assert {"oneshot.pt", kfac_entry} <= set(rec["methods"]["drone-kfac greedy"]["cache_entries"])
    for label in ("drone greedy", "drone-kfac greedy"):
        assert set(rec["methods"][label]["seconds"]) == {str(r) for r in RATIOS}
    assert set(rec["methods"][pruned]["seconds"]) == {"0.8"}
    assert "Seconds per cut: `drone greedy` 10%:" in text
    # drone-kfac's output gradients at labels drawn from the model: the library's default, recorded
    assert rec["kfac_fisher"] == DEFAULT_KFAC_FISHER == "true" and "`kfac_fisher='true'`" in text
    # the kfac_damp comparison: every value, the default's row being the drone-kfac row itself
    assert set(rec["kfac_damps"]) == {str(d) for d in KFAC_DAMPS}
    assert rec["kfac_damps"][str(DEFAULT_KFAC_DAMP)] == rec["methods"]["drone-kfac"]["ppl"]["0.8"]
    assert all(math.isfinite(v) for v in rec["kfac_damps"].values()) and "(default)" in text
    # SVD-LLM and DRONE reach the same optimum on positive-definite statistics
    for r in RATIOS:
        assert rec["methods"]["svdllm"]["ppl"][str(r)] == pytest.approx(
            rec["methods"]["drone"]["ppl"][str(r)], rel=1e-4
        )
    assert (tmp_path / "lm.png").exists()
    # the cost table: seconds and added peak memory for every step and every method's solve
    steps = set(rec["timings_s"]) | {f"solve all layers: {m}" for m in rec["methods"]}
    assert set(rec["added_mib"]) == steps
    if sys.platform == "linux":
        assert all(v is not None and v >= 0 for v in rec["added_mib"].values())
    assert "| step | seconds | added peak MiB |" in text


def test_lm_benchmark_quick_empirical_fisher(tmp_path):
    """--kfac-fisher empirical: recorded and printed, and it changes the drone-kfac rows only (the
    other methods never take output gradients)."""
    assert main(["--quick", "--out", str(tmp_path / "true")]) == 0
    assert main(["--quick", "--out", str(tmp_path / "emp"), "--kfac-fisher", "empirical"]) == 0
    true, emp = (json.loads((tmp_path / d / "lm.json").read_text()) for d in ("true", "emp"))
    assert emp["kfac_fisher"] == "empirical" and "`kfac_fisher='empirical'`" in (tmp_path / "emp" / "lm.md").read_text()
    assert emp["methods"]["drone"]["ppl"] == true["methods"]["drone"]["ppl"]
    assert emp["methods"]["drone-kfac"]["ppl"] != true["methods"]["drone-kfac"]["ppl"]
