"""Whole-model rank allocation on real models: greedy vs uniform, speed and loss budgets.

Studies (``--study``, default ``all``):

* ``size``: all-MiniLM-L6-v2, uniform vs greedy ranks at the same ``param_ratio``; output fidelity
  on held-out text (``sotu-heldout``) and on out-of-domain text (Debian licence texts).
* ``llm``: SmolLM2-135M (Llama, GQA), uniform vs greedy at the same ``param_ratio``; perplexity on
  held-out Wikipedia articles (calibration on other articles). Needs ``benchmarks/assets.py smollm2``.
* ``loss``: MiniLM with ``max_loss`` for each strategy (uniform, greedy, the paper's ``drone``): the
  loss the planner measured on its held-out calibration texts, and independently the same loss on
  ``sotu-heldout``, which no step of compression saw.
* ``speed``: all-mpnet-base-v2 (BERT-base size) with ``target_speedup=2.0``, batch 32 x 128 tokens:
  the predicted and the measured end-to-end CPU speedup (interleaved medians) and the fidelity it
  costs. Needs ``benchmarks/assets.py mpnet``; run it on an otherwise idle machine.

Usage::

    python benchmarks/allocation.py [--study size|llm|loss|speed|all] [--quick] [--out DIR]
                                    [--llm-ratios 0.6 0.8] [--llm-articles 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import drone_hf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    dense_reference,
    fidelity,
    fmt,
    heldout_eval_set,
    license_eval_set,
    load_average,
    load_minilm,
    machine_info,
    markdown_table,
    pyplot,
    results_header,
    write_markdown,
)
from drone_hf.evaluation import measure_latency  # noqa: E402

#: In --quick runs only the first two MiniLM blocks are compressed: every code path, a tenth of the time.
QUICK_SKIP = ["encoder.layer.2", "encoder.layer.3", "encoder.layer.4", "encoder.layer.5"]
#: ...and a three-rank grid, so the searches take a few evaluations per layer.
QUICK_GRID = [16, 64, 128]


def study_size(quick: bool) -> tuple[str, list[dict]]:
    model, tok = load_minilm()
    ratios = (0.5,) if quick else (0.3, 0.5, 0.7)
    n_eval = 8 if quick else 256
    sets = [s for s in (heldout_eval_set(tok, n_eval), license_eval_set(tok, n_eval)) if s is not None]
    refs = [dense_reference(model, s) for s in sets]
    rows, records = [], []
    for ratio in ratios:
        for strategy in ("uniform", "greedy"):
            cfg = drone_hf.DroneConfig(
                param_ratio=ratio, allocation=strategy, num_samples=8 if quick else 128,
                eval_samples=4 if quick else 32,
                modules_to_not_convert=QUICK_SKIP if quick else None, rank_grid=QUICK_GRID if quick else None,
            )
            start = time.perf_counter()
            comp = drone_hf.compress(copy.deepcopy(model), cfg, show_progress=False)
            seconds = time.perf_counter() - start
            result = comp.config.quantization_config.allocation_result
            fids = [fidelity(comp, r) for r in refs]
            rec = {"ratio": ratio, "strategy": strategy, "seconds": seconds, "kept": result["targeted_param_ratio"],
                   "dense_layers": result["dense_layers"]}
            for s, f in zip(sets, fids, strict=True):
                rec[f"{s.name}_relerr"], rec[f"{s.name}_cos"] = f.relative_error, f.cosine_mean
            records.append(rec)
            rows.append([ratio, strategy, fmt(rec["kept"], 3), rec["dense_layers"]]
                        + [x for s in sets for x in (fmt(rec[f"{s.name}_relerr"]), fmt(rec[f"{s.name}_cos"]))]
                        + [f"{seconds:.0f}"])
    headers = ["param_ratio", "allocation", "kept", "dense layers"] + [
        h for s in sets for h in (f"{s.name} rel. error", f"{s.name} cosine")] + ["seconds"]
    body = (
        "## Greedy vs uniform ranks at the same parameter budget (MiniLM)\n\n"
        "Fidelity against the dense model on text no compression step saw; relative error of the last "
        "hidden state (lower is better) and mean cosine of mean-pooled embeddings (higher is better). "
        "`kept` is the targeted weight fraction actually kept.\n\n" + markdown_table(headers, rows)
    )
    return body, records


#: SmolLM2 study sizes. Session 1 ran 24 articles x 1,024 tokens of perplexity per model, 128+32
#: calibration texts and one full evaluation per targeted layer (210) for greedy sensitivities, and
#: did not finish on a loaded 2-core machine. The sensitivities now come from one backward pass
#: (``search.fisher_sensitivities``); the perplexity estimate is paired per window, so its standard
#: error is reported next to the number of tokens it rests on.
LLM_EVAL_ARTICLES, LLM_TOKENS_PER_ARTICLE, LLM_WINDOW = 16, 512, 256
LLM_RATIOS = (0.6, 0.8)


def _wiki_split(quick: bool):
    from benchmarks.assets import wiki_articles

    articles = wiki_articles()
    calib_articles, eval_articles = articles[::2], articles[1::2]
    chunks = []
    for a in calib_articles:
        words = a.split()
        chunks += [" ".join(words[i : i + 90]) for i in range(0, len(words) - 45, 90)]
    return chunks, eval_articles[: 4 if quick else LLM_EVAL_ARTICLES]  # read at call time: --llm-articles


@torch.inference_mode()
def window_nll(
    model, tok, articles, window: int = LLM_WINDOW, per_article: int = LLM_TOKENS_PER_ARTICLE
) -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) per window: windows are the unit of pairing."""
    out = []
    for text in articles:
        ids = tok(text, return_tensors="pt")["input_ids"][:, :per_article]
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window]
            if chunk.shape[1] < 2:
                continue
            n = chunk.shape[1] - 1
            out.append((float(model(input_ids=chunk, labels=chunk).loss) * n, n))
    return out


