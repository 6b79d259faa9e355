"""Calibration draws: one frontier setting run on several calibration seeds, summarised in one table.

    python benchmarks/draws.py RUN.json RUN.json [...] [--speedup 2.0] [--points 1.0] [--name STEM] [--out DIR]
    python benchmarks/draws.py --quick      # two quick frontier runs (calibration seeds 0 and 1), summarised

One frontier row is one draw of the calibration sentences: on MPNet at ``target_speedup=2`` three
draws of 512 sentences moved the accuracy loss from -0.85 to -1.09 points with the teacher, the split
and the code unchanged. A claim like "at least 2.0x within 1.0 point" is then a statement about the
distribution of draws, so this reads the JSON records ``frontier.py --calibration-seed S`` writes,
checks that they differ in the calibration seed alone (the same settings, teacher accuracy, split,
plan and rows; anything else is refused with the key and the files named) and writes, per row:

* each draw's speedups, accuracy and loss against dense, and whether it meets the target
  (``--speedup`` at the first latency shape, within ``--points`` of dense; the issue's MPNet
  no-fine-tuning bar by default);
* the median, minimum and maximum over the draws, and how many draws meet the target;
* a PNG of the draws against the target's corner.

Each draw's machine, date and commit are read from the Markdown file next to its JSON (the
provenance table ``frontier.py`` writes), because the draws may come from different sessions.
Nothing is re-run: the summary is only as good as its records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    check_results_name,
    command_line,
    machine_info,
    markdown_table,
    parse_markdown_tables,
    pyplot,
    results_header,
    write_markdown,
)

#: The project's MPNet no-fine-tuning target: at least this speedup at the first latency shape ...
TARGET_SPEEDUP = 2.0
#: ... within this many accuracy points of dense.
TARGET_POINTS = 1.0
#: Record keys that must agree between draws (the calibration seed, the rows' results and the load
#: average are what may differ). ``settings`` holds the split's and teacher's seed and the
#: calibration amount; ``dense_accuracy`` pins the teacher.
SAME = ("settings", "plan", "split", "sequential", "kfac_fisher", "groups", "eval_samples", "dense_accuracy",
        "dense_params", "test_sentences")
#: Per-row keys that must agree (what the row *is*, not what it measured).
SAME_ROW = ("label", "method", "budget", "allocation", "attention_rank", "eval_loss", "eval_samples", "sequential",
            "kfac_fisher")
#: Accuracy differences are differences of floats: 89 of 100 against 90 of 100 is -1.0000000000000009 points,
#: which must count as the 1.0-point bound met.
ROUND_OFF = 1e-9
#: Provenance rows copied from each draw's Markdown file.
PROVENANCE = ("date (UTC)", "git commit", "machine")


class DrawsError(ValueError):
    """Records that cannot be summarised as draws of one setting (the message names the fix)."""


def calibration_seed(record: dict) -> int:
    """The record's calibration seed; records written before ``--calibration-seed`` used the split's."""
    return record.get("calibration_seed", record["settings"]["seed"])


def load_draws(paths: list[Path]) -> list[dict]:
    """The records of ``paths``, each with ``path`` and ``provenance`` added, checked to be draws of one
    setting: two or more frontier records, equal in every ``SAME``/``SAME_ROW`` key, distinct seeds."""
    if len(paths) < 2:
        raise DrawsError(f"give at least two frontier records (got {len(paths)}): one draw has no spread to summarise")
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise DrawsError(f"{path}: no such file (give the .json frontier.py wrote next to its .md)") from None
        except json.JSONDecodeError as e:
            raise DrawsError(f"{path}: not JSON ({e}); give the .json frontier.py wrote") from None
        missing = [k for k in (*SAME, "rows") if k not in record]
        if missing:
            raise DrawsError(f"{path}: not a benchmarks/frontier.py record (no {', '.join(missing)})")
        record["path"], record["provenance"] = path, provenance(path.with_suffix(".md"))
        records.append(record)
    first = records[0]
    for record in records[1:]:
        for key in SAME:
            if record[key] != first[key]:
                raise DrawsError(
                    f"{record['path'].name} and {first['path'].name} differ in {key!r} ({record[key]!r} vs "
                    f"{first[key]!r}): draws must differ in the calibration seed alone; summarise each setting apart")
        if [r["label"] for r in record["rows"]] != [r["label"] for r in first["rows"]]:
            raise DrawsError(f"{record['path'].name} and {first['path'].name} ran different rows: draws must run the "
                             "same rows")
        for row, ref in zip(record["rows"], first["rows"], strict=True):
            for key in SAME_ROW:
                if row.get(key) != ref.get(key):
                    raise DrawsError(f"{record['path'].name} and {first['path'].name} differ in row "
                                     f"{row['label']!r}'s {key!r}: draws must run the same rows")
    seeds = [calibration_seed(r) for r in records]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise DrawsError(f"calibration seed(s) {repeated} appear more than once: each draw is one seed "
                         f"({', '.join(r['path'].name for r in records if calibration_seed(r) in repeated)})")
    return sorted(records, key=calibration_seed)


def provenance(md: Path) -> dict[str, str]:
    """``PROVENANCE`` rows of a frontier Markdown file's header table (``"not recorded"`` when absent)."""
    found: dict[str, str] = {}
    if md.exists():
        tables = parse_markdown_tables(md.read_text(encoding="utf-8"))
        if tables:
            found = {row[0]: row[1] for row in tables[0] if len(row) == 2}
    return {k: found.get(k, "not recorded") for k in PROVENANCE}


