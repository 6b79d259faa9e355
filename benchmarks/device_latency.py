"""Dense vs DRONE latency on one device in several precisions, absolute times stated with the device.

The frontier (``frontier.py``) measures CPU speedups in float32, where this project's machines run.
On a GPU the picture differs: half-precision matrix units make the dense layers fast, so the
question is whether the factored layers (two thin matrix products instead of one square one) still
pay off, and at which budgets. This study compresses the base encoder once per budget (DRONE,
uniform ``param_ratio``, calibrated in float32 on the packaged corpus, on the CPU), then casts the
dense and each compressed model to every precision on the chosen device and measures them
(``drone_hf.hub.measure_speed``: seeded random ids, no padding, dense and compressed interleaved,
median of repeats, the device synchronised after each pass).

It also checks that the cast is harmless: *rel. diff* is the relative Frobenius difference of the
last hidden state in that precision from the same model in float32 on the same batch (a factor
that overflowed float16 shows up here, or as ``inf``/``nan``).

Usage::

    python benchmarks/device_latency.py --device cuda                      # MPNet, float32/float16/bfloat16
    python benchmarks/device_latency.py --device cpu --dtypes float32 bfloat16 --model minilm
    python benchmarks/device_latency.py --quick                            # tiny shapes on the CPU, temp folder

Writes ``device_latency_<model>_<device type>.{md,json,png}`` (or ``--name``). The models come from
the asset cache (``benchmarks/assets.py``; MiniLM from the ``demo`` extra) or from ``--model-dir``.
A GPU machine that cannot fetch the weights can still time the architecture: ``--model-dir`` with
only the model's ``config.json`` and tokenizer files plus ``--random-weights`` builds it with seeded
random weights (the latency depends on the shapes, not the values; the *rel. diff* column then
describes random weights, not the trained model)::

    python benchmarks/device_latency.py --device cuda --model mpnet --model-dir mpnet-config --random-weights
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.allocator import model_path  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    check_results_name,
    command_line,
    describe_models,
    keeps_torch_threads,
    load_average,
    machine_info,
    markdown_table,
    pyplot,
    results_header,
    write_markdown,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    model: str = "mpnet"
    device: str = "cuda"
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    ratios: tuple[float, ...] = (0.7, 0.5, 0.3)  # the frontier's uniform budgets
    shapes: tuple[tuple[int, int], ...] = ((32, 128), (1, 128))  # the frontier's shapes
    repeats: int = 15
    warmup: int = 5
    threads: int = 2  # torch CPU threads (timings on the CPU; the GPU's host side otherwise)
    calibration_samples: int = 64
    model_dir: str | None = None  # a local model folder instead of the asset cache's
    random_weights: bool = False  # the folder's architecture, seeded random weights (config + tokenizer suffice)


FULL = Settings()
QUICK = Settings(model="minilm", device="cpu", dtypes=("float32", "bfloat16"), ratios=(0.5,), shapes=((2, 16),),
                 repeats=3, warmup=1, threads=1, calibration_samples=16)


def check_device(name: str) -> torch.device:
    """The device to measure on, refused with the fix when this machine does not have it."""
    from drone_hf.hub.measure import timing_device

    try:
        device = timing_device(name)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name!r}: this study times cpu and cuda devices only")
    return device


def compress_budgets(s: Settings, log=print) -> tuple[torch.nn.Module, dict[float, torch.nn.Module], dict]:
    """The dense base encoder and one DRONE model per budget, all float32 on the CPU."""
    from transformers import AutoModel

    import drone_hf

    path = s.model_dir or model_path(s.model)
    if s.random_weights:  # latency depends on shapes, not values: no weights file needed
        from transformers import AutoConfig

        torch.manual_seed(0)
        dense = AutoModel.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    else:
        dense = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    compressed, params = {}, {"dense": sum(p.numel() for p in dense.parameters())}
    for ratio in s.ratios:
        config = drone_hf.DroneConfig(param_ratio=ratio, allocation="uniform", num_samples=s.calibration_samples,
                                      tokenizer=path)
        compressed[ratio] = drone_hf.compress(copy.deepcopy(dense), config, show_progress=False).eval()
        params[str(ratio)] = sum(p.numel() for p in compressed[ratio].parameters())
        log(f"compressed {s.model} at param_ratio={ratio}")
    return dense, compressed, params


@torch.inference_mode()
def cast_difference(model: torch.nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    """Relative Frobenius difference of ``model``'s last hidden state from ``reference`` (float32)."""
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float().cpu()
    return float(torch.linalg.norm(hidden - reference) / torch.linalg.norm(reference))


