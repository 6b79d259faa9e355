"""Tiny models and a Trainer factory shared by the fine-tuning tests (``drone_hf.training``).

Tiny BERT classifiers with dropout off, so a training step's loss is a deterministic function of
the weights and tests can compare it with a hand computation.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from tiny_models import CALIBRATION_TEXTS, bert_config  # noqa: E402

import drone_hf  # noqa: E402

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def dense_classifier(seed: int = 0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(**(NO_DROPOUT | kw))).eval()


def compressed_classifier(tok, seed: int = 0, param_ratio: float = 0.5, **kw):
    """(dense teacher, compressed copy) of a tiny BERT classifier, calibrated on the packaged texts."""
    dense = dense_classifier(seed, **kw)
    cfg = drone_hf.DroneConfig(param_ratio=param_ratio, dataset=CALIBRATION_TEXTS, tokenizer=tok)
    return dense, drone_hf.compress(copy.deepcopy(dense), cfg, show_progress=False)


def classification_dataset(tok, n: int = 16, num_labels: int = 3):
    from datasets import Dataset

    texts = [CALIBRATION_TEXTS[i % len(CALIBRATION_TEXTS)] + f" Item {i}." for i in range(n)]
    enc = tok(texts, truncation=True, max_length=32)
    return Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [i % num_labels for i in range(n)],
        }
    )


def training_args(tmp_path, **overrides):
    """CPU, batch 8, 2 steps, lr 1e-2 (so a step visibly moves every trained weight), log every step."""
    from transformers import TrainingArguments

    settings = (
        dict(
            output_dir=str(tmp_path / "trainer"),
            per_device_train_batch_size=8,
            max_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        | overrides
    )
    return TrainingArguments(**settings)


def make_trainer(model, tok, train_ds, tmp_path, callbacks=(), **args):
    """A stock Trainer on CPU, no saving, no reporting; ``args`` override :func:`training_args`."""
    from transformers import DataCollatorWithPadding, Trainer

    compute_loss_func = args.pop("compute_loss_func", None)
    return Trainer(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
        callbacks=list(callbacks),
        compute_loss_func=compute_loss_func,
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
