"""LM calibration modes: one-shot vs layer-sequential vs error-compensated sequential, at the LM
benchmark's target cut (20% of the projections' parameters), uniform and greedy ranks, in one run.

    python benchmarks/lm_sequential.py [--quick] [--out DIR] [--threads N]
        [--method drone|drone-kfac] [--kfac-fisher true|empirical] [--allocations uniform greedy]
        [--modes one-shot sequential compensated] [--calib-texts N]

The same model, calibration passages and held-out windows as ``benchmarks/lm.py`` (its helpers are
reused), every row through ``drone_hf.compress``:

* ``one-shot`` (the default): every layer calibrated on the dense model, ``min ||(W - W') X||``;
* ``sequential=True``: block by block on the compressed model's inputs ``X̂``, ``min ||(W - W') X̂||``;
* ``sequential="compensated"``: block by block, one execution group at a time, for the dense model's
  outputs, ``min ||W X - W' X̂||``.

Greedy rows plan ranks on one-shot statistics (the library's route for budgets that need spectra);
the sequential modes then re-solve at those ranks, so every greedy row has the same ranks. No
fine-tuning. Writes ``lm_sequential.md`` / ``.json``.

``--method drone-kfac`` runs the same rows with loss-aware DRONE (the output error weighted by the
dense model's output-gradient Gram in every mode; greedy ranks from its predicted loss), its output
gradients at labels drawn from the model (the library's default ``kfac_fisher="true"``, the true
Fisher), and writes ``lm_sequential_kfac_true.*``; ``--kfac-fisher empirical`` takes them at the
data's next tokens and writes ``lm_sequential_kfac.*``. ``--allocations`` and ``--modes`` keep only
some rows (each drone-kfac row pays the output-gradient pass again). ``--calib-texts N`` draws N
calibration passages instead of lm.py's 256 (the same seeded draw from the same pool, so the
passages differ; the held-out windows do not) and adds ``_calib{N}`` to the result files' names, so
a study of the calibration amount never overwrites the 256-passage results.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/lm_sequential.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import drone_hf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    keeps_torch_threads,
    load_average,
    machine_info,
    markdown_table,
    results_writer,
)
from benchmarks.lm import CALIB_TEXTS, GREEDY_EVAL_TEXTS, TARGET_CUT, _load, eval_windows, perplexity  # noqa: E402
from drone_hf.calibration import load_texts  # noqa: E402
from drone_hf.calibration.fisher import DEFAULT_KFAC_FISHER, SAMPLED_FISHER_LABELS  # noqa: E402
from drone_hf.compress import _split_texts  # noqa: E402

MODES = {"one-shot": False, "sequential": True, "compensated": "compensated"}


METHODS = ("drone", "drone-kfac")
ALLOCATIONS = ("uniform", "greedy")


def run(quick: bool, method: str = "drone", allocations: tuple[str, ...] = ALLOCATIONS,
        modes: tuple[str, ...] = tuple(MODES), save=None, kfac_fisher: str = DEFAULT_KFAC_FISHER,
        calib_texts: int | None = None) -> tuple[str, dict]:
    """Every requested row; ``save(body, record)`` after each one, so the rows of a run stopped midway
    (a drone-kfac row takes about an hour on 2 cores) are kept, marked ``partial`` in the record.
    ``calib_texts``: calibration passages (default lm.py's 256; 16 with ``quick``)."""
    model, tok, model_name, pool, held = _load(quick)
    max_length = 32 if quick else 256
    eval_texts = 4 if quick else GREEDY_EVAL_TEXTS
    calib_texts = calib_texts or (16 if quick else CALIB_TEXTS)
    if calib_texts + eval_texts > len(pool):
        raise ValueError(f"--calib-texts {calib_texts}: the calibration pool has {len(pool)} passages, and greedy "
                         f"holds out {eval_texts} of them; ask for at most {len(pool) - eval_texts}")
    # lm.py's calibration passages: the draw greedy makes from the pool, minus what it holds out
    calib = _split_texts(load_texts(pool, calib_texts + eval_texts, seed=0), eval_texts, 0, calib_texts)[0]
    windows = eval_windows(tok, held, max_length)
    dense_ppl = perplexity(model, windows)
    print(f"dense ppl {dense_ppl:.3f}", flush=True)
    ratio = 1 - TARGET_CUT
    record = {"model": model_name, "dense_ppl": dense_ppl, "param_ratio": ratio, "method": method,
              "kfac_fisher": kfac_fisher, "calib_texts": len(calib),
              "windows": list(windows.shape), "runs": {}, "partial": True}
    for allocation in allocations:
        # uniform: exactly lm.py's passages; greedy: the same pool and draw, so the same passages plus
        # the ones it holds out to measure candidates
        data = {"dataset": calib, "num_samples": len(calib)} if allocation == "uniform" else {
            "dataset": pool, "num_samples": calib_texts, "eval_samples": eval_texts}
        for mode in modes:
            cfg = drone_hf.DroneConfig(param_ratio=ratio, allocation=allocation, tokenizer=tok, max_length=max_length,
                                       sequential=MODES[mode], method=method, kfac_fisher=kfac_fisher, **data)
            start = time.perf_counter()
            comp = drone_hf.compress(copy.deepcopy(model), cfg, show_progress=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(comp, windows)
            ranks = comp.config.quantization_config.ranks
            record["runs"][f"{allocation}/{mode}"] = {"ppl": ppl, "seconds": seconds, "ranks": ranks}
            print(f"{allocation} {mode}: ppl {ppl:.3f} ({seconds:.0f} s)", flush=True)
            del comp
            if save is not None:
                record["load_average"] = load_average()
                save(_body(record), record)
    record["partial"] = False
    record["load_average"] = load_average()
    return _body(record), record


def _body(record: dict) -> str:
    dense_ppl, (count, length) = record["dense_ppl"], record["windows"]
    rows = [[*key.split("/"), f"{r['ppl']:.2f}", f"{r['ppl'] / dense_ppl:.2f}x", f"{r['seconds']:.0f}"]
            for key, r in record["runs"].items()]
    partial = ("**Partial run**: the rows below are those finished before it stopped.\n\n"
               if record["partial"] else "")
    fisher = record.get("kfac_fisher", "empirical")  # records written before the option: empirical
    calib = record.get("calib_texts", CALIB_TEXTS)  # records written before the option: 256
    passages = ("the calibration passages and" if calib == CALIB_TEXTS else
                f"{calib} calibration passages (lm.py: {CALIB_TEXTS}; the same seeded draw from the same pool)"
                " and the")
    kfac = record["method"] == "drone-kfac"
    solver = f"`method={record['method']!r}`" + (f", `kfac_fisher={fisher!r}`" if kfac else "")
    return (
        f"## Calibration modes at a {TARGET_CUT:.0%} cut ({record['model']}, {solver})\n\n"
        + partial
        + f"`param_ratio={record['param_ratio']:g}` of every q/k/v/o/gate/up/down projection, {passages} "
        f"held-out windows of `benchmarks/lm.py` ({count} windows of {length} tokens; dense "
        f"perplexity {dense_ppl:.2f}). Greedy ranks are planned on one-shot statistics and re-solved by the "
        "sequential modes at the same ranks. Seconds: the whole `drone_hf.compress` call (planning included) "
        f"on this machine, 1-minute load average at the end {record['load_average']}.\n\n"
        + markdown_table(["ranks", "calibration", "perplexity", "x dense", "seconds"], rows)
    )


@keeps_torch_threads
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Llama built in code, a few texts, temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, temp with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--method", choices=METHODS, default="drone",
                        help="solver of every row (drone-kfac: results in lm_sequential_kfac_true.*, or "
                             "lm_sequential_kfac.* with --kfac-fisher empirical)")
    parser.add_argument("--kfac-fisher", choices=SAMPLED_FISHER_LABELS,
                        help="drone-kfac's output gradients: at labels drawn from the model (true, the default: "
                             "DroneConfig.kfac_fisher's; results in lm_sequential_kfac_true.*) or at the data's "
                             "labels (empirical; results in lm_sequential_kfac.*)")
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS),
                        help="rank allocations to run (default: both)")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES),
                        help="calibration modes to run (default: all three)")
    parser.add_argument("--calib-texts", type=int,
                        help=f"calibration passages (default {CALIB_TEXTS}, lm.py's; 16 with --quick); "
                             "another number adds _calib{N} to the result files' names")
    args = parser.parse_args(argv)
    if args.calib_texts is not None and args.calib_texts < 1:
        parser.error(f"--calib-texts must be a positive number of passages, got {args.calib_texts}")
    if args.kfac_fisher is not None and args.method != "drone-kfac":
        parser.error("--kfac-fisher applies to --method drone-kfac only")
    args.kfac_fisher = args.kfac_fisher or DEFAULT_KFAC_FISHER
    stem = "lm_sequential" if args.method == "drone" else "lm_sequential_kfac"
    stem += "_true" if args.method == "drone-kfac" and args.kfac_fisher == "true" else ""
    stem += f"_calib{args.calib_texts}" if args.calib_texts not in (None, CALIB_TEXTS) else ""
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    info = machine_info(("minilm",) if args.quick else ("smollm2",))
    save = results_writer(out, stem, "LM calibration modes: one-shot, sequential, compensated",
                          command_line(__file__, argv if argv is not None else sys.argv[1:]), info)

    save(*run(args.quick, args.method, tuple(args.allocations), tuple(args.modes), save=save,
              kfac_fisher=args.kfac_fisher, calib_texts=args.calib_texts))
    print(f"wrote {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
