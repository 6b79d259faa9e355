"""The fine-tuning-after-compression recipe: compress -> distil -> evaluate -> save (-> push).

One function per step, all on the stock ``transformers.Trainer``, for two tasks:

* ``"sequence-classification"``: a fine-tuned classifier and labelled text (``.jsonl``/``.csv``/
  ``.tsv`` with text and label columns); metric: accuracy through ``evaluate``.
* ``"causal-lm"``: a causal LM and plain text (a ``.txt``/``.jsonl`` file or a packaged corpus; by
  default ``sotu`` to train and ``sotu-heldout`` to evaluate); metric: perplexity, the exponential
  of the token-weighted next-token loss on the evaluation text (``evaluate``'s ``perplexity``
  metric loads its model from the Hub by id, so it is computed here).

The dense model is the teacher; a deep copy is compressed (calibrated on the *training* text, the
data the model will serve) and distilled. ``examples/finetune_after_compression.py`` is the
command line; ``benchmarks/finetune.py`` runs the same steps on the real MiniLM.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import load_texts
from ..compress import compress
from ..config import DroneConfig
from .callbacks import CompressionStatsCallback, SelectTrainableCallback, add_callbacks
from .distill import DistillationLoss
from .metrics import METRICS_DIR

#: Tasks the recipe runs.
RECIPE_TASKS = ("sequence-classification", "causal-lm")

#: What :func:`run_recipe` writes next to the checkpoint: its returned metrics, as JSON.
RESULTS_FILE = "recipe_results.json"


def load_metric(name: str = "accuracy") -> Any:
    """``evaluate.load(name)``, from drone-hf's packaged copy when it ships one (offline-safe)."""
    import evaluate

    local = METRICS_DIR / f"{name}.py"
    return evaluate.load(str(local)) if local.is_file() else evaluate.load(name)


# --- data ----------------------------------------------------------------------------------------