def perplexity(windows: list[tuple[float, int]]) -> float:
    return math.exp(sum(s for s, _ in windows) / sum(n for _, n in windows))


def paired_log_ratio(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> tuple[float, float]:
    """log(ppl_a / ppl_b) and its standard error over windows (same texts, so paired)."""
    diffs = [(sa - sb) / n for (sa, n), (sb, _) in zip(a, b, strict=True)]
    weights = [n for _, n in a]
    total = sum(weights)
    mean = sum(d * w for d, w in zip(diffs, weights, strict=True)) / total
    var = sum(w * (d - mean) ** 2 for d, w in zip(diffs, weights, strict=True)) / total
    return mean, math.sqrt(var / max(len(diffs) - 1, 1))


def study_llm(quick: bool) -> tuple[str, list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.assets import smollm2

    path = smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib, held = _wiki_split(quick)
    start = time.perf_counter()
    dense_w = window_nll(dense, tok, held)
    eval_seconds = time.perf_counter() - start
    del dense
    tokens = sum(n for _, n in dense_w)
    dense_ppl = perplexity(dense_w)
    rows, records = [["dense", "-", "1.000", fmt(dense_ppl, 2), "1.00", "-", "-", f"{eval_seconds:.0f}"]], []
    by_ratio: dict[float, dict[str, list]] = {}
    for ratio in ((0.8,) if quick else LLM_RATIOS):
        for strategy in ("uniform", "greedy"):
            cfg = drone_hf.DroneConfig(
                param_ratio=ratio, allocation=strategy, dataset=calib, tokenizer=tok,
                num_samples=16 if quick else 64, eval_samples=8 if quick else 16, max_length=128,
            )
            if quick:
                cfg.target_modules = [r"layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            start = time.perf_counter()
            drone_hf.compress(model, cfg, show_progress=False)
            seconds = time.perf_counter() - start
            windows = window_nll(model, tok, held)
            by_ratio.setdefault(ratio, {})[strategy] = windows
            ppl = perplexity(windows)
            result = model.config.quantization_config.allocation_result
            kept = result["targeted_param_ratio"]
            rec = {"ratio": ratio, "strategy": strategy, "ppl": ppl, "dense_ppl": dense_ppl, "kept": kept,
                   "seconds": seconds, "eval_tokens": tokens, "dense_layers": result["dense_layers"],
                   "sensitivity": result.get("sensitivity"), "load_average": load_average()}
            diff = "-"
            if strategy == "greedy":
                mean, se = paired_log_ratio(windows, by_ratio[ratio]["uniform"])
                rec["log_ppl_ratio_vs_uniform"], rec["log_ppl_ratio_se"] = mean, se
                diff = f"{mean:+.4f} ± {se:.4f}"
            records.append(rec)
            print(rec, flush=True)
            rows.append([ratio, strategy, fmt(kept, 3), fmt(ppl, 2), fmt(ppl / dense_ppl, 2), result["dense_layers"],
                         diff, f"{seconds:.0f}"])
            del model
    body = (
        "## Greedy vs uniform ranks at the same parameter budget (SmolLM2-135M)\n\n"
        f"Perplexity on {len(held)} held-out Wikipedia articles, the first {LLM_TOKENS_PER_ARTICLE} tokens of each in "
        f"{LLM_WINDOW}-token windows: {tokens} predicted tokens. Calibration on 90-word passages of the other "
        "articles (64 texts x 128 tokens; greedy holds out 16 more to estimate sensitivities). All "
        "q/k/v/o/gate/up/down projections targeted; `lm_head` (tied to the embeddings) stays dense. "
        "`log ppl ratio` is log(perplexity greedy / perplexity uniform) with its standard error over the "
        "paired windows (negative: greedy better). Greedy's sensitivities for the LM loss come from one "
        "backward pass (empirical Fisher, `sensitivity` in the JSON). `seconds`: compression time on this "
        "(shared) machine.\n\n"
        + markdown_table(["param_ratio", "allocation", "kept", "perplexity", "x dense", "dense layers",
                          "log ppl ratio vs uniform", "seconds"], rows)
    )
    return body, records


def study_loss(quick: bool) -> tuple[str, list[dict]]:
    model, tok = load_minilm()
    held = heldout_eval_set(tok, 8 if quick else 256)
    ref = dense_reference(model, held)
    rows, records = [], []
    for strategy in ("uniform", "greedy", "drone"):
        max_loss = 0.15
        cfg = drone_hf.DroneConfig(max_loss=max_loss, allocation=strategy, num_samples=8 if quick else 128,
                                   eval_samples=4 if quick else 32,
                                   modules_to_not_convert=QUICK_SKIP if quick else None,
                                   rank_grid=QUICK_GRID if quick else None)
        start = time.perf_counter()
        comp = drone_hf.compress(copy.deepcopy(model), cfg, show_progress=False)
        seconds = time.perf_counter() - start
        result = comp.config.quantization_config.allocation_result
        independent = fidelity(comp, ref).relative_error ** 2
        records.append({"strategy": strategy, "max_loss": max_loss, "planner": result["measured_loss_increase"],
                        "heldout": independent, "kept": result["targeted_param_ratio"], "seconds": seconds})
        rows.append([strategy, max_loss, fmt(result["measured_loss_increase"]), fmt(independent),
                     "yes" if independent <= max_loss else "NO", fmt(result["targeted_param_ratio"], 3),
                     result["dense_layers"], f"{seconds:.0f}"])
    body = (
        "## Loss budgets (MiniLM)\n\n"
        "Loss = relative squared output error of the last hidden state against the dense model. "
        "`planner` is what compression measured on its own held-out calibration texts; `sotu-heldout` is "
        "the same loss on text no step saw.\n\n"
        + markdown_table(["allocation", "max_loss", "planner", "sotu-heldout", "within", "kept", "dense layers",
                          "seconds"], rows)
    )
    return body, records


def study_speed(quick: bool) -> tuple[str, list[dict]]:
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.assets import mpnet

    path = mpnet()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    shape = (4, 32) if quick else (32, 128)
    held = heldout_eval_set(tok, 16 if quick else 128)
    ref = dense_reference(dense, held)
    rows, records = [], []
    for strategy in ("greedy", "uniform"):
        cfg = drone_hf.DroneConfig(target_speedup=1.5 if quick else 2.0, allocation=strategy, latency_shape=shape,
                                   num_samples=16 if quick else 128, eval_samples=8 if quick else 32)
        start = time.perf_counter()
        try:
            comp = drone_hf.compress(copy.deepcopy(dense), cfg, show_progress=False)
        except ValueError as e:
            rows.append([strategy, cfg.target_speedup, "-", "-", "-", "-", f"refused: {e}"])
            continue
        seconds = time.perf_counter() - start
        result = comp.config.quantization_config.allocation_result
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, tok.vocab_size, shape, generator=g)
        again = measure_latency({"dense": dense, "compressed": comp},
                                {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, repeats=15)
        fid = fidelity(comp, ref)
        rec = {"strategy": strategy, "target": cfg.target_speedup, "predicted": result["predicted_speedup"],
               "measured": result["measured_speedup"], "remeasured": again["dense"] / again["compressed"],
               "relerr": fid.relative_error, "cos": fid.cosine_mean, "kept": result["targeted_param_ratio"],
               "seconds": seconds}
        records.append(rec)
        rows.append([strategy, rec["target"], fmt(rec["predicted"], 2), fmt(rec["measured"], 2),
                     fmt(rec["remeasured"], 2), fmt(rec["kept"], 3), f"{fmt(rec['relerr'])} / {fmt(rec['cos'])}"])
    body = (
        f"## Speed budget (all-mpnet-base-v2, batch {shape[0]} x {shape[1]} tokens, "
        f"{torch.get_num_threads()} threads, load average {load_average()})\n\n"
        "`measured` is the planner's own interleaved end-to-end measurement; `re-measured` a second, "
        "independent one (median of 15 interleaved runs). Fidelity on sotu-heldout: relative error / cosine.\n\n"
        + markdown_table(["allocation", "target", "predicted", "measured", "re-measured", "kept", "fidelity"], rows)
    )
    return body, records


#: The real model each study runs on (for the results header).
STUDY_MODELS = {"size": "minilm", "llm": "smollm2", "loss": "minilm", "speed": "mpnet"}
STUDIES = {"size": study_size, "llm": study_llm, "loss": study_loss, "speed": study_speed}


def _plot(records: dict, out: Path) -> None:
    size = records.get("size")
    if not size:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, marker in (("uniform", "o"), ("greedy", "s")):
        pts = [(r["ratio"], r["sotu-heldout_cos"]) for r in size if r["strategy"] == strategy]
        ax.plot(*zip(*pts, strict=True), marker=marker, label=strategy)
    ax.set_xlabel("param_ratio (targeted weights kept)")
    ax.set_ylabel("held-out embedding cosine")
    ax.set_title("MiniLM: greedy vs uniform ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "allocation_size.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny settings, every code path, temp folder")
    parser.add_argument("--llm-ratios", type=float, nargs="+", default=list(LLM_RATIOS),
                        help="param_ratio budgets of the llm study (default: %(default)s)")
    parser.add_argument("--llm-articles", type=int, default=LLM_EVAL_ARTICLES,
                        help="held-out Wikipedia articles of the llm study (default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: benchmarks/results, or a temp dir with --quick)")
    args = parser.parse_args(argv)
    globals().update(LLM_RATIOS=tuple(args.llm_ratios), LLM_EVAL_ARTICLES=args.llm_articles)  # read by study_llm
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    torch.manual_seed(0)
    studies = list(STUDIES) if args.study == "all" else [args.study]
    start = time.perf_counter()
    bodies, records = [], {}
    for name in studies:
        body, recs = STUDIES[name](args.quick)
        bodies.append(body)
        records[name] = recs
    info = machine_info([STUDY_MODELS[s] for s in studies])
    name = "allocation" if args.study == "all" else f"allocation_{args.study}"
    header = results_header("Rank allocation on real models", command_line(__file__, argv or sys.argv[1:]), info,
                            time.perf_counter() - start)
    write_markdown(out / f"{name}.md", header, "\n\n".join(bodies))
    (out / f"{name}.json").write_text(json.dumps(records, indent=1))
    _plot(records, out)
    print(f"wrote {out / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