@keeps_torch_threads
def run(s: Settings, log=print) -> dict:
    from drone_hf.hub.measure import measure_speed

    device = check_device(s.device)
    torch.set_num_threads(s.threads)
    dense, compressed, params = compress_budgets(s, log)
    batch, seq = s.shapes[0]
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # float32 references on the CPU, for the cast check
        mask = torch.ones_like(ids)
        reference = {name: m(input_ids=ids, attention_mask=mask).last_hidden_state
                     for name, m in [("dense", dense), *compressed.items()]}
    rows = []
    for dtype_name in s.dtypes:
        dense_d = copy.deepcopy(dense).to(device=device, dtype=DTYPES[dtype_name])
        dense_diff = cast_difference(dense_d, reference["dense"], ids.to(device))
        for ratio, model in compressed.items():
            model_d = copy.deepcopy(model).to(device=device, dtype=DTYPES[dtype_name])
            diff = cast_difference(model_d, reference[ratio], ids.to(device))
            for b, q in s.shapes:
                m = measure_speed(dense_d, model_d, batch_size=b, seq_len=q, repeats=s.repeats, warmup=s.warmup)
                rows.append({
                    "dtype": dtype_name, "param_ratio": ratio, "shape": f"{b}x{q}",
                    "dense_ms": m.dense_latency_ms, "compressed_ms": m.compressed_latency_ms,
                    "speedup": m.dense_latency_ms / m.compressed_latency_ms,
                    "dense_rel_diff": dense_diff, "compressed_rel_diff": diff, "device": m.latency_device,
                })
                log(f"{dtype_name} param_ratio={ratio} {b}x{q}: dense {m.dense_latency_ms:.2f} ms, "
                    f"compressed {m.compressed_latency_ms:.2f} ms ({rows[-1]['speedup']:.2f}x)")
            del model_d
        del dense_d
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": asdict(s), "params": params, "rows": rows, "device": rows[0]["device"] if rows else None,
            "machine": {**machine_info((s.model,)), "model": describe_model(s)},  # with the run's threads
            "load_average": load_average()}


def describe_model(s: Settings) -> str:
    """The header's model line: the asset, or the folder given, and whether the weights were random."""
    source = s.model_dir or describe_models((s.model,))
    return f"{source}, seeded random weights (its architecture; latency does not depend on the values)" \
        if s.random_weights else source


def _diff(x: float) -> str:
    return f"{x:.2e}" if x == x and x not in (float("inf"), float("-inf")) else str(x)


