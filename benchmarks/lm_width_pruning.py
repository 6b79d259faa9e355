"""Prototype study: would MLP width pruning, allocated together with loss-aware DRONE, close the
SmolLM2 20% gap? Measured before building it into the library; the library option it became,
``DroneConfig(prune_mlp=True)``, is measured by ``benchmarks/lm_prune_mlp.py``. The neuron
elimination and compensation are now the library's (:mod:`drone_hf.solver.width`); the allocation
walk here stays the prototype's (its own rank grids).

    python benchmarks/lm_width_pruning.py [--quick] [--out DIR] [--threads N] [--step N]

Why: at a 20% cut of the projections, loss-aware DRONE with greedy ranks reaches 1.43x dense
perplexity one-shot (``lm.md``) and 1.38x with compensated calibration (``lm_sequential_kfac_true.md``);
the target is 1.25x. A gated MLP (``down(act(gate x) * up x)``) can also shrink by dropping
intermediate neurons: a dropped neuron removes a row of ``gate``/``up`` and a column of ``down``
(``3·d`` parameters) and the error it causes lives in one place, ``down``'s input. That is a column
subset problem with a closed form of the same kind as DRONE's:

* **Compensation** (given the kept neurons ``S``): ``W'_S = W G[:, S] G[S, S]⁻¹`` minimises
  ``||W h - W'_S h_S||`` over the calibration activations ``h`` (``G = Σ h hᵀ``, damped by
  ``WIDTH_DAMP · mean(diag G)``), for any output weighting: the loss-aware metric changes *which* neurons
  go, not the compensation.
* **Selection**: Optimal Brain Surgeon on that quadratic, ``--step`` neurons at a time (default 8): with
  ``P = G⁻¹`` over the kept set and ``H`` the damped output-gradient Gram of ``down`` (the K-FAC
  metric of :mod:`drone_hf.solver.kfac`), removing a block ``J`` raises the predicted mean loss by
  ``scale · tr(H W_J P_JJ⁻¹ W_Jᵀ)`` (``W`` the compensated weight so far, ``scale = 1/(2 S T)`` as
  in loss-aware DRONE), exactly; the ``--step`` cheapest single neurons form the block, and the
  block widths (every ``--step`` neurons) are the allocation's candidates.
* **Allocation**: the predicted losses are on loss-aware DRONE's scale, so one
  :func:`drone_hf.allocation.greedy_allocate` walk spreads the cut over attention projections
  (low-rank, ranks every 8) and MLP blocks, each block taking the better of width pruning and
  low-rank factoring of its three projections (its own greedy over ranks every 16), on the lower
  convex hull of both.

Rows, at 10% and 20% cuts (``param_ratio`` 0.9 and 0.8 of every q/k/v/o/gate/up/down projection), on
``benchmarks/lm.py``'s calibration passages (256) and held-out windows: **low-rank only** (the
library's greedy ``drone-kfac`` allocation rule on this script's rank grids: the baseline, measured in
the same run) and **low-rank + width pruning**. One-shot statistics from the dense model, no
fine-tuning, true Fisher (labels drawn from the model, ``kfac_fisher="true"``).

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
from torch import nn

if __package__ in (None, ""):  # `python benchmarks/lm_width_pruning.py`
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
from benchmarks.lm import CALIB_TEXTS, GREEDY_EVAL_TEXTS, TARGET_FACTOR, _load, eval_windows, perplexity  # noqa: E402
from drone_hf.allocation import LayerOptions, greedy_allocate, walk_hulls  # noqa: E402
from drone_hf.calibration import collect_grams, load_texts, tokenize_batches  # noqa: E402
from drone_hf.calibration.output_gradients import collect_output_grams  # noqa: E402
from drone_hf.compress import _split_texts  # noqa: E402
from drone_hf.modules.low_rank_linear import DroneLinear  # noqa: E402
from drone_hf.modules.mlp_blocks import MlpBlock, narrow_block  # noqa: E402
from drone_hf.modules.targets import replace_modules, resolve_targets  # noqa: E402
from drone_hf.solver import DEFAULT_KFAC_DAMP, decompose_kfac  # noqa: E402
from drone_hf.solver import width as width_solver  # noqa: E402

CUTS = (0.2, 0.1)
#: Neurons removed per OBS step (the width grid), attention and MLP rank grids.
STEP, ATTENTION_RANK_STEP, MLP_RANK_STEP = 8, 8, 16
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def eliminate_neurons(weight: torch.Tensor, gram: torch.Tensor, out_gram: torch.Tensor, loss_scale: float,
                      step: int, max_removed: int) -> tuple[list[int], list[float]]:
    """Removal order of ``down``'s input neurons, ``step`` at a time, and the predicted loss after
    each step: the library's solver (:func:`drone_hf.solver.width.eliminate_neurons`, damping
    ``WIDTH_DAMP``), which ``DroneConfig(prune_mlp=True)`` uses too."""
    curve = width_solver.eliminate_neurons(weight, gram, out_gram=out_gram, loss_scale=loss_scale, step=step,
                                           max_removed=max_removed)
    return curve.order, curve.losses


def prune_mlp(mlp: nn.Module, removed: list[int], gram: torch.Tensor) -> None:
    """Narrow ``mlp``'s gate/up/down in place to the neurons not in ``removed``; ``down`` is the
    least-squares compensation on the kept neurons (:func:`drone_hf.solver.width.compensated_weight`),
    the layers narrowed by :func:`drone_hf.modules.mlp_blocks.narrow_block`."""
    width = mlp.down_proj.in_features
    keep = sorted(set(range(width)) - set(removed))
    block = MlpBlock("", PROJECTIONS[:2], PROJECTIONS[2], width)
    compensated = width_solver.compensated_weight(mlp.down_proj.weight, gram, keep)
    narrowed = narrow_block({p: (p, getattr(mlp, p)) for p in PROJECTIONS}, block, keep, compensated)
    for name, layer in narrowed.items():  # the library's narrowing, installed on this one MLP
        setattr(mlp, name, layer)


def _rank_options(name: str, dec, step: int) -> LayerOptions:
    m, n = dec.shape
    ranks = list(range(step, min(m, n), step))
    return LayerOptions(name, float(m * n), ranks, [float(k * (m + n)) for k in ranks],
                        [float(dec.predicted_loss(k)) for k in ranks], 1.0)


def _block_options(i: int, curve, decs: dict, width: int, hidden: int, prune: bool, step: int):
    """One MLP block as one allocation unit: its options are width-pruned blocks and (greedily
    ranked) factored blocks; returns the options and each option's label."""
    labels, costs, losses = [], [], []
    if prune:
        order, cum = curve  # cum[s - 1]: predicted loss with the first s·step neurons of order removed
        for s, loss in enumerate(cum, 1):
            labels.append(("prune", order[: s * step]))
            costs.append(float(3 * hidden * (width - s * step)))
            losses.append(loss)
    hulls = {p: _rank_options(p, decs[f"layers.{i}.mlp.{p}"], MLP_RANK_STEP).hull() for p in PROJECTIONS}
    for cost, loss, ranks in walk_hulls(hulls):  # the three hulls together, cheapest loss per parameter first
        labels.append(("factor", {q: ranks.get(q) for q in hulls}))
        costs.append(cost)
        losses.append(loss)
    return LayerOptions(f"block{i}", float(3 * hidden * width), list(range(len(labels))), costs, losses, 1.0), labels


