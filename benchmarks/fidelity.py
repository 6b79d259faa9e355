"""Output fidelity of DRONE-compressed all-MiniLM-L6-v2 on held-out text.

Two studies, both measured against the dense model's own outputs on text never used for calibration:

1. **DRONE vs plain SVD** at the same ``param_ratio`` (0.3 ... 0.7).
2. **Damping sweep** of DRONE's ridge ``damp`` (0 ... 1) at ``param_ratio`` 0.5 and 0.3: the table
   ``drone_hf.config.DEFAULT_DAMP`` is chosen from.

Usage::

    python benchmarks/fidelity.py            # full run, writes benchmarks/results/ (several minutes)
    python benchmarks/fidelity.py --quick    # every code path in well under a minute, temp folder
    python benchmarks/fidelity.py --quick --out /tmp/x

Writes ``fidelity.md`` (study 1), ``damp_sweep.md`` (study 2), ``fidelity.json`` (all numbers),
``fidelity_vs_ratio.png`` and ``fidelity_vs_damp.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import drone_hf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    DenseReference,
    EvalSet,
    Fidelity,
    command_line,
    dense_reference,
    fidelity,
    fmt,
    heldout_eval_set,
    keeps_torch_threads,
    license_eval_set,
    load_average,
    load_minilm,
    machine_info,
    markdown_table,
    mean_calibration_error,
    pyplot,
    results_header,
    write_markdown,
)

RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7)
DAMPS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DAMP_RATIOS = (0.5, 0.3)


@dataclass(frozen=True)
class Settings:
    ratios: tuple[float, ...] = RATIOS
    damps: tuple[float, ...] = DAMPS
    damp_ratios: tuple[float, ...] = DAMP_RATIOS
    num_samples: int = 128  # calibration texts (DroneConfig default)
    eval_texts: int = 256  # per evaluation set
    max_length: int = 128
    seed: int = 0
    keep_dense: tuple[str, ...] = ()  # modules_to_not_convert (quick runs only)


FULL = Settings()
#: Every code path in a fraction of the time: 2 ratios, 2 damps, 16 texts, only blocks 0-1 factored.
QUICK = Settings(
    ratios=(0.3, 0.5),
    damps=(0.0, 1e-2),
    damp_ratios=(0.5,),
    num_samples=16,
    eval_texts=16,
    keep_dense=("encoder.layer.2", "encoder.layer.3", "encoder.layer.4", "encoder.layer.5"),
)


@dataclass
class Variant:
    """One compressed model and how faithful it is."""

    param_ratio: float
    method: str
    damp: float
    kept: float  # targeted weight parameters after / before (drone_hf.report)
    calibration_error: float  # mean over layers of report's relative calibration error
    fidelity: dict[str, Fidelity] = field(default_factory=dict)  # by evaluation set name
    compress_seconds: float = 0.0
    num_layers: int = 0


def damp_label(d: float) -> str:
    return "0" if d == 0 else f"{d:g}"


class Runner:
    """Compresses deep copies of one dense model and scores them; identical configs run once."""

    def __init__(self, dense, tokenizer, settings: Settings, references: dict[str, DenseReference]):
        self.dense, self.tokenizer, self.settings, self.references = dense, tokenizer, settings, references
        self.cache: dict[tuple[float, str, float], Variant] = {}

    def run(self, param_ratio: float, method: str, damp: float = 0.0) -> Variant:
        damp = 0.0 if method == "svd" else damp  # plain SVD has no ridge
        key = (param_ratio, method, damp)
        if key in self.cache:
            return self.cache[key]
        s = self.settings
        config = drone_hf.DroneConfig(
            param_ratio=param_ratio,
            allocation="uniform",  # DRONE vs SVD at the same per-layer ranks
            method=method,
            damp=damp,
            dataset=None,  # the packaged calibration corpus "sotu"
            tokenizer=self.tokenizer,
            num_samples=s.num_samples,
            max_length=s.max_length,
            seed=s.seed,
            modules_to_not_convert=list(s.keep_dense) or None,
        )
        model = copy.deepcopy(self.dense)
        start = time.perf_counter()
        drone_hf.compress(model, config, show_progress=False)
        seconds = time.perf_counter() - start
        rep = drone_hf.report(model)
        variant = Variant(
            param_ratio=param_ratio,
            method=method,
            damp=damp,
            kept=rep.targeted_param_ratio,
            calibration_error=mean_calibration_error(model),
            fidelity={name: fidelity(model, ref) for name, ref in self.references.items()},
            compress_seconds=seconds,
            num_layers=len(rep),
        )
        del model
        self.cache[key] = variant
        held = next(iter(variant.fidelity.values()))
        print(
            f"  ratio={param_ratio} {method:5s} damp={damp_label(damp):6s} compress {seconds:5.1f}s  "
            f"calib err {variant.calibration_error:.4f}  held-out err {held.relative_error:.4f} "
            f"cos {held.cosine_mean:.5f}",
            file=sys.stderr,
            flush=True,
        )
        return variant


# --- tables ------------------------------------------------------------------------------------


def _setup_lines(settings: Settings, eval_sets: list[EvalSet], num_layers: int) -> list[str]:
    lines = [
        "## Setup",
        "",
        "- **Model**: all-MiniLM-L6-v2 (`BertModel`, float32, CPU). "
        + (
            f"Default targets: the {num_layers} linear layers of the 6 encoder blocks (query, key, value, attention "
            "output, intermediate, output); the pooler is excluded as a head."
            if not settings.keep_dense
            else f"Quick run: {num_layers} linear layers factored, {', '.join(settings.keep_dense)} kept dense."
        )
        + " The dense model is loaded once and deep-copied for every compressed variant.",
        f"- **Calibration**: `DroneConfig(dataset=None)`, i.e. the packaged corpus `sotu` (1990-2012), "
        f"`num_samples={settings.num_samples}`, `max_length={settings.max_length}`, `seed={settings.seed}`. "
        '`method="svd"` ignores the data for the factors; the same calibration batches only measure its '
        "calibration error.",
        "- **Evaluation** (never used for calibration; truncated to "
        f"{settings.max_length} tokens; dense reference outputs computed once):",
    ]
    lines += [f"  - {e.source}; {e.num_tokens:,} real tokens." for e in eval_sets]
    lines += [
        "- **Metrics**, against the dense model's outputs on the same batches:",
        "  - *rel. err*: `||H_c - H_d||_F / ||H_d||_F` of `last_hidden_state` over real (unpadded) tokens;",
        "  - *cos*: mean over passages of the cosine similarity of mask-aware mean-pooled embeddings "
        "(sentence-transformers' pooling for this model); *min cos*: the worst passage;",
        "  - *calib. err*: mean over layers of `drone_hf.report`'s `||(W - W')X||_F / ||WX||_F` on the "
        "calibration inputs;",
        "  - *kept*: targeted weight parameters after / before (`report(model).targeted_param_ratio`).",
        "",
    ]
    return lines


def _fid_headers(eval_sets: list[EvalSet]) -> list[str]:
    out = []
    for e in eval_sets:
        out += [f"{e.name} rel. err", f"{e.name} cos", f"{e.name} min cos"]
    return out


def _fid_cells(v: Variant, eval_sets: list[EvalSet], bold: set[tuple[str, str]] = frozenset()) -> list[str]:
    cells = []
    for e in eval_sets:
        f = v.fidelity[e.name]
        for metric, text in (
            ("err", fmt(f.relative_error)),
            ("cos", fmt(f.cosine_mean, 5)),
            ("min", fmt(f.cosine_min, 5)),
        ):
            cells.append(f"**{text}**" if (e.name, metric) in bold else text)
    return cells


def ratio_table(variants: list[Variant], eval_sets: list[EvalSet]) -> str:
    headers = ["param_ratio", "method", "kept", "calib. err", *_fid_headers(eval_sets)]
    rows = [
        [fmt(v.param_ratio, 1), v.method, fmt(v.kept, 3), fmt(v.calibration_error), *_fid_cells(v, eval_sets)]
        for v in variants
    ]
    return markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2))


def comparison_table(runner: Runner, settings: Settings, eval_sets: list[EvalSet]) -> str:
    """DRONE / SVD ratios of the errors: below 1 means DRONE is more faithful."""
    headers = ["param_ratio", "calib. err"]
    for e in eval_sets:
        headers += [f"{e.name} rel. err", f"{e.name} 1 - cos"]
    rows = []
    for r in settings.ratios:
        d, s = runner.run(r, "drone"), runner.run(r, "svd")
        row = [fmt(r, 1), fmt(d.calibration_error / s.calibration_error, 3)]
        for e in eval_sets:
            fd, fs = d.fidelity[e.name], s.fidelity[e.name]
            row += [
                fmt(fd.relative_error / fs.relative_error, 3),
                fmt((1 - fd.cosine_mean) / (1 - fs.cosine_mean), 3) if fs.cosine_mean < 1 else "n/a",
            ]
        rows.append(row)
    return markdown_table(headers, rows)


def best_damps(runner: Runner, settings: Settings, eval_sets: list[EvalSet]) -> dict[tuple[float, str, str], float]:
    """Best damp for each (ratio, evaluation set, metric in err/cos/min)."""
    best = {}
    for r in settings.damp_ratios:
        vs = [runner.run(r, "drone", d) for d in settings.damps]
        for e in eval_sets:
            best[(r, e.name, "err")] = min(vs, key=lambda v: v.fidelity[e.name].relative_error).damp
            best[(r, e.name, "cos")] = max(vs, key=lambda v: v.fidelity[e.name].cosine_mean).damp
            best[(r, e.name, "min")] = max(vs, key=lambda v: v.fidelity[e.name].cosine_min).damp
    return best


def recommend_damp(runner: Runner, settings: Settings, eval_name: str) -> tuple[float, dict[float, float]]:
    """The damp with the best held-out relative error over all swept ratios.

    Score: mean over ratios of ``err(damp) / min_damp' err(damp')`` (1.0 = best at every ratio), so
    each ratio counts equally whatever its error scale. Returns the winner and every damp's score.
    """
    scores = {d: 0.0 for d in settings.damps}
    for r in settings.damp_ratios:
        errs = {d: runner.run(r, "drone", d).fidelity[eval_name].relative_error for d in settings.damps}
        low = min(errs.values())
        for d, e in errs.items():
            scores[d] += (e / low if low > 0 else 1.0) / len(settings.damp_ratios)
    winner = min(settings.damps, key=lambda d: (scores[d], d))
    return winner, scores


def damp_table(runner: Runner, settings: Settings, eval_sets: list[EvalSet]) -> str:
    best = best_damps(runner, settings, eval_sets)
    headers = ["param_ratio", "damp", "calib. err", *_fid_headers(eval_sets)]
    rows = []
    for r in settings.damp_ratios:
        for d in settings.damps:
            v = runner.run(r, "drone", d)
            bold = {(e.name, m) for e in eval_sets for m in ("err", "cos", "min") if best[(r, e.name, m)] == d}
            rows.append([fmt(r, 1), damp_label(d), fmt(v.calibration_error), *_fid_cells(v, eval_sets, bold)])
        s = runner.run(r, "svd")
        rows.append([fmt(r, 1), "svd (damp -> inf)", fmt(s.calibration_error), *_fid_cells(s, eval_sets)])
    return markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2))


# --- plots -------------------------------------------------------------------------------------

_STYLE = {"sotu-heldout": "tab:blue", "licenses": "tab:orange"}


def plot_ratio(runner: Runner, settings: Settings, eval_sets: list[EvalSet], path: Path) -> None:
    plt = pyplot()
    fig, (ax_err, ax_cos) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = list(settings.ratios)
    for e in eval_sets:
        color = _STYLE.get(e.name)
        for method, style, marker in (("drone", "-", "o"), ("svd", "--", "s")):
            fs = [runner.run(r, method).fidelity[e.name] for r in xs]
            label = f"{method} / {e.name}"
            ax_err.plot(xs, [f.relative_error for f in fs], style, marker=marker, color=color, label=label)
            ax_cos.plot(xs, [max(1 - f.cosine_mean, 1e-12) for f in fs], style, marker=marker, color=color, label=label)
    ax_err.set(
        xlabel="param_ratio (targeted weights kept)",
        ylabel="relative error of last hidden state",
        title="Hidden-state error vs dense (lower is better)",
    )
    ax_cos.set(
        xlabel="param_ratio (targeted weights kept)",
        ylabel="1 - mean cosine (log)",
        yscale="log",
        title="Sentence-embedding drift (lower is better)",
    )
    for ax in (ax_err, ax_cos):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: DRONE vs plain SVD on held-out text", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_damp(runner: Runner, settings: Settings, eval_sets: list[EvalSet], path: Path) -> None:
    plt = pyplot()
    fig, (ax_err, ax_cos) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = list(range(len(settings.damps)))
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    for i, r in enumerate(settings.damp_ratios):
        color = colors[i % len(colors)]
        for e, style, marker in zip(eval_sets, ("-", "--"), ("o", "^"), strict=False):
            fs = [runner.run(r, "drone", d).fidelity[e.name] for d in settings.damps]
            svd = runner.run(r, "svd").fidelity[e.name]
            label = f"ratio {r} / {e.name}"
            ax_err.plot(xs, [f.relative_error for f in fs], style, marker=marker, color=color, label=label)
            ax_cos.plot(xs, [max(1 - f.cosine_mean, 1e-12) for f in fs], style, marker=marker, color=color, label=label)
            ax_err.axhline(svd.relative_error, linestyle=":", color=color, alpha=0.6, linewidth=1)
            ax_cos.axhline(max(1 - svd.cosine_mean, 1e-12), linestyle=":", color=color, alpha=0.6, linewidth=1)
    for ax in (ax_err, ax_cos):
        ax.set_xticks(xs, [damp_label(d) for d in settings.damps])
        ax.set_xlabel("damp (ridge relative to mean diag of the Gram)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_err.set(ylabel="relative error of last hidden state", title="Hidden-state error (dotted: plain SVD)")
    ax_cos.set(ylabel="1 - mean cosine (log)", yscale="log", title="Sentence-embedding drift (dotted: plain SVD)")
    fig.suptitle("all-MiniLM-L6-v2: DRONE damping sweep on held-out text", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 ratios, 2 damps, 16 calibration and 16 evaluation texts; writes to a "
        "temporary folder unless --out is given",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {RESULTS_DIR} for a full run, a temp folder with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own for a full run, 1 with --quick: a smoke run that shares "
        "the CPUs with other work is several times slower with oversubscribed threads)",
    )
    return p.parse_args(argv)


@keeps_torch_threads
def main(argv: list[str] | None = None) -> Path:
    """Run both studies and write the results; returns the output folder."""
    argv = list(sys.argv[1:] if argv is None else map(str, argv))
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> Path:
    settings = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="drone-fidelity-quick-")) if args.quick else RESULTS_DIR)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(__file__, argv)
    started = time.perf_counter()
    load_at_start = load_average()
    print(f"{command}\n  writing to {out}", file=sys.stderr, flush=True)

    dense, tokenizer = load_minilm()
    eval_sets = [heldout_eval_set(tokenizer, settings.eval_texts, settings.seed, settings.max_length)]
    ood = license_eval_set(tokenizer, settings.eval_texts, settings.seed, settings.max_length)
    if ood is not None:
        eval_sets.append(ood)
    else:
        print("  no out-of-domain text on this machine (/usr/share/common-licenses): skipped", file=sys.stderr)
    references = {e.name: dense_reference(dense, e) for e in eval_sets}
    for name, ref in references.items():  # the metric code must score the dense model as perfect
        self_check = fidelity(dense, ref)
        assert self_check.relative_error < 1e-6 and self_check.cosine_min > 1 - 1e-6, (name, self_check)

    runner = Runner(dense, tokenizer, settings, references)
    print("study 1: DRONE vs SVD", file=sys.stderr)
    ratio_variants = [runner.run(r, m) for r in settings.ratios for m in ("drone", "svd")]
    print("study 2: damping sweep", file=sys.stderr)
    for r in settings.damp_ratios:
        for d in settings.damps:
            runner.run(r, "drone", d)
        runner.run(r, "svd")
    primary = eval_sets[0].name
    winner, scores = recommend_damp(runner, settings, primary)
    num_layers = ratio_variants[0].num_layers

    plot_ratio(runner, settings, eval_sets, out / "fidelity_vs_ratio.png")
    plot_damp(runner, settings, eval_sets, out / "fidelity_vs_damp.png")
    runtime = time.perf_counter() - started
    info = machine_info()
    info["load average (1 min)"] = (
        f"{load_at_start} at start, {load_average()} at end (the run itself keeps about "
        f"{torch.get_num_threads()} busy; more means other processes shared the CPUs and inflated the runtime, "
        "never the fidelity numbers)"
    )
    setup = _setup_lines(settings, eval_sets, num_layers)

    # study 1
    drone_better = [
        r
        for r in settings.ratios
        if runner.run(r, "drone").fidelity[primary].relative_error
        < runner.run(r, "svd").fidelity[primary].relative_error
    ]
    verdict = (
        f"On `{primary}`, DRONE has the lower hidden-state error at {len(drone_better)} of {len(settings.ratios)} "
        f"ratios ({', '.join(fmt(r, 1) for r in drone_better) or 'none'})."
    )
    body1 = "\n".join(
        setup
        + [
            "## DRONE vs SVD at equal parameter budget",
            "",
            ratio_table(ratio_variants, eval_sets),
            "",
            "### DRONE / SVD error ratios (below 1: DRONE more faithful)",
            "",
            comparison_table(runner, settings, eval_sets),
            "",
            verdict,
            "",
            "![fidelity vs param_ratio](fidelity_vs_ratio.png)",
            "",
            "The damping sweep is in [damp_sweep.md](damp_sweep.md).",
        ]
    )
    write_markdown(
        out / "fidelity.md",
        results_header(
            "DRONE vs plain SVD: output fidelity on held-out text (all-MiniLM-L6-v2)", command, info, runtime
        ),
        body1,
    )

    # study 2
    score_rows = [[damp_label(d), fmt(scores[d], 4)] for d in settings.damps]
    body2 = "\n".join(
        setup
        + [
            "`damp = δ` solves `min ||(W - W')X||² + δ·mean(diag XXᵀ)·||W - W'||²`: `0` is the exact DRONE optimum "
            "on the calibration data, large values approach plain SVD (shown as the last row of each ratio). "
            "**Bold**: the best damp of each ratio for that column. `damp=0` rows are the same runs as the "
            "`drone` rows of [fidelity.md](fidelity.md).",
            "",
            "## Damping sweep (DRONE)",
            "",
            damp_table(runner, settings, eval_sets),
            "",
            "## Recommendation",
            "",
            f"Score of each damp: mean over param_ratio {', '.join(fmt(r, 1) for r in settings.damp_ratios)} of "
            f"its `{primary}` relative hidden-state error divided by the best damp's at that ratio "
            "(1.0 = best at every ratio):",
            "",
            markdown_table(["damp", "score"], score_rows),
            "",
            f"**Best held-out fidelity: damp = {damp_label(winner)}** (candidate for `drone_hf.config.DEFAULT_DAMP`).",
            "",
            "![fidelity vs damp](fidelity_vs_damp.png)",
        ]
    )
    write_markdown(
        out / "damp_sweep.md",
        results_header(
            "DRONE damping sweep: output fidelity on held-out text (all-MiniLM-L6-v2)", command, info, runtime
        ),
        body2,
    )

    raw = {
        "command": command,
        "runtime_s": runtime,
        "machine": info,
        "settings": asdict(settings),
        "eval_sets": {
            e.name: {"source": e.source, "num_texts": len(e.texts), "num_tokens": e.num_tokens} for e in eval_sets
        },
        "recommended_damp": winner,
        "damp_scores": {damp_label(d): s for d, s in scores.items()},
        "variants": [asdict(v) for v in runner.cache.values()],
    }
    (out / "fidelity.json").write_text(json.dumps(raw, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    print(f"done in {runtime:.0f} s; recommended damp {damp_label(winner)}; results in {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
