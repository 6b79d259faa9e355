"""The library's MLP width pruning on SmolLM2: ``DroneConfig(prune_mlp=True)`` against ranks alone.

    python benchmarks/lm_prune_mlp.py [--quick] [--out DIR] [--threads N] [--cuts 0.2 ...]

Both rows are whole ``drone_hf.compress`` calls with ``method="drone-kfac"`` (true Fisher), greedy
allocation and ``param_ratio = 1 - cut`` of every q/k/v/o/gate/up/down projection, on
``benchmarks/lm.py``'s calibration passages (256, 256 tokens) and its held-out windows, one-shot, no
fine-tuning: **ranks only** (``prune_mlp=False``, lm.md's "drone-kfac greedy" row) and **ranks +
widths** (``prune_mlp=True``). The two calls share one calibration cache (the same statistics: the
second call reads the first one's), so their difference is the allocation alone; the timings are of
each call, cache reads included. ``benchmarks/lm_width_pruning.py`` is the prototype this option
was built from.

``--quick`` runs a tiny Llama built in code on a few texts: every code path, for the test suite.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/lm_prune_mlp.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    keeps_torch_threads,
    load_average,
    machine_info,
    markdown_table,
    results_writer,
)
from benchmarks.lm import CALIB_TEXTS, GREEDY_EVAL_TEXTS, TARGET_CUT, TARGET_FACTOR, _load, eval_windows, perplexity  # noqa: E402

ROWS = (("ranks + widths", True), ("ranks only", False))


def run(quick: bool, cuts: list[float], save=None) -> tuple[str, dict]:
    import drone_hf

    model, tok, model_name, pool, held = _load(quick)
    max_length = 32 if quick else 256
    calib_texts, eval_texts = (16, 4) if quick else (CALIB_TEXTS, GREEDY_EVAL_TEXTS)
    windows = eval_windows(tok, held, max_length)
    dense_ppl = perplexity(model, windows)
    record = {"model": model_name, "dense_ppl": dense_ppl, "eval_windows": list(windows.shape), "rows": {},
              "partial": True, "calibration_texts": calib_texts}
    with tempfile.TemporaryDirectory() as cache:
        for cut in cuts:
            for label, prune in ROWS:
                cfg = drone_hf.DroneConfig(
                    param_ratio=round(1 - cut, 6), method="drone-kfac", dataset=pool, tokenizer=tok,
                    num_samples=calib_texts, eval_samples=eval_texts, max_length=max_length,
                    calibration_cache=cache, prune_mlp=prune,
                )
                start = time.perf_counter()
                comp = drone_hf.compress(copy.deepcopy(model), cfg, show_progress=False)
                seconds = time.perf_counter() - start
                qc = comp.config.quantization_config
                ppl = perplexity(comp, windows)
                widths = qc.mlp_widths or {}
                blocks = sorted({c.rsplit(".", 1)[0] for c in qc.ranks if ".mlp." in c})
                record["rows"][f"{cut}/{label}"] = {
                    "cut": cut, "label": label, "ppl": ppl, "kept": qc.allocation_result["targeted_param_ratio"],
                    "predicted_loss": qc.allocation_result.get("predicted_loss_increase"),
                    "mlp_widths": {k: v["width"] for k, v in widths.items()}, "factored_mlp_blocks": len(blocks),
                    "mlp_original_width": comp.config.intermediate_size,
                    "seconds": seconds,
                }
                print(f"cut {cut:.0%} {label}: ppl {ppl:.3f} ({ppl / dense_ppl:.3f}x) in {seconds:.0f} s", flush=True)
                del comp
                if save is not None:
                    record["load_average"] = load_average()
                    save(_body(record), record)
    record["partial"] = False
    record["load_average"] = load_average()
    return _body(record), record


def _body(rec: dict) -> str:
    dense = rec["dense_ppl"]
    rows = []
    for r in rec["rows"].values():
        widths = r["mlp_widths"]
        shown = ", ".join(f"{w}" for w in widths.values()) if widths else "none"
        rows.append([f"{r['cut']:.0%}", r["label"], f"{r['ppl']:.2f}", f"{r['ppl'] / dense:.3f}x", f"{r['kept']:.4f}",
                     f"{len(widths)} ({shown})", str(r["factored_mlp_blocks"]), f"{r['seconds']:.0f}"])
    partial = "**Partial run**: the rows below are those finished before it stopped.\n\n" if rec["partial"] else ""
    target = rec["rows"].get(f"{TARGET_CUT}/ranks + widths")
    verdict = ""
    if target is not None:
        factor = target["ppl"] / dense
        verdict = (f"\n\nTarget at a {TARGET_CUT:.0%} cut: at most {TARGET_FACTOR}x dense; `prune_mlp=True` reaches "
                   f"{factor:.3f}x: **{'met' if factor <= TARGET_FACTOR else 'missed'}**.")
    return (
        f"## Library MLP width pruning ({rec['model']}, drone-kfac, greedy, one-shot, no fine-tuning)\n\n" + partial
        + f"Held-out perplexity on {rec['eval_windows'][0]} windows of {rec['eval_windows'][1]} tokens (dense "
        f"{dense:.2f}), {rec['calibration_texts']} calibration passages; both rows are whole `drone_hf.compress` "
        "calls sharing one calibration cache. `kept`: fraction of the targeted projections' weights left. "
        f"Pruned MLP blocks: how many, and their widths (of {_original(rec)} neurons); factored MLP blocks: blocks "
        "with a factored projection.\n\n"
        + markdown_table(["cut", "allocation", "perplexity", "x dense", "kept", "pruned MLP blocks (widths)",
                          "factored MLP blocks", "compress seconds"], rows)
        + verdict + f"\n\n1-minute load average at the end {rec.get('load_average')}.\n"
    )


def _original(rec: dict) -> str:
    return ", ".join(sorted({str(r.get("mlp_original_width")) for r in rec["rows"].values()})) or "?"


@keeps_torch_threads
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Llama built in code, a few texts, temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, temp with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--cuts", type=float, nargs="+", default=[TARGET_CUT],
                        help=f"fractions of the projections' weights removed (default {TARGET_CUT})")
    args = parser.parse_args(argv)
    if not all(0 < c < 1 for c in args.cuts):
        parser.error(f"--cuts must be fractions in (0, 1), got {args.cuts}")
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    info = machine_info(("minilm",) if args.quick else ("smollm2",))
    save = results_writer(out, "lm_prune_mlp", "LM: MLP width pruning in the library (prune_mlp=True)",
                          command_line(__file__, argv if argv is not None else sys.argv[1:]), info)
    save(*run(args.quick, args.cuts, save=save))
    print(f"wrote {out / 'lm_prune_mlp.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