def render(r: dict, command: str, runtime: float, out: Path, stem: str) -> None:
    s = r["settings"]
    table = [[row["dtype"], row["param_ratio"], row["shape"], f"{row['dense_ms']:.2f}", f"{row['compressed_ms']:.2f}",
              f"{row['speedup']:.2f}x", _diff(row["dense_rel_diff"]), _diff(row["compressed_rel_diff"])]
             for row in r["rows"]]
    params = r["params"]
    kept = ", ".join(f"{ratio}: {params[str(ratio)] / 1e6:.1f}M" for ratio in s["ratios"])
    body = "\n".join([
        f"## Dense vs DRONE on {r['device']}",
        "",
        "Median forward time of each model on one seeded random batch (no padding), "
        f"{s['warmup']} warm-up + {s['repeats']} timed passes per model, dense and compressed interleaved, "
        "the device synchronised after each pass. *rel. diff*: relative difference of the last hidden state "
        "from the same model in float32 on the CPU (first shape's batch); 0 for float32 up to the device's "
        "arithmetic.",
        "",
        markdown_table(["dtype", "param_ratio", "batch x seq", "dense ms", "DRONE ms", "speedup", "dense rel. diff",
                        "DRONE rel. diff"], table),
        "",
        "## Setup",
        "",
        f"- Model: {r['machine']['model']}; base encoder (`AutoModel`), {params['dense'] / 1e6:.1f}M parameters; "
        "compressed "
        f"({kept}) with `DroneConfig(param_ratio=..., allocation=\"uniform\", num_samples="
        f"{s['calibration_samples']})` on the packaged corpus, in float32 on the CPU, then cast with "
        "`model.to(device, dtype)` (the factors are cast like any weight).",
        f"- Torch CPU threads: {s['threads']}. Load average at the end: {r['load_average']}.",
        "- Accuracy at these budgets (float32, CPU): `frontier.md` / `frontier_mpnet.md`.",
    ])
    header = results_header(f"Dense vs DRONE latency by precision: {r['device']}", command,
                            {**r["machine"], "device": r["device"]}, runtime)
    write_markdown(out / f"{stem}.md", header, body)
    (out / f"{stem}.json").write_text(json.dumps(r, indent=1), encoding="utf-8")
    plt = pyplot()
    shapes = [f"{b}x{q}" for b, q in s["shapes"]]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.5), squeeze=False)
    width = 0.8 / len(s["ratios"])
    by = {(row["dtype"], row["param_ratio"], row["shape"]): row["speedup"] for row in r["rows"]}
    for ax, shape in zip(axes[0], shapes, strict=True):
        for i, ratio in enumerate(s["ratios"]):
            ax.bar([j + i * width for j in range(len(s["dtypes"]))], [by[(d, ratio, shape)] for d in s["dtypes"]],
                   width, label=f"param_ratio {ratio}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([j + width * (len(s["ratios"]) - 1) / 2 for j in range(len(s["dtypes"]))], s["dtypes"])
        ax.set_title(f"batch x seq {shape}", fontsize=9)
        ax.set_ylabel("speedup (dense / DRONE)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{s['model']}: {r['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="MiniLM, CPU, float32 + bfloat16, tiny shapes, temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, or a temp dir)")
    parser.add_argument("--model", choices=["mpnet", "minilm"], help="base encoder (default mpnet)")
    parser.add_argument("--device", help="device to measure on (default cuda; cpu for --quick)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="precisions (default all three)")
    parser.add_argument("--ratios", nargs="+", type=float, help="uniform param_ratio budgets (default 0.7 0.5 0.3)")
    parser.add_argument("--model-dir", help="a local model folder (overrides the asset cache; e.g. on a GPU machine)")
    parser.add_argument("--random-weights", action="store_true",
                        help="the model folder's architecture with seeded random weights: only its config and "
                        "tokenizer files are needed (latency depends on shapes, not values)")
    parser.add_argument("--name", help="results file name without extension (default device_latency_<model>_<device>)")
    args = parser.parse_args(argv)
    check_results_name(parser, args.name, "device_latency_mpnet_h100")
    if args.ratios and not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios {args.ratios}: each budget is a fraction of the weights kept, strictly between 0 and 1")
    s = QUICK if args.quick else FULL
    overrides = {k: v for k, v in {"model": args.model, "device": args.device,
                                   "dtypes": tuple(args.dtypes) if args.dtypes else None,
                                   "ratios": tuple(args.ratios) if args.ratios else None,
                                   "model_dir": args.model_dir, "random_weights": args.random_weights or None,
                                   }.items() if v is not None}
    if args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no config.json there; give a transformers model folder")
    s = replace(s, **overrides)
    check_device(s.device)  # before anything is loaded or compressed
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"device_latency_{s.model}_{torch.device(s.device).type}"
    start = time.perf_counter()
    result = run(s, log=lambda m: print(f"[device_latency] {m}", flush=True))
    render(result, command_line(__file__, argv if argv is not None else sys.argv[1:]), time.perf_counter() - start,
           out, stem)
    print(f"wrote {out / (stem + '.md')}")
    return out


if __name__ == "__main__":
    main()
