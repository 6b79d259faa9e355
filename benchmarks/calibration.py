"""Cost of calibration: time against a plain forward pass, peak memory, sequential vs one-shot quality.

Studies:

* ``overhead``: wall time of drone-hf's statistics pass (hooks, masking, float32 products, shared
  inputs, output Grams for narrowing layers) divided by a plain forward pass over the same token
  batches, interleaved, median of repeats; next to a naive hook that accumulates
  ``x.double().T @ x`` for every layer. Target: at most 1.3x. Also the peak resident memory of
  each (separate processes, ``ru_maxrss``).
* ``sequential``: held-out fidelity of one-shot vs layer-sequential calibration at the same ranks.
* ``processes``: two ``torch.distributed`` processes (gloo, CPU) against one: the same factors to float
  round-off, and bit-identical factors in both processes.

Usage::

    python benchmarks/calibration.py [--study overhead|sequential|processes|all] [--model minilm|mpnet] [--quick]
                                     [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
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
    load_average,
    machine_info,
    markdown_table,
    minilm_path,
    results_header,
    write_markdown,
)
from drone_hf.calibration import collect_grams, load_texts, tokenize_batches  # noqa: E402
from drone_hf.modules import dense_weight_of, resolve_targets  # noqa: E402


def _model_path(name: str) -> str:
    if name == "mpnet":
        from benchmarks.assets import mpnet

        return str(mpnet())
    return minilm_path()


def _setup(name: str, quick: bool):
    from transformers import AutoTokenizer

    model, tok = _fresh(name), AutoTokenizer.from_pretrained(_model_path(name))
    texts = load_texts(None, 16 if quick else 128, seed=0)
    data = tokenize_batches(texts, tok, 128, 8)
    targets = resolve_targets(model, None, None)
    shapes = {c: tuple(dense_weight_of(m).shape) for c, (_, m) in targets.items()}
    return model, data, targets, shapes


def drone_statistics(model, data, targets, shapes) -> None:
    """drone-hf's statistics pass as the engine runs it (output Grams where a layer narrows)."""
    out = {c for c, (o, i) in shapes.items() if o < i}
    widths = {c: o if c in out else i for c, (o, i) in shapes.items()}
    collect_grams(model, {c: m for c, (_, m) in targets.items()}, data, widths, False, observe_output=out,
                  token_sums=False)  # as compress runs it without attention compression


def naive_statistics(model, data, targets, shapes) -> None:
    """The naive baseline: every layer, float64 ``x.T @ x`` of every (padded) row."""
    grams = {}

    def hook(name):
        def fn(m, a, o):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return fn

    handles = [m.register_forward_hook(hook(c)) for c, (_, m) in targets.items()]
    try:
        plain_forward(model, data)
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def plain_forward(model, data) -> None:
    for batch in data.batches:
        model(**batch)


def study_overhead(name: str, quick: bool) -> tuple[str, dict]:
    model, data, targets, shapes = _setup(name, quick)
    runs = {"forward": plain_forward, "drone-hf": drone_statistics, "naive float64": naive_statistics}
    times: dict[str, list[float]] = {k: [] for k in runs}
    repeats = 2 if quick else 5
    for _ in range(repeats + 1):  # first round is warm-up
        for key, fn in runs.items():
            start = time.perf_counter()
            fn(model, data) if key == "forward" else fn(model, data, targets, shapes)
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    rss = {k: _peak_rss(name, k, quick) for k in runs}
    rows = [[k, f"{med[k]:.2f}", fmt(med[k] / med["forward"], 2), f"{rss[k]:.0f}"] for k in runs]
    body = (
        f"## Calibration overhead ({name}, {data.num_tokens:,} real tokens in {len(data.batches)} length-sorted "
        f"batches of 8 texts, {torch.get_num_threads()} threads, load average {load_average()})\n\n"
        "Median of interleaved repeats; the ratio is against the plain forward pass over the same batches. "
        "Peak RSS is measured in a fresh process per row (model loaded + that pass).\n\n"
        + markdown_table(["pass", "seconds", "x forward", "peak RSS MiB"], rows)
    )
    return body, {"seconds": med, "peak_rss_mib": rss, "tokens": data.num_tokens}


def _peak_rss(name: str, key: str, quick: bool) -> float:
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys, resource; sys.path.insert(0, {root!r})\n"
        "from benchmarks.calibration import _setup, plain_forward, drone_statistics, naive_statistics\n"
        f"m, d, t, s = _setup({name!r}, {quick!r})\n"
        f"fn = {{'forward': plain_forward, 'drone-hf': drone_statistics, 'naive float64': naive_statistics}}[{key!r}]\n"
        f"fn(m, d) if {key!r} == 'forward' else fn(m, d, t, s)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def study_sequential(name: str, quick: bool) -> tuple[str, dict]:
    from transformers import AutoTokenizer

    model, tok = _fresh(name), AutoTokenizer.from_pretrained(_model_path(name))
    ref = dense_reference(model, heldout_eval_set(tok, 16 if quick else 256))
    rows, records = [], {}
    for ratio in ((0.5,) if quick else (0.3, 0.5)):
        for sequential in (False, True, "compensated"):
            cfg = drone_hf.DroneConfig(param_ratio=ratio, sequential=sequential, num_samples=16 if quick else 128,
                                       allocation="uniform")  # the same ranks in every mode
            start = time.perf_counter()
            comp = drone_hf.compress(copy.deepcopy(model), cfg, show_progress=False)
            seconds = time.perf_counter() - start
            f = fidelity(comp, ref)
            mode = {False: "one-shot", True: "sequential"}.get(sequential, f"sequential={sequential}")
            records[f"{ratio}-{mode}"] = {"relerr": f.relative_error, "cos": f.cosine_mean, "seconds": seconds}
            rows.append([ratio, mode, fmt(f.relative_error), fmt(f.cosine_mean), f"{seconds:.0f}"])
    body = (
        f"## One-shot vs layer-sequential calibration ({name}, uniform ranks)\n\n"
        "Fidelity on sotu-heldout against the dense model: relative error of the last hidden state and mean "
        "embedding cosine. `sequential=compensated` solves each layer for the dense model's outputs from the "
        "compressed model's inputs (`min ||W X - W' X̂||`), `sequential` for the dense layer's outputs on those "
        "inputs (`min ||(W - W') X̂||`).\n\n"
        + markdown_table(["param_ratio", "calibration", "rel. error", "cosine", "seconds"], rows)
    )
    return body, records