def load_labelled(path: str | Path, text_column: str = "text", label_column: str = "label") -> Any:
    """A labelled ``.jsonl``/``.csv``/``.tsv`` file as a ``datasets.Dataset`` with ``text``/``label``.

    Raises:
        ValueError: unsupported extension or missing columns (the message lists the columns found).
    """
    from datasets import load_dataset

    path = Path(path)
    kinds = {".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"})}
    if path.suffix not in kinds or not path.is_file():
        raise ValueError(f"Labelled data must be an existing .jsonl, .csv or .tsv file; got {str(path)!r}.")
    builder, extra = kinds[path.suffix]
    ds = load_dataset(builder, data_files=str(path), split="train", **extra)
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path.name} has no column(s) {missing} (columns: {ds.column_names}); pass --text-column/--label-column."
        )
    ds = ds.select_columns([text_column, label_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds.rename_column(label_column, "label") if label_column != "label" else ds


def split_dataset(ds: Any, eval_fraction: float, seed: int) -> tuple[Any, Any]:
    """A seeded train / evaluation split (``eval_fraction`` of the rows to evaluation)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be in (0, 1).")
    parts = ds.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def tokenize_classification(ds: Any, tokenizer: Any, max_length: int, config: Any = None) -> Any:
    """``text``/``label`` rows -> ``input_ids``/``attention_mask``/``labels`` (padding left to the collator).

    With the model's ``config``, labels may be its class names (``config.label2id``), as
    ``drone-hf eval`` accepts them; they become class ids here."""
    from ..hub.measure import label_ids

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        labels = batch["label"] if config is None else label_ids(batch["label"], config)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def tokenize_lm(texts: list[str], tokenizer: Any, block_size: int) -> Any:
    """Plain texts -> fixed-length next-token blocks (texts joined with EOS, cut every ``block_size``)."""
    from datasets import Dataset

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(
            f"The text holds fewer than block_size={block_size} tokens; give more text or a smaller block."
        )
    return Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}
    )


# --- evaluation ----------------------------------------------------------------------------------


def _batches(ds: Any, tokenizer: Any, batch_size: int) -> Any:
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    for start in range(0, len(ds), batch_size):
        yield collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])


@torch.no_grad()
def evaluate_classifier(model: nn.Module, ds: Any, tokenizer: Any, batch_size: int = 64) -> float:
    """Accuracy of ``model`` on a tokenized classification dataset, through ``evaluate``."""
    metric = load_metric("accuracy")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for batch in _batches(ds, tokenizer, batch_size):
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        metric.add_batch(predictions=logits.argmax(-1).cpu().tolist(), references=labels.tolist())
    model.train(was_training)
    return float(metric.compute()["accuracy"])


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, ds: Any, tokenizer: Any, batch_size: int = 8) -> float:
    """Perplexity: ``exp`` of the mean next-token cross-entropy over every predicted token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for batch in _batches(ds, tokenizer, batch_size):
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        target = labels[:, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep], reduction="sum")
        nll, tokens = nll + float(loss), tokens + int(keep.sum())
    model.train(was_training)
    return math.exp(nll / max(tokens, 1))


# --- the recipe ----------------------------------------------------------------------------------


@dataclass
class RecipeConfig:
    """Settings of :func:`run_recipe` (the command line exposes each as ``--flag``).

    ``train`` chooses what fine-tunes (see :func:`~drone_hf.training.set_trainable`); ``alpha``,
    ``temperature`` and ``hidden_weight`` are the distillation weights (``alpha=0``: no teacher).
    """

    task: str
    model: str
    output_dir: str
    train_file: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.2
    text_column: str = "text"
    label_column: str = "label"
    param_ratio: float = 0.5
    calibration_samples: int = 128
    max_length: int = 128
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-4
    batch_size: int = 16
    train: str = "all"
    freeze_heads: bool = False
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    seed: int = 0
    report_to: str = "none"
    logging_steps: int = 50
    push_to_hub: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in RECIPE_TASKS:
            raise ValueError(f"task={self.task!r} is not a recipe task: use one of {list(RECIPE_TASKS)}.")
        if self.task == "sequence-classification" and not self.train_file:
            raise ValueError("sequence-classification needs labelled data: pass train_file (a .jsonl/.csv/.tsv file).")


def _load(cfg: RecipeConfig) -> tuple[nn.Module, Any, Any, Any, list[str]]:
    """Dense model, tokenizer, tokenized train/eval sets and the training texts (for calibration)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.task == "sequence-classification":
        train = load_labelled(cfg.train_file, cfg.text_column, cfg.label_column)  # type: ignore[arg-type]
        if cfg.eval_file:
            evals = load_labelled(cfg.eval_file, cfg.text_column, cfg.label_column)
        else:
            train, evals = split_dataset(train, cfg.eval_fraction, cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, dtype=torch.float32)
        texts = list(train["text"])
        return (
            model,
            tokenizer,
            tokenize_classification(train, tokenizer, cfg.max_length, model.config),
            tokenize_classification(evals, tokenizer, cfg.max_length, model.config),
            texts,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = load_texts(cfg.train_file or "sotu", 10**9, cfg.seed)
    eval_texts = load_texts(cfg.eval_file or "sotu-heldout", 10**9, cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    return (
        model,
        tokenizer,
        tokenize_lm(texts, tokenizer, cfg.max_length),
        tokenize_lm(eval_texts, tokenizer, cfg.max_length),
        texts,
    )


def _metric(cfg: RecipeConfig, model: nn.Module, ds: Any, tokenizer: Any) -> float:
    if cfg.task == "sequence-classification":
        return evaluate_classifier(model, ds, tokenizer)
    return evaluate_perplexity(model, ds, tokenizer)


def training_arguments(cfg: RecipeConfig) -> Any:
    """The recipe's ``TrainingArguments``: its defaults, overridden by ``cfg.extra`` (any
    ``TrainingArguments`` field, those the recipe sets included: ``save_strategy``, ``use_cpu``...
    were a duplicate-keyword TypeError when given there)."""
    from transformers import TrainingArguments

    return TrainingArguments(**({
        "output_dir": str(Path(cfg.output_dir) / "trainer"),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "no",
        "report_to": cfg.report_to,
        "use_cpu": not torch.cuda.is_available(),
    } | cfg.extra))


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    """Compress a copy of the dense model, distil it with ``Trainer``, evaluate, save (and push).

    Returns the metric (accuracy or perplexity) of the dense model, of the compressed model before
    and after fine-tuning, the compression statistics and the output folder, which holds a DRONE
    checkpoint (reloads factored with ``from_pretrained`` once ``drone_hf`` is imported), the
    tokenizer and these results as ``recipe_results.json``.
    """
    from transformers import DataCollatorWithPadding, Trainer

    from .stats import compression_stats

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dense, tokenizer, train_ds, eval_ds, texts = _load(cfg)
    dense.eval()
    metric_name = "accuracy" if cfg.task == "sequence-classification" else "perplexity"
    results: dict[str, Any] = {"metric": metric_name, "dense": _metric(cfg, dense, eval_ds, tokenizer)}

    drone = DroneConfig(
        param_ratio=cfg.param_ratio,
        dataset=texts,
        tokenizer=tokenizer,
        num_samples=cfg.calibration_samples,
        max_length=cfg.max_length,
        seed=cfg.seed,
    )
    student = compress(copy.deepcopy(dense), drone, show_progress=False)
    results["compressed_before"] = _metric(cfg, student, eval_ds, tokenizer)

    args = training_arguments(cfg)
    loss = None
    if cfg.alpha > 0 or cfg.hidden_weight > 0:
        loss = DistillationLoss(
            dense, temperature=cfg.temperature, alpha=cfg.alpha, hidden_weight=cfg.hidden_weight
        ).attach(student)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=student,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_loss_func=loss,
    )
    add_callbacks(trainer, SelectTrainableCallback(cfg.train, cfg.freeze_heads), CompressionStatsCallback())
    trainer.train()
    if loss is not None:
        loss.detach()
    results["compressed_after"] = _metric(cfg, student, eval_ds, tokenizer)
    results["stats"] = compression_stats(student)
    out = Path(cfg.output_dir)
    trainer.save_model(str(out))  # a DRONE checkpoint: factors + ranks in config.json
    tokenizer.save_pretrained(str(out))
    results["output_dir"] = str(out)
    results["config"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    if cfg.push_to_hub:
        from ..hub import push_to_hub

        results["pushed"] = str(push_to_hub(student, cfg.push_to_hub, tokenizer=tokenizer))
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return results