def run(quick: bool, save=None, step: int = STEP) -> tuple[str, dict]:
    model, tok, model_name, pool, held = _load(quick)
    max_length = 32 if quick else 256
    calib_texts, eval_texts = (16, 4) if quick else (CALIB_TEXTS, GREEDY_EVAL_TEXTS)
    calib = _split_texts(load_texts(pool, calib_texts + eval_texts, seed=0), eval_texts, 0, calib_texts)[0]
    windows = eval_windows(tok, held, max_length)
    targets = resolve_targets(model, None, None)
    layers = {c: layer for c, (_, layer) in targets.items()}
    data = tokenize_batches(calib, tok, max_length, 8)
    cfg = model.config
    width, hidden, blocks = cfg.intermediate_size, cfg.hidden_size, cfg.num_hidden_layers
    timings: dict[str, float] = {}

    def timed(label, fn):
        t = time.perf_counter()
        value = fn()
        timings[label] = time.perf_counter() - t
        print(f"{label}: {timings[label]:.0f} s", flush=True)
        return value

    dense_ppl = perplexity(model, windows)
    grams = timed("Gram pass", lambda: {c: o.gram for c, o in collect_grams(
        model, layers, data, {c: layer.in_features for c, layer in layers.items()}, False).items()})
    kfac = timed("output-gradient pass", lambda: (lambda g: {
        c: {"out_gram": o.gram, "loss_scale": g.loss_scale(c)} for c, o in g.observers.items()})(
        collect_output_grams(model, layers, data, fisher="true")))
    decs = timed("loss-aware DRONE decompositions", lambda: {
        c: decompose_kfac(layer.weight.detach(), grams[c], damp=DEFAULT_KFAC_DAMP, **kfac[c])
        for c, layer in layers.items()})
    step = min(step, width // 8)
    curves = timed("OBS neuron elimination", lambda: [eliminate_neurons(
        layers[f"layers.{i}.mlp.down_proj"].weight.detach(), grams[f"layers.{i}.mlp.down_proj"],
        kfac[f"layers.{i}.mlp.down_proj"]["out_gram"], kfac[f"layers.{i}.mlp.down_proj"]["loss_scale"],
        step, int(width_solver.MAX_PRUNED * width)) for i in range(blocks)])
    total = sum(layer.weight.numel() for layer in layers.values())
    record = {"model": model_name, "dense_ppl": dense_ppl, "calibration_texts": data.num_texts,
              "eval_windows": list(windows.shape), "timings_s": timings, "rows": {}, "partial": True,
              "step": step}
    # the candidates do not depend on the cut: built once per allocation, walked once per cut
    candidates = {}
    for prune in (False, True):
        options, labels = [], {}
        for i in range(blocks):
            o, lab = _block_options(i, curves[i], decs, width, hidden, prune, step)
            options.append(o)
            labels[o.name] = lab
        options += [_rank_options(c, decs[c], ATTENTION_RANK_STEP) for c in targets if ".self_attn." in c]
        candidates[prune] = options, labels
    for cut in CUTS:
        for prune in (False, True):
            label = "low-rank + width pruning" if prune else "low-rank only"
            options, labels = candidates[prune]
            alloc = greedy_allocate(options, max_cost=(1 - cut) * total)
            compressed, repl, plan = copy.deepcopy(model), {}, []
            for i in range(blocks):
                choice = alloc.ranks.get(f"block{i}")
                if choice is None:
                    plan.append("dense")
                    continue
                kind, value = labels[f"block{i}"][choice]
                if kind == "prune":
                    prune_mlp(compressed.model.layers[i].mlp, value, grams[f"layers.{i}.mlp.down_proj"])
                    plan.append(f"width {width - len(value)}")
                    continue
                for p, rank in value.items():
                    if rank is not None:
                        c = f"layers.{i}.mlp.{p}"
                        f = decs[c].factors(rank)
                        repl[targets[c][0]] = DroneLinear.from_factors(layers[c], f.up, f.down, f.relative_error)
                plan.append("ranks " + "/".join("dense" if r is None else str(r) for r in value.values()))
            for c, (full, layer) in targets.items():
                if ".self_attn." in c and c in alloc.ranks:
                    f = decs[c].factors(alloc.ranks[c])
                    repl[full] = DroneLinear.from_factors(layer, f.up, f.down, f.relative_error)
            replace_modules(compressed, repl)
            kept = sum(m.weight.numel() if isinstance(m, nn.Linear) else m.factored_parameters
                       for name, m in compressed.model.layers.named_modules()
                       if name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", *PROJECTIONS})
            ppl = perplexity(compressed, windows)
            record["rows"][f"{cut}/{label}"] = {
                "cut": cut, "label": label, "ppl": ppl, "kept": kept / total, "predicted_loss": alloc.predicted_loss,
                "mlp_blocks": plan, "dense_attention": sum(c not in alloc.ranks for c in targets if ".self_attn." in c)}
            print(f"cut {cut:.0%} {label}: ppl {ppl:.3f} ({ppl / dense_ppl:.3f}x) kept {kept / total:.4f}", flush=True)
            del compressed
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
        pruned = sum(p.startswith("width") for p in r["mlp_blocks"])
        factored = sum(p.startswith("ranks") for p in r["mlp_blocks"])
        rows.append([f"{r['cut']:.0%}", r["label"], f"{r['ppl']:.2f}", f"{r['ppl'] / dense:.3f}x", f"{r['kept']:.4f}",
                     f"{pruned} / {factored} / {len(r['mlp_blocks']) - pruned - factored}", str(r["dense_attention"])])
    partial = "**Partial run**: the rows below are those finished before it stopped.\n\n" if rec["partial"] else ""
    t = rec["timings_s"]
    return (
        f"## Low-rank vs low-rank + MLP width pruning ({rec['model']}, one-shot, no fine-tuning)\n\n" + partial
        + f"Held-out perplexity on {rec['eval_windows'][0]} windows of {rec['eval_windows'][1]} tokens (dense "
        f"{dense:.2f}; target at a 20% cut: {TARGET_FACTOR}x dense), {rec['calibration_texts']} calibration passages; "
        f"neurons removed {rec.get('step', STEP)} per elimination step (the width grid). "
        "`kept`: fraction of the q/k/v/o/gate/up/down parameters left. MLP blocks: width-pruned / factored / dense. "
        "The width-pruning row is this script's prototype allocation (`prune_mlp=True` in the library: "
        "`lm_prune_mlp.md`).\n\n"
        + markdown_table(["cut", "allocation", "perplexity", "x dense", "kept", "MLP blocks", "dense attention layers"],
                         rows)
        + "\n\nSeconds on this machine: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())
        + f"; 1-minute load average at the end {rec['load_average']}.\n"
    )


@keeps_torch_threads
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Llama built in code, a few texts, temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, temp with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--step", type=int, default=STEP,
                        help=f"neurons removed per OBS step, the width grid (default {STEP}; another value adds "
                             "_step{N} to the result files' names)")
    args = parser.parse_args(argv)
    if args.step < 1:
        parser.error(f"--step must be a positive number of neurons, got {args.step}")
    stem = "lm_width_pruning" + (f"_step{args.step}" if args.step != STEP else "")
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    info = machine_info(("minilm",) if args.quick else ("smollm2",))
    save = results_writer(out, stem, "LM prototype: MLP width pruning allocated with loss-aware DRONE",
                          command_line(__file__, argv if argv is not None else sys.argv[1:]), info)
    save(*run(args.quick, save=save, step=args.step))
    print(f"wrote {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
