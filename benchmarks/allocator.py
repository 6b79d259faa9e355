"""CPU speedups depend on the C memory allocator: dense vs DRONE in fresh processes, two malloc settings.

A transformer forward pass allocates its activations anew at every call (MPNet at 32x128: about
3 GB of tensors per pass, the largest 50 MB). glibc's default ``malloc`` serves blocks above its
mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and trims freed memory at the top of the
heap, so in a fresh process every forward pass page-faults its large activations back in: a cost
per pass that is about the same for the dense and the factored model (their activations are the
same size), so it eats into the measured speedup. A process whose allocator reuses freed memory
(glibc tuned through ``GLIBC_TUNABLES``, or tcmalloc/jemalloc configured to keep memory) does not
pay it. The planner of ``target_speedup`` measures inside ``drone_hf.compress``, whose process may
be in either state (see ``docs/speed.md``).

This study compresses the base encoder once, saves it, and measures dense vs compressed in fresh
worker processes under each allocator setting (rounds interleaved, medians reported), with the
minor page faults per forward pass (``getrusage``) that tell the two states apart.

Usage::

    python benchmarks/allocator.py            # all-mpnet-base-v2, batch 32 and 8 x 128 tokens, 2 threads (~10 min)
    python benchmarks/allocator.py --quick    # MiniLM, tiny shapes, temp folder (the test suite runs it)

Writes ``allocator.md``, ``allocator.json`` and ``allocator.png``. Linux with glibc only (the
settings are glibc's); elsewhere it stops with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    load_average,
    machine_info,
    markdown_table,
    minilm_path,
    pyplot,
    results_header,
    write_markdown,
)
from drone_hf.utils.page_faults import GLIBC_REUSE_TUNABLES, minor_page_faults  # noqa: E402

#: Allocator settings compared, as the worker's GLIBC_TUNABLES (None: removed from its environment).
REGIMES = {
    "glibc default": None,
    "glibc, freed memory reused": GLIBC_REUSE_TUNABLES,  # no mmap below 2 GiB, no heap trimming below 4 GiB
}


@dataclass(frozen=True)
class Settings:
    model: str = "mpnet"  # "mpnet" (BERT-base size) or "minilm"
    param_ratio: float = 0.3  # uniform ranks: about 2x at 32x128 on 2 cores (frontier_mpnet.md)
    shapes: tuple[tuple[int, int], ...] = ((32, 128), (8, 128))
    repeats: int = 9
    warmup: int = 2
    rounds: int = 3  # worker processes per regime, alternating between regimes
    threads: int = 2
    calibration_samples: int = 64


FULL = Settings()
QUICK = Settings(model="minilm", shapes=((4, 32),), repeats=3, warmup=1, rounds=1, threads=1, calibration_samples=16)


def model_path(model: str) -> str:
    if model == "mpnet":
        from benchmarks.assets import mpnet

        return str(mpnet())
    if model == "minilm":
        return minilm_path()
    raise ValueError(f"unknown model {model!r}: use 'mpnet' or 'minilm'")


@torch.inference_mode()
def time_models(models: dict, batch: int, seq: int, repeats: int, warmup: int, vocab: int) -> dict:
    """Median seconds and minor page faults per forward pass of each model, runs interleaved."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: dict[str, list[float]] = {n: [] for n in models}
    faults: dict[str, list[int]] = {n: [] for n in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            f0, t0 = minor_page_faults(), time.perf_counter()
            model(**inputs)
            elapsed, df = time.perf_counter() - t0, minor_page_faults() - f0
            if i >= warmup:
                times[name].append(elapsed)
                faults[name].append(df)
    return {n: {"seconds": statistics.median(times[n]), "faults": statistics.median(faults[n])} for n in models}


def worker(dense_dir: str, compressed_dir: str, s: Settings) -> dict:
    """One fresh process: load both models, time every shape (printed as one JSON line)."""
    from transformers import AutoModel

    import drone_hf  # noqa: F401 - registers the DRONE checkpoint format

    torch.set_num_threads(s.threads)
    dense = AutoModel.from_pretrained(dense_dir, dtype=torch.float32).eval()
    compressed = AutoModel.from_pretrained(compressed_dir).eval()
    vocab = dense.config.vocab_size
    return {f"{b}x{q}": time_models({"dense": dense, "compressed": compressed}, b, q, s.repeats, s.warmup, vocab)
            for b, q in s.shapes}


def run_worker(dense_dir: str, compressed_dir: str, s: Settings, tunables: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", dense_dir, compressed_dir, json.dumps(asdict(s))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compress_once(s: Settings, folder: Path, log=print) -> tuple[str, dict]:
    """Compress the base encoder with uniform ranks on the packaged corpus and save it."""
    from transformers import AutoModel

    import drone_hf

    torch.set_num_threads(s.threads)
    path = model_path(s.model)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    config = drone_hf.DroneConfig(param_ratio=s.param_ratio, allocation="uniform", num_samples=s.calibration_samples,
                                  tokenizer=path)
    drone_hf.compress(model, config, show_progress=False)
    out = folder / "compressed"
    model.save_pretrained(out)
    params = {"compressed": sum(p.numel() for p in model.parameters())}
    log(f"compressed {s.model} (param_ratio={s.param_ratio}, uniform) -> {out}")
    return path, params


def run(s: Settings, log=print) -> dict:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        raise SystemExit("benchmarks/allocator.py compares glibc malloc settings: it runs on Linux with glibc only.")
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, params = compress_once(s, Path(tmp), log)
        samples: dict[str, list[dict]] = {name: [] for name in REGIMES}
        for r in range(s.rounds):
            for name, tunables in REGIMES.items():  # alternate: slow drift of the machine hits both
                samples[name].append(run_worker(dense_dir, str(Path(tmp) / "compressed"), s, tunables))
                log(f"round {r + 1}/{s.rounds} {name}: {samples[name][-1]}")
    rows = []
    for name, runs in samples.items():
        for b, q in s.shapes:
            shape = f"{b}x{q}"
            med = {m: {k: statistics.median(run[shape][m][k] for run in runs) for k in ("seconds", "faults")}
                   for m in ("dense", "compressed")}
            speedups = [run[shape]["dense"]["seconds"] / run[shape]["compressed"]["seconds"] for run in runs]
            rows.append({"regime": name, "tunables": REGIMES[name], "shape": shape, **med,
                         "speedup": statistics.median(speedups), "speedups": speedups})
    return {"settings": asdict(s), "params": params, "glibc": platform.libc_ver()[1], "rows": rows,
            "load_average": load_average()}


def render(r: dict, command: str, runtime: float, out: Path) -> None:
    s = r["settings"]
    table = [[row["regime"], row["shape"], f"{1e3 * row['dense']['seconds']:.0f}",
              f"{1e3 * row['compressed']['seconds']:.0f}", f"{row['speedup']:.2f}x",
              f"{row['dense']['faults']:,.0f}", f"{row['compressed']['faults']:,.0f}"] for row in r["rows"]]
    by = {(row["regime"], row["shape"]): row for row in r["rows"]}
    names = list(REGIMES)
    notes = []
    for b, q in s["shapes"]:
        shape = f"{b}x{q}"
        base, reuse = by[(names[0], shape)], by[(names[1], shape)]
        notes.append(
            f"- {shape}: dense {1e3 * base['dense']['seconds']:.0f} -> {1e3 * reuse['dense']['seconds']:.0f} ms and "
            f"compressed {1e3 * base['compressed']['seconds']:.0f} -> {1e3 * reuse['compressed']['seconds']:.0f} ms "
            f"when freed memory is reused; the speedup goes from {base['speedup']:.2f}x to {reuse['speedup']:.2f}x."
        )
    body = "\n".join([
        f"## Dense vs DRONE (uniform `param_ratio={s['param_ratio']}`), fresh processes, {s['threads']} threads",
        "",
        "Median of interleaved forward passes per worker process; the speedup is the median over "
        f"{s['rounds']} worker process(es) per setting, alternating between settings. *faults*: minor page faults "
        "per forward pass (`getrusage`), i.e. memory the allocator had handed back to the OS and touched again.",
        "",
        markdown_table(["allocator", "batch x seq", "dense ms", "compressed ms", "speedup", "dense faults",
                        "compressed faults"], table),
        "",
        *notes,
        "",
        "## Setup",
        "",
        f"- glibc {r['glibc']}. *freed memory reused*: `GLIBC_TUNABLES={GLIBC_REUSE_TUNABLES}` in the worker's "
        "environment (no mmap below 2 GiB, no heap trimming below 4 GiB); *default*: `GLIBC_TUNABLES` unset.",
        f"- Compressed with `DroneConfig(param_ratio={s['param_ratio']}, allocation=\"uniform\", "
        f"num_samples={s['calibration_samples']})` on the packaged corpus, saved, and reloaded by each worker "
        "with `AutoModel.from_pretrained` (plain transformers + `import drone_hf`).",
        f"- Each worker: {s['warmup']} warm-up + {s['repeats']} timed passes per model and shape, seeded random ids, "
        "no padding.",
        f"- Load average at the end: {r['load_average']} (the run keeps about {s['threads']} busy).",
    ])
    header = results_header("CPU speedup and the memory allocator", command,
                            {**machine_info((s["model"],)), "glibc": r["glibc"]}, runtime)
    write_markdown(out / "allocator.md", header, body)
    (out / "allocator.json").write_text(json.dumps(r, indent=1), encoding="utf-8")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    shapes = [f"{b}x{q}" for b, q in s["shapes"]]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(shapes))], [by[(name, x)]["speedup"] for x in shapes], width,
               label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("speedup (dense / DRONE)")
    ax.set_title(f"{s['model']}: speedup by allocator setting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "allocator.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM, tiny shapes, one round, temp folder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, or a temp dir)")
    parser.add_argument("--worker", nargs=3, metavar=("DENSE", "COMPRESSED", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        dense_dir, compressed_dir, raw = args.worker
        fields = json.loads(raw)
        fields["shapes"] = tuple(tuple(x) for x in fields["shapes"])
        print(json.dumps(worker(dense_dir, compressed_dir, Settings(**fields))), flush=True)
        return Path(compressed_dir)
    s = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    previous = torch.get_num_threads()
    try:
        result = run(s, log=lambda m: print(f"[allocator] {m}", flush=True))
    finally:
        torch.set_num_threads(previous)
    render(result, command_line(__file__, argv if argv is not None else sys.argv[1:]), time.perf_counter() - start, out)
    print(f"wrote {out / 'allocator.md'}")
    return out


if __name__ == "__main__":
    main()
