"""Query-key (attention) compression of MiniLM and MPNet: held-out fidelity and attention latency.

``DroneConfig(compress_attention=True, attention_rank=k)`` shrinks every head's query and key width
from ``d`` to ``k`` (DRONE section 2). Two studies, on the packaged all-MiniLM-L6-v2 (``--model minilm``,
12 heads of width 32, the default) or the BERT-base-sized all-mpnet-base-v2 (``--model mpnet``, 12
layers, 12 heads of width 64, relative position bias; ``benchmarks/assets.py mpnet`` must have been
fetched once, it is read from the local asset cache):

1. **Fidelity** on held-out text (``drone_hf.evaluation.output_fidelity`` against the dense model, on
   a seeded sample of the packaged ``sotu-heldout`` corpus) at several ``k``: attention alone (only the
   query/key layers targeted), the data-free baseline (``method="svd"``), and combined with linear
   compression of everything else (``param_ratio=0.5``).
2. **Latency of the attention block** (layer 0's self-attention module: q/k/v projections, scores,
   softmax, weighted values; for MiniLM the output projection lives in the next module, MPNet's
   module includes it) at sequence lengths
   128 and 512: dense vs compressed, queries/keys zero-padded to the value width for SDPA's fused
   kernel (the default) and kept narrow inside SDPA. Runs interleaved, medians, absolute times.

Usage::

    python benchmarks/attention.py                 # MiniLM, writes benchmarks/results/attention.{md,json}
    python benchmarks/attention.py --model mpnet   # MPNet, writes benchmarks/results/attention_mpnet.{md,json}
    python benchmarks/attention.py --quick         # every code path in well under a minute, temp folder
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import drone_hf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    fmt,
    keeps_torch_threads,
    load_average,
    load_minilm,
    machine_info,
    markdown_table,
    results_header,
    write_markdown,
)
from drone_hf.calibration import load_builtin_corpus, tokenize_batches  # noqa: E402
from drone_hf.evaluation import output_fidelity  # noqa: E402
from drone_hf.modules.attention import DroneAttention  # noqa: E402
from drone_hf.modules.low_rank_linear import DroneLinear  # noqa: E402

HELDOUT = "sotu-heldout"


@dataclass(frozen=True)
class ModelSpec:
    """What the studies need to know about one benchmarked model."""

    key: str  # --model value
    title: str
    description: str  # one line for the setup section
    block: str  # the timed module: layer 0's self-attention (dense or its replacement)
    hidden: int
    heads: int
    head_dim: int
    qk_names: tuple[str, str]  # child names of the query/key projections (linear-layer targets)
    block_has_output: bool  # whether the timed block includes the output projection
    results_stem: str  # file stem under benchmarks/results


MODELS = {
    "minilm": ModelSpec(
        "minilm", "all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2 (`BertModel`, 6 layers, 12 heads of width 32, float32, CPU, SDPA attention)",
        "encoder.layer.0.attention.self", 384, 12, 32, ("query", "key"), False, "attention",
    ),
    "mpnet": ModelSpec(
        "mpnet", "all-mpnet-base-v2",
        "all-mpnet-base-v2 (`MPNetModel`, BERT-base size: 12 layers, 12 heads of width 64, relative position "
        "bias, float32, CPU; the compressed modules run SDPA with the bias in the mask)",
        "encoder.layer.0.attention.attn", 768, 12, 64, ("q", "k"), True, "attention_mpnet",
    ),
}


def load_model(spec: ModelSpec):
    """The dense model (float32, eval) and its tokenizer, from local files only."""
    if spec.key == "minilm":
        return load_minilm()
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.assets import mpnet

    path = mpnet()
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class Settings:
    ranks: tuple[int, ...] = (32, 24, 16, 8, 4)  # per-head query/key widths (32 = MiniLM's head width)
    svd_ranks: tuple[int, ...] = (16, 8)  # data-free baseline
    combined_rank: int = 16  # with linear compression of everything else
    combined_ratio: float = 0.5
    lengths: tuple[int, ...] = (128, 512)
    batch_size: int = 8  # sequences per timed call
    repeats: int = 15
    warmup: int = 3
    num_samples: int = 128  # calibration texts (packaged corpus "sotu")
    eval_texts: int = 256
    max_length: int = 128
    seed: int = 0


FULL = Settings()
QUICK = Settings(
    ranks=(32, 8), svd_ranks=(8,), combined_rank=8, batch_size=1, repeats=3, warmup=1, num_samples=16, eval_texts=16
)
#: MPNet (head width 64, BERT-base cost): fewer ranks, half the batch and fewer repeats, to stay within
#: ~15 minutes on the shared 2-core machine. k=32 with param_ratio=0.5 is the same q/k parameter count.
FULL_MPNET = Settings(ranks=(64, 32, 16, 8), svd_ranks=(32,), combined_rank=32, batch_size=4, repeats=9, eval_texts=128)
QUICK_MPNET = Settings(
    ranks=(64, 16), svd_ranks=(16,), combined_rank=16, batch_size=1, repeats=3, warmup=1, num_samples=16,
    eval_texts=16,
)


@dataclass
class Variant:
    """One compressed model: its settings, records and held-out fidelity."""

    label: str
    rank: int | None  # per-head query/key width; None: attention dense
    method: str
    param_ratio: float | None  # linear compression of the other layers; None: attention only
    qk_kept: float  # query+key weight parameters after / before
    calibration_score_error: float | None  # mean over layers of the recorded relative score error
    heldout_relative_error: float = 0.0
    heldout_cosine: float = 0.0
    compress_seconds: float = 0.0
    block: nn.Module | None = field(default=None, repr=False)


def heldout_batches(tokenizer, settings: Settings) -> tuple[list[dict[str, torch.Tensor]], int, int]:
    """A seeded sample of the packaged held-out corpus, tokenized like calibration text."""
    texts = load_builtin_corpus(HELDOUT)
    picked = sorted(random.Random(settings.seed).sample(range(len(texts)), min(settings.eval_texts, len(texts))))
    data = tokenize_batches([texts[i] for i in picked], tokenizer, settings.max_length, 16)
    return data.batches, data.num_texts, data.num_tokens


def compress_variant(dense, tokenizer, settings: Settings, batches, label: str, rank: int | None, method: str = "drone",
                     param_ratio: float | None = None, spec: ModelSpec = MODELS["minilm"]) -> Variant:
    kw: dict = {"param_ratio": param_ratio} if param_ratio is not None else {"target_modules": list(spec.qk_names)}
    if rank is not None:
        kw |= {"compress_attention": True, "attention_rank": rank}
    config = drone_hf.DroneConfig(
        dataset=None, tokenizer=tokenizer, num_samples=settings.num_samples, max_length=settings.max_length,
        seed=settings.seed, method=method, allocation="uniform", **kw,  # the tables compare at equal uniform ranks
    )
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    drone_hf.compress(model, config, show_progress=False)
    seconds = time.perf_counter() - start
    qc = model.config.quantization_config
    errors = [e for e in (qc.attention_errors or {}).values() if e is not None]
    kept = qk_kept(model, spec.qk_names)
    fid = output_fidelity(dense, model, batches)
    variant = Variant(
        label=label, rank=rank, method=method, param_ratio=param_ratio, qk_kept=kept,
        calibration_score_error=sum(errors) / len(errors) if errors else None,
        heldout_relative_error=fid.relative_error, heldout_cosine=fid.cosine, compress_seconds=seconds,
        block=copy.deepcopy(model.get_submodule(spec.block)),
    )
    print(
        f"  {label:32s} compress {seconds:5.1f}s  score err {fmt(variant.calibration_score_error)}  "
        f"held-out err {fid.relative_error:.4f} cos {fid.cosine:.5f}",
        file=sys.stderr, flush=True,
    )
    return variant


def qk_kept(model: nn.Module, names: tuple[str, str] = ("query", "key")) -> float:
    """Query+key weight parameters after / before, whether compressed jointly (attention modules) or
    factored as linear layers (``DroneLinear`` named ``names``); dense layers count as kept."""
    after = before = 0
    for m in model.modules():
        if isinstance(m, DroneAttention):
            after, before = after + m.qk_parameters, before + m.dense_qk_parameters
        elif all(isinstance(getattr(m, n, None), nn.Module) for n in names):  # dense attention: q/k may be factored
            for layer in (getattr(m, n) for n in names):
                factored = isinstance(layer, DroneLinear)
                dense = layer.dense_parameters if factored else layer.weight.numel()
                after, before = after + (layer.factored_parameters if factored else dense), before + dense
    return after / before


def block_macs(length: int, n: int = 384, heads: int = 12, d: int = 32, k: int | None = None,
               output: bool = False) -> int:
    """Multiply-adds of one sequence through the block: q/k/v projections, scores, weighted values
    (and the output projection when ``output``)."""
    k = d if k is None else k
    macs = length * n * heads * (2 * k + d) + length * length * heads * (k + d)
    return macs + (length * n * heads * d if output else 0)


@torch.inference_mode()
def time_blocks(blocks: dict[str, nn.Module], batch: int, length: int, settings: Settings,
                hidden_size: int = 384) -> dict[str, float]:
    """Median seconds per call of each block on the same [batch, length, hidden_size] hidden states,
    runs interleaved across blocks (machine-load drift hits all alike); no padding mask."""
    hidden = torch.randn(batch, length, hidden_size, generator=torch.Generator().manual_seed(settings.seed))
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for i in range(settings.warmup + settings.repeats):
        for name, block in blocks.items():
            start = time.perf_counter()
            block(hidden)
            elapsed = time.perf_counter() - start
            if i >= settings.warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def latency_study(dense, variants: list[Variant], settings: Settings, spec: ModelSpec = MODELS["minilm"]) -> list[dict]:
    """Rows: (length, block, layout, k, median ms, ratio to dense, MACs ratio)."""
    blocks: dict[str, nn.Module] = {"dense": dense.get_submodule(spec.block)}
    ranks: dict[str, int | None] = {"dense": None}
    for v in variants:
        if v.rank is None or v.method != "drone" or v.param_ratio is not None:
            continue
        padded, narrow = copy.deepcopy(v.block), copy.deepcopy(v.block)
        padded.qk_layout, narrow.qk_layout = "padded", "narrow"
        blocks[f"k={v.rank} padded"], blocks[f"k={v.rank} narrow"] = padded, narrow
        ranks[f"k={v.rank} padded"] = ranks[f"k={v.rank} narrow"] = v.rank
    rows = []
    for length in settings.lengths:
        t = time_blocks(blocks, settings.batch_size, length, settings, spec.hidden)
        shape = dict(n=spec.hidden, heads=spec.heads, d=spec.head_dim, output=spec.block_has_output)
        for name, seconds in t.items():
            rows.append({
                "length": length, "block": name, "rank": ranks[name], "median_ms": seconds * 1e3,
                "speedup": t["dense"] / seconds,
                "macs_ratio": block_macs(length, k=ranks[name], **shape) / block_macs(length, **shape),
            })
        print(f"  L={length}: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in t.items()), file=sys.stderr, flush=True)
    return rows


def render(settings: Settings, variants: list[Variant], latency: list[dict], eval_info: tuple[int, int],
           spec: ModelSpec = MODELS["minilm"]) -> str:
    num_texts, num_tokens = eval_info
    q, k = spec.qk_names
    lines = [
        "## Setup",
        "",
        f"- **Model**: {spec.description}.",
        f"- **Calibration**: the packaged corpus `sotu`, `num_samples={settings.num_samples}`, "
        f"`max_length={settings.max_length}`, `seed={settings.seed}`. *Attention only*: `target_modules=[\"{q}\", "
        f"\"{k}\"]`, so nothing but the query-key products changes.",
        f"- **Held-out fidelity**: `drone_hf.evaluation.output_fidelity` against the dense model on {num_texts} "
        f"passages of the packaged `{HELDOUT}` corpus (seeded sample, {num_tokens:,} real tokens, never used for "
        "calibration): *rel. err* `||H_c - H_d||_F / ||H_d||_F` of the last hidden state over real tokens, *cos* "
        "the mean cosine of mean-pooled sentence embeddings.",
        f"- *linear {settings.combined_ratio}*: every encoder linear layer factored at `param_ratio="
        f"{settings.combined_ratio}`, query and key included; *+ attention k={settings.combined_rank}*: the same, but "
        "query and key compressed jointly per head instead (for k = d/2 exactly the same q/k parameter count).",
        "- *score err*: mean over layers of the recorded relative error of the attention scores on the "
        "calibration tokens (`attention_errors`: the DRONE optimum for `drone`); *q/k kept*: query+key weight "
        "parameters after / before.",
        "",
        "## Held-out fidelity",
        "",
    ]
    rows = [
        [v.label, v.rank if v.rank is not None else f"{spec.head_dim} (dense)", v.method, fmt(v.qk_kept, 3),
         fmt(v.calibration_score_error), fmt(v.heldout_relative_error), fmt(v.heldout_cosine, 5),
         f"{v.compress_seconds:.1f}"]
        for v in variants
    ]
    lines.append(markdown_table(
        ["variant", "k", "method", "q/k kept", "score err", "rel. err", "cos", "compress s"], rows, align="lrlrrrrr"
    ))
    lines += [
        "",
        "## Latency of the attention block",
        "",
        "Layer 0's self-attention module on random hidden states of shape "
        f"[{settings.batch_size}, L, {spec.hidden}] (no padding mask), `torch.inference_mode`, "
        f"{settings.repeats} timed runs after {settings.warmup} warm-up runs, all "
        "variants interleaved run by run; median per call. *padded*: queries/keys zero-padded to the value width "
        "before SDPA (the default, `qk_layout=\"auto\"`); *narrow*: `k`-wide inside SDPA. *MACs ratio*: multiply-adds "
        "of projections + scores + weighted values"
        + (" + output projection" if spec.block_has_output else "")
        + " relative to dense (what a kernel exploiting `k` could save).",
        "",
    ]
    lat_rows = [
        [r["length"], r["block"], f"{r['median_ms']:.2f}", f"{r['speedup']:.2f}x", fmt(r["macs_ratio"], 2)]
        for r in latency
    ]
    lines.append(markdown_table(["L", "block", "median ms", "vs dense", "MACs ratio"], lat_rows, align="rlrrr"))
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 ranks, 16 calibration/evaluation texts, "
                   "batch 1, 3 timed runs; writes to a temporary folder unless --out is given")
    p.add_argument("--model", choices=sorted(MODELS), default="minilm",
                   help="minilm (default; results attention.{md,json}) or mpnet (all-mpnet-base-v2 from the local "
                   "asset cache; results attention_mpnet.{md,json})")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {RESULTS_DIR} for a full run, a temp folder with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a CPU shared with other work, oversubscribed threads make "
                   "timings swing by several x)")
    return p.parse_args(argv)


@keeps_torch_threads
def main(argv: list[str] | None = None) -> Path:
    """Run both studies and write ``<stem>.md`` and ``<stem>.json`` (``attention`` for MiniLM,
    ``attention_mpnet`` for MPNet); returns the output folder."""
    argv = list(sys.argv[1:] if argv is None else map(str, argv))
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> Path:
    spec = MODELS[args.model]
    if spec.key == "mpnet":
        settings = QUICK_MPNET if args.quick else FULL_MPNET
    else:
        settings = QUICK if args.quick else FULL
    out = Path(args.out or (tempfile.mkdtemp(prefix="drone-attention-quick-") if args.quick else RESULTS_DIR))
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(__file__, argv)
    started, load_at_start = time.perf_counter(), load_average()
    print(f"{command}\n  writing to {out}", file=sys.stderr, flush=True)

    dense, tokenizer = load_model(spec)
    batches, num_texts, num_tokens = heldout_batches(tokenizer, settings)
    variants = [
        compress_variant(dense, tokenizer, settings, batches, f"attention only, k={k}", k, spec=spec)
        for k in settings.ranks
    ]
    variants += [
        compress_variant(dense, tokenizer, settings, batches, f"attention only, k={k}, svd", k, method="svd",
                         spec=spec)
        for k in settings.svd_ranks
    ]
    ratio = settings.combined_ratio
    variants += [
        compress_variant(dense, tokenizer, settings, batches, f"linear {ratio} (q/k as linear layers)", None,
                         param_ratio=ratio, spec=spec),
        compress_variant(dense, tokenizer, settings, batches, f"linear {ratio} + attention k={settings.combined_rank}",
                         settings.combined_rank, param_ratio=ratio, spec=spec),
    ]
    print("latency of the attention block", file=sys.stderr, flush=True)
    latency = latency_study(dense, variants, settings, spec)

    runtime = time.perf_counter() - started
    info = machine_info([spec.key]) | {"load average (1 min) at start / end": f"{load_at_start} / {load_average()}"}
    header = results_header(f"Attention (query-key) compression: {spec.title}", command, info, runtime)
    body = render(settings, variants, latency, (num_texts, num_tokens), spec)
    write_markdown(out / f"{spec.results_stem}.md", header, body)
    raw = {
        "model": spec.key,
        "settings": asdict(settings),
        "machine": info,
        "variants": [{f.name: getattr(var, f.name) for f in fields(var) if f.name != "block"} for var in variants],
        "latency": latency,
        "heldout": {"texts": num_texts, "tokens": num_tokens},
    }
    (out / f"{spec.results_stem}.json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    print(f"  done in {runtime:.0f} s", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