def summarise(records: list[dict], speedup: float, points: float) -> list[dict]:
    """Per row label: each draw's figures and whether it meets the target, and the spread over draws.

    A row that failed in some draw (a solver refusal) counts as a draw that missed; its figures are
    left out of the medians, which say over how many draws they were taken."""
    shapes = [f"{b}x{q}" for b, q in records[0]["plan"]["shapes"]]
    dense = records[0]["dense_accuracy"]
    out = []
    for i, label in enumerate(r["label"] for r in records[0]["rows"]):
        draws = []
        for record in records:
            row = record["rows"][i]
            draw = {"seed": calibration_seed(record), "file": record["path"].name, **record["provenance"]}
            if "accuracy" not in row:
                draw.update(failed=row.get("failed", "no result"), meets=False)
            else:
                loss = 100 * (row["accuracy"] - dense)
                draw.update(params=row["params"], speedup={x: row["speedup"][x] for x in shapes},
                            accuracy=row["accuracy"], points=loss,
                            meets=row["speedup"][shapes[0]] >= speedup and loss >= -points - ROUND_OFF)
            draws.append(draw)
        measured = [d for d in draws if "failed" not in d]
        spread = {}
        if measured:
            columns = {f"speedup {x}": [d["speedup"][x] for d in measured] for x in shapes}
            columns |= {"accuracy %": [100 * d["accuracy"] for d in measured],
                        "vs dense (points)": [d["points"] for d in measured]}
            spread = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in columns.items()}
        out.append({"label": label, "draws": draws, "spread": spread, "measured": len(measured),
                    "met": sum(d["meets"] for d in draws)})
    return out


def render(records: list[dict], rows: list[dict], speedup: float, points: float, command: str, out: Path,
           stem: str, runtime_s: float | None = None) -> Path:
    """``stem``.md/.json/.png in ``out``."""
    shapes = [f"{b}x{q}" for b, q in records[0]["plan"]["shapes"]]
    dense, split = records[0]["dense_accuracy"], records[0]["split"]
    target = f">= {speedup:g}x at {shapes[0]} within {points:g} point(s) of dense"
    sections = []
    for row in rows:
        table = []
        for d in row["draws"]:
            figures = (["-"] * (len(shapes) + 3) if "failed" in d else
                       [f"{d['params'] / 1e6:.1f}M", *(f"{d['speedup'][x]:.2f}x" for x in shapes),
                        f"{100 * d['accuracy']:.2f}", f"{d['points']:+.2f}"])
            verdict = f"failed: {d['failed']}" if "failed" in d else ("yes" if d["meets"] else "no")
            table.append([str(d["seed"]), *figures, verdict, f"`{d['file']}`", d["date (UTC)"], d["git commit"]])
        spread = [[stat, "", *(_cell(k, row["spread"][k][stat]) for k in row["spread"]), "", "", "", ""]
                  for stat in ("median", "min", "max")] if row["spread"] else []
        sections += [
            f"## {row['label']}",
            "",
            markdown_table(["calibration seed", "model params", *(f"speedup {x}" for x in shapes), "accuracy %",
                            "vs dense (points)", "meets target", "record", "date (UTC)", "git commit"],
                           table + spread, align="l" + "r" * (len(shapes) + 3) + "llll"),
            "",
            f"- Target ({target}): met in **{row['met']} of {len(row['draws'])}** draws"
            + (f"; medians over the {row['measured']} measured draws: "
               f"{row['spread'][f'speedup {shapes[0]}']['median']:.2f}x at "
               f"{row['spread']['vs dense (points)']['median']:+.2f} points." if row["spread"] else "."),
            "",
        ]
    s = records[0]["settings"]
    machines = sorted({d["machine"] for row in rows for d in row["draws"]})
    sections += [
        "## Setup",
        "",
        f"- Draws of one setting: the same dense model ({100 * dense:.2f}% on {records[0]['test_sentences']:,} "
        f"{split} sentences), split seed {s['seed']}, {s['calibration_samples']} calibration sentences each, drawn "
        "with the calibration seed in the first column; every other setting equal (checked).",
        f"- Machine(s) of the runs: {'; '.join(machines)}. Speedups are each run's own interleaved dense/compressed "
        "medians; a shared 2-core machine moves them by a few percent between runs.",
        "- Nothing is re-run here: each row is the record named in its line. A failed row counts as a missed draw.",
    ]
    info = machine_info((s["model"],))
    header = results_header(f"Calibration draws: {len(records)} runs of one frontier setting", command,
                            {"date (UTC)": info["date (UTC)"], "git commit": info["git commit"]}, runtime_s)
    out.mkdir(parents=True, exist_ok=True)
    path = write_markdown(out / f"{stem}.md", header, "\n".join(sections))
    (out / f"{stem}.json").write_text(json.dumps(
        {"target": {"speedup": speedup, "points": points, "shape": shapes[0]}, "dense_accuracy": dense,
         "split": split, "rows": rows}, indent=1))
    _plot(rows, shapes[0], speedup, points, split, out / f"{stem}.png")
    return path