def _process_worker(rank: int, world: int, init_file: str, out_dir: str, name: str, quick: bool) -> None:
    """One of ``world`` calibration processes (gloo): compress the real model, save its state."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = drone_hf.compress(_fresh(name), _process_config(quick), show_progress=False)
        torch.save({"state": model.state_dict(), "calibration": model.config.quantization_config.calibration},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fresh(name: str):
    """The real model ``name``, freshly loaded in float32 and in eval mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(_model_path(name), dtype=torch.float32).eval()


def _process_config(quick: bool) -> drone_hf.DroneConfig:
    return drone_hf.DroneConfig(param_ratio=0.5, allocation="uniform", num_samples=16 if quick else 128)


def study_processes(name: str, quick: bool) -> tuple[str, dict]:
    """1 process vs 2 (``torch.distributed``, gloo on CPU): each of the two calibrates on half of the
    texts, the statistics are all-reduced, and both must end with the 1-process factors (to float
    round-off: the same sums in another order) and with bit-identical factors to each other."""
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        mp.spawn(_process_worker, args=(world, str(Path(tmp) / "init"), tmp, name, quick), nprocs=world, join=True)
        multi_seconds = time.perf_counter() - start
        results = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same per-process threads as the workers: a like-for-like time
    try:
        start = time.perf_counter()
        single = drone_hf.compress(_fresh(name), _process_config(quick), show_progress=False)
        single_seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    ref = single.state_dict()
    factors = [k for k in ref if k.endswith((".up.weight", ".down.weight"))]
    worst = max(float((results[0]["state"][k] - ref[k]).abs().max() / ref[k].abs().max()) for k in factors)

    def product(state: dict, up_key: str) -> torch.Tensor:  # up @ down: the layer's low-rank weight
        return state[up_key].double() @ state[up_key.replace(".up.weight", ".down.weight")].double()

    ups = [k for k in factors if k.endswith(".up.weight")]
    worst_weight = max(float(torch.linalg.norm(product(results[0]["state"], k) - product(ref, k))
                             / torch.linalg.norm(product(ref, k))) for k in ups)
    agree = all(torch.equal(results[0]["state"][k], results[1]["state"][k]) for k in ref)
    same_data = all(r["calibration"]["num_tokens"] == single.config.quantization_config.calibration["num_tokens"]
                    for r in results)
    rows = [
        ["factored layers (up/down pairs)", len(factors) // 2],
        ["calibration tokens, every process (all-reduced) = 1 process", "yes" if same_data else "NO"],
        ["largest factor entry difference, 2 vs 1 (relative to the factor's max; sign/rotation-sensitive)",
         f"{worst:.1e}"],
        ["largest low-rank weight (up @ down) difference, 2 vs 1 (relative Frobenius)", f"{worst_weight:.1e}"],
        ["the 2 processes' factors bit-identical to each other", "yes" if agree else "NO"],
        ["wall time, 1 process (1 thread) / 2 processes (1 thread each), s",
         f"{single_seconds:.0f} / {multi_seconds:.0f}"],
    ]
    body = (
        f"## One process vs two ({name}, `torch.distributed` gloo, uniform `param_ratio=0.5`)\n\n"
        "Each process calibrates on its shard of the texts; the Gram sums are all-reduced, so every process "
        "solves the same statistics. Differences from the 1-process run are float round-off of the same sums "
        "added in another order. The factors themselves are only defined up to sign (and up to a rotation where "
        "singular values coincide), so the low-rank weight `up @ down` is the quantity that must agree. Wall "
        "times include model loading and process start-up.\n\n"
        + markdown_table(["check", "result"], rows)
    )
    return body, {"max_rel_diff": worst, "max_weight_rel_diff": worst_weight, "processes_agree": agree,
                  "same_tokens": same_data,
                  "seconds_single": single_seconds, "seconds_two_processes": multi_seconds}


STUDIES = {"overhead": study_overhead, "sequential": study_sequential, "processes": study_processes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    start = time.perf_counter()
    studies = list(STUDIES) if args.study == "all" else [args.study]
    command = command_line(__file__, argv or sys.argv[1:])
    for study in studies:  # one file per study, so running one study never overwrites another's table
        body, rec = STUDIES[study](args.model, args.quick)
        stem = f"calibration_{args.model}" + ("" if study == "overhead" else f"_{study}")
        header = results_header("Calibration cost and quality", command, machine_info([args.model]),
                                time.perf_counter() - start)
        write_markdown(out / f"{stem}.md", header, body)
        (out / f"{stem}.json").write_text(json.dumps({study: rec}, indent=1))
        print(f"wrote {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
