"""``drone_hf.report`` on models with query-key compressed attention.

The attention rows must describe every compressed module (per-head rank, query/key parameters,
score error), and the model-level count must be exact: adding back what compression removed from
both kinds of layers gives the parameter count of the dense model it came from.
"""

from __future__ import annotations

import pytest
from attention_models import HEAD_DIM, HEADS, build
from tiny_models import CALIBRATION_TEXTS, tokenizer
from transformers import AutoModel

import drone_hf
from drone_hf import DroneConfig
from drone_hf.modules.attention import drone_attention_modules

TOKENIZER = tokenizer()
HIDDEN = 32


def config(**kw) -> DroneConfig:
    base = {
        "dataset": CALIBRATION_TEXTS, "num_samples": len(CALIBRATION_TEXTS), "batch_size": 3,
        "compress_attention": True, "tokenizer": TOKENIZER,
    }
    return DroneConfig(**(base | kw))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("family", "extra"),
    [("bert", {"param_ratio": 0.5}), ("bert", {"target_modules": ["query", "key"]}), ("gpt2", {"param_ratio": 0.5})],
    ids=["bert-linear-and-attention", "bert-attention-only", "gpt2-split-c_attn"],
)
def test_attention_rows_and_exact_model_count(family, extra) -> None:
    dense = build(family)
    n_dense = n_params(dense)
    model = drone_hf.compress(dense, config(attention_rank=3, **extra), show_progress=False)
    rep = drone_hf.report(model)
    qc = model.config.quantization_config

    assert rep.model_params == n_params(model)
    assert rep.dense_model_params == n_dense  # both kinds of savings added back, exactly
    assert len(rep.attention_rows) == 2
    assert {r.name for r in rep.attention_rows} == set(qc.attention_ranks)
    per_proj_row = HIDDEN + 1  # weights and bias
    for r in rep.attention_rows:
        assert (r.heads, r.head_dim, r.qk_rank, r.in_features) == (HEADS, HEAD_DIM, 3, HIDDEN)
        assert r.dense_params == 2 * HEADS * HEAD_DIM * per_proj_row
        assert r.compressed_params == 2 * HEADS * 3 * per_proj_row
        assert r.score_error == qc.attention_errors[r.name] and 0 < r.score_error < 1
        assert r.param_ratio == pytest.approx(3 / HEAD_DIM) and r.score_macs_ratio == pytest.approx(3 / HEAD_DIM)
    assert rep.attention_param_ratio == pytest.approx(3 / HEAD_DIM)
    assert rep.score_macs_ratio == pytest.approx(3 / HEAD_DIM)
    # the removed query/key parameters are exactly what the modules no longer hold
    removed = sum(r.dense_params - r.compressed_params for r in rep.attention_rows)
    linear_removed = rep.dense_targeted_params - rep.factored_targeted_params
    assert n_dense - n_params(model) == removed + linear_removed
    dense_all = rep.dense_targeted_params + rep.dense_attention_params
    assert rep.compressed_param_ratio == pytest.approx(
        (rep.factored_targeted_params + rep.compressed_attention_params) / dense_all
    )
    if "target_modules" in extra:  # attention alone: no factored layer, the report still works
        assert len(rep) == 0 and rep.targeted_param_ratio == 1.0
    else:
        assert len(rep) > 0 and not any(r.name.endswith((".query", ".key")) for r in rep)

    text = str(rep)
    assert "attention module" in text and "score error" in text and "query-key compressed" in text
    assert "per-head rank 3" in text and rep.attention_rows[0].name in text
    md = rep.to_markdown()
    assert md.count("| attention module |") == 1 and md.count(f"| {rep.attention_rows[1].name} |") == 1
    dicts = rep.attention_dicts()
    assert [d["name"] for d in dicts] == [r.name for r in rep.attention_rows]
    assert dicts[0]["qk_rank"] == 3 and dicts[0]["param_ratio"] == pytest.approx(3 / HEAD_DIM)


def test_reloaded_checkpoint_reports_the_same_attention_rows(tmp_path) -> None:
    dense = build("bert")
    n_dense = n_params(dense)
    model = drone_hf.compress(dense, config(attention_rank=2, param_ratio=0.5), show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    before, after = drone_hf.report(model), drone_hf.report(reloaded)
    assert after.attention_rows == before.attention_rows and after.rows == before.rows
    assert after.dense_model_params == n_dense and len(drone_attention_modules(reloaded)) == 2


def test_a_model_without_any_drone_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="no DRONE-factored layer"):
        drone_hf.report(build("bert"))