def _cell(column: str, value: float) -> str:
    """A spread cell formatted like the draw rows above it."""
    if column.startswith("speedup"):
        return f"{value:.2f}x"
    return f"{value:+.2f}" if "points" in column else f"{value:.2f}"


def _plot(rows: list[dict], shape: str, speedup: float, points: float, split: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        measured = [d for d in row["draws"] if "failed" not in d]
        xs, ys = [d["speedup"][shape] for d in measured], [d["points"] for d in measured]
        ax.scatter(xs, ys, label=f"{row['label']} ({row['met']} of {len(row['draws'])} met)")
        for d, x, y in zip(measured, xs, ys, strict=True):
            ax.annotate(f"seed {d['seed']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(speedup, color="gray", ls=":", lw=1)
    ax.axhline(-points, color="gray", ls=":", lw=1)
    x_hi, y_hi = max(ax.get_xlim()[1], speedup * 1.02), max(ax.get_ylim()[1], 0.05)
    ax.fill_between([speedup, x_hi], -points, y_hi, color="tab:green", alpha=0.08, label="target")
    ax.set_xlim(right=x_hi)
    ax.set_ylim(top=y_hi)
    ax.set_xlabel(f"measured end-to-end speedup at {shape}")
    ax.set_ylabel(f"{split} accuracy vs dense (points)")
    ax.set_title("One setting, several calibration draws")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quick_records(out: Path) -> list[Path]:
    """Two ``frontier.py --quick`` runs that differ in the calibration seed alone (greedy rows only)."""
    from benchmarks import frontier

    paths = []
    for seed in (0, 1):
        frontier.main(["--quick", "--out", str(out), "--rows", "greedy", "--speedups", "--calibration-seed", str(seed),
                       "--name", f"quick_seed{seed}"])
        paths.append(out / f"quick_seed{seed}.json")
    return paths


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="*", type=Path, help="frontier.py JSON records, one per calibration seed")
    parser.add_argument("--quick", action="store_true",
                        help="run two quick frontier draws into a temp folder (or --out) and summarise them")
    parser.add_argument("--speedup", type=float, default=TARGET_SPEEDUP,
                        help=f"target speedup at the first latency shape (default {TARGET_SPEEDUP:g})")
    parser.add_argument("--points", type=float, default=TARGET_POINTS,
                        help=f"largest accuracy loss in points the target allows (default {TARGET_POINTS:g})")
    parser.add_argument("--name", help="results file name without extension (default: the first record's "
                                       "name + _draws)")
    parser.add_argument("--out", type=Path, help="results folder (default: the first record's folder)")
    args = parser.parse_args(argv)
    check_results_name(parser, args.name, "frontier_mpnet_kfac_exact_compensated_draws")
    if args.quick == bool(args.records):
        parser.error("give frontier JSON records to summarise, or --quick (not both)")
    if args.speedup <= 0 or args.points < 0:
        parser.error(f"--speedup must be positive and --points non-negative (got {args.speedup:g}, {args.points:g})")
    start = time.perf_counter()
    paths = quick_records(args.out or Path(tempfile.mkdtemp())) if args.quick else args.records
    try:
        records = load_draws(paths)
    except DrawsError as e:
        parser.error(str(e))
    out = args.out or paths[0].parent
    stem = args.name or f"{paths[0].stem}_draws"
    rows = summarise(records, args.speedup, args.points)
    path = render(records, rows, args.speedup, args.points,
                  command_line(__file__, argv if argv is not None else sys.argv[1:]), out, stem,
                  time.perf_counter() - start if args.quick else None)
    for row in rows:
        print(f"{row['label']}: target met in {row['met']} of {len(row['draws'])} draws")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
