"""Measuring a DRONE model against its dense original, into :class:`~drone_hf.hub.Measurements`.

These are the numbers a model card and ``drone-hf eval`` / ``drone-hf bench`` report: output
fidelity (:func:`drone_hf.evaluation.output_fidelity`), perplexity for causal LMs, accuracy on a
labelled set for classifiers, and interleaved latency (:func:`drone_hf.evaluation.measure_latency`).
Both models always see the same inputs, and latency is only ever reported as a ratio from one
interleaved run, with the device it ran on.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..calibration import tokenize_batches
from ..evaluation import measure_latency, output_fidelity
from ..utils.logging import get_logger
from ..utils.page_faults import PageFaults
from ..utils.positions import usable_positions
from .card import Measurements, describe_device

logger = get_logger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capped_length(max_length: int, *models: nn.Module | None) -> int:
    """``max_length`` capped at the positions every model can embed, with a warning when it is cut (as
    calibration caps it): a longer text indexed past the position table deep inside the forward pass."""
    limits = [limit for m in models if m is not None and (limit := usable_positions(m)) is not None]
    if limits and max_length > min(limits):
        logger.warning(f"max_length={max_length} exceeds the model's {min(limits)} positions; measuring at "
                       f"{min(limits)} tokens per text.")
        return min(limits)
    return max_length


def timing_device(name: str, flag: str = "--device") -> torch.device:
    """The device a speed measurement was asked to run on, refused with the fix when it is not a
    device name, not one timings can be taken on, or this machine has no CUDA device for it (``flag``:
    how the caller's option is spelled in the message). Checked before any model is loaded.

    Only CPU and CUDA are timed: :func:`~drone_hf.evaluation.measure_latency` waits for CUDA kernels
    to finish before reading the clock and :func:`~drone_hf.hub.describe_device` names those two; on
    another accelerator (``mps``, ``xpu``) launches return early, so the times would be wrong, and
    ``meta`` tensors compute nothing.

    Raises:
        ValueError: not a device, a device type other than cpu/cuda, or ``cuda`` without that device.
    """
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{flag} {name!r} is not a device ({e}); use e.g. cpu or cuda") from None
    if device.type == "meta":
        raise ValueError(f"{flag} meta holds no data and runs nothing, so there is no latency to measure; use "
                         f"{flag} cpu or {flag} cuda")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name}: latency is measured on cpu or cuda only (the timer waits only for CUDA "
                         f"kernels, so {device.type} times would be wrong); use {flag} cpu or {flag} cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} cuda, but torch sees no CUDA device here; use {flag} cpu (or a CUDA build of "
                         "torch on a GPU machine)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}, but torch sees {torch.cuda.device_count()} CUDA device(s) here; use "
                         f"{flag} cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"{flag} {name}: there is one CPU device; use {flag} cpu")
    return device


def measure_fidelity(
    dense: nn.Module,
    compressed: nn.Module,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = 128,
    batch_size: int = 8,
    data_name: str | None = None,
) -> Measurements:
    """Hidden-state relative error and mean-pooled embedding cosine of ``compressed`` against ``dense``
    (``max_length`` is capped at the models' positions)."""
    max_length = capped_length(max_length, dense, compressed)
    batches = tokenize_batches(list(texts), tokenizer, max_length, batch_size).batches
    fid = output_fidelity(dense, compressed, batches)
    return Measurements(
        fidelity_cosine=fid.cosine,
        fidelity_relative_error=fid.relative_error,
        fidelity_tokens=fid.num_tokens,
        fidelity_data=data_name,
    )


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], desc: str = "Perplexity") -> float:
    """``exp`` of the mean next-token negative log-likelihood over real (unpadded) tokens.

    Args:
        model: a causal LM returning ``logits`` [batch, seq, vocab].
        batches: right-padded ``input_ids`` / ``attention_mask`` dicts (as from
            :func:`drone_hf.calibration.tokenize_batches`).
    """
    device = _device(model)
    total, count = 0.0, 0
    for batch in hf_logging.tqdm(batches, desc=desc, unit="batch"):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("No token to predict: the texts are empty or one token long; give longer texts.")
    return math.exp(total / count)


def measure_perplexity(
    dense: nn.Module | None,
    compressed: nn.Module,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = 128,
    batch_size: int = 8,
    data_name: str | None = None,
) -> Measurements:
    """Perplexity of both models on the same texts (``dense=None`` measures the compressed one only;
    ``max_length`` is capped at the models' positions)."""
    max_length = capped_length(max_length, dense, compressed)
    batches = tokenize_batches(list(texts), tokenizer, max_length, batch_size).batches
    return Measurements(
        perplexity_dense=None if dense is None else perplexity(dense, batches, "Perplexity (dense)"),
        perplexity_compressed=perplexity(compressed, batches, "Perplexity (compressed)"),
        perplexity_data=data_name,
    )


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, Any]]:
    """``(text, label)`` pairs from a ``.jsonl`` (one object per line) or ``.csv``/``.tsv`` file.

    Every row is checked, not only the first: each must hold a non-empty string text and a non-null
    label (a missing CSV field reads as null; an empty text is refused, where calibration's
    ``load_texts`` drops it, since a labelled row is scored). A UTF-8 byte order mark (Excel's CSV export) is skipped.
    Labels are returned as read (a JSON ``1.0`` stays a float, a CSV field a string):
    :func:`label_ids` turns them into class ids, since that needs the model's label names.

    Raises:
        ValueError: unknown file type, invalid JSON, missing, null or empty columns, or no rows; each message
            names the file, the line where it applies, and the fix.
    """
    return [(text, label) for _, text, label in read_labelled_rows(path, text_column, label_column)]


def read_labelled_rows(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> list[tuple[int, str, Any]]:
    """:func:`read_labelled` with each row's line number first, ``(line, text, label)``: the labels are
    converted later (:func:`label_ids`, once the model's label names are known), and a label refused
    then is named by ``file:line`` as the reader's own errors are."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"labelled dataset {path} does not exist; give a .jsonl or .csv file")
    rows: list[tuple[int, Any]] = []  # (line number, row)
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"labelled dataset {path}:{number} is not valid JSON ({e.msg}); each line must be "
                                 f'one JSON object like {{"{text_column}": "...", "{label_column}": 0}}') from None
    elif path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            rows = [(reader.line_num, row) for row in reader]
    else:
        raise ValueError(f"labelled dataset {path} must be a .jsonl, .csv or .tsv file")
    if not rows:
        raise ValueError(f"labelled dataset {path} has no rows")
    first = rows[0][1]
    missing = [c for c in (text_column, label_column) if not isinstance(first, dict) or c not in first]
    if missing:
        have = sorted(map(str, first)) if isinstance(first, dict) else type(first).__name__
        raise ValueError(f"labelled dataset {path} has no column(s) {missing} (it has {have}); "
                         "name them with --text-column / --label-column")
    out = []
    for number, row in rows:
        where = f"labelled dataset {path}:{number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object; each line must be an object "
                             f'like {{"{text_column}": "...", "{label_column}": 0}}')
        missing = [c for c in (text_column, label_column) if row.get(c) is None]
        if missing:
            what = "missing or null" if path.suffix == ".jsonl" else "missing (the row has fewer fields)"
            raise ValueError(f"{where} has column(s) {missing} {what}; give every row a text and a label, or "
                             "remove the row")
        if not isinstance(row[text_column], str):
            raise ValueError(f"{where}: {text_column!r} is {type(row[text_column]).__name__} "
                             f"{row[text_column]!r}, not a text; give the raw text as a string")
        if not row[text_column].strip():
            # load_texts drops empty calibration texts, but a labelled row is a scored example: its label
            # would be counted against a prediction on nothing, so the file is refused, not edited
            raise ValueError(f"{where}: {text_column!r} is empty; give the row its text, or remove the row")
        out.append((number, row[text_column], row[label_column]))
    return out


#: A number as a CSV field or JSON string spells it: an integer ("1", "-2") and any decimal ("1.0", ".5", "1e0").
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLEANS = ("true", "false")


def _boolean_class(label: bool | str, label2id: dict[str, int], num_labels: Any) -> int | None:
    """The class of a boolean label, else ``None``: the class the model names ``true``/``false`` (in
    any case, as BoolQ-style heads name theirs ``"False"``/``"True"``) when it names exactly one;
    on a 2-class head that names neither, ``False`` is 0 and ``True`` is 1, the convention of
    Python's ``int(bool)``, of ``datasets``' cast of a bool column to int, and of every BoolQ-style
    script (``label = int(answer)``), so such a dataset fine-tunes and evaluates as written."""
    word = str(label).strip().casefold()
    hits = [i for name, i in label2id.items() if name.strip().casefold() == word]
    if len(hits) == 1:
        return hits[0]
    named = any(name.strip().casefold() in _BOOLEANS for name in label2id)
    if num_labels == 2 and not named:
        return int(word == "true")
    return None


def label_ids(labels: Sequence[Any], config: Any, where: Sequence[str] | None = None) -> list[int]:
    """Class ids for ``labels`` given as ids (``1``, ``"1"``, ``1.0``, ``"1.0"``) or as the model's label
    names (``config.label2id``: ``"positive"``), so a labelled file can name its classes either way. A
    string that is a label name is read as that name, even when it is made of digits.

    A whole-number float (``1.0``: pandas writes an int column with a missing value as floats, and a
    JSON writer may do the same) is that integer class; ``0.5``, ``nan`` or ``inf`` is refused, as a
    probability or a regression target is not a class to compare an argmax with.

    Booleans (a JSON ``true``, a CSV ``true``/``False``) are read deliberately, not as whatever
    ``int(True) == 1`` happens to mean: as the class the model names true/false in any case (a
    BoolQ-style head labelled ``"False"``/``"True"``), else, on a 2-class head, ``False`` = 0 and
    ``True`` = 1 (the convention of ``datasets`` and of BoolQ-style scripts). On a head of another size
    a boolean names no class (which of 3 classes is ``True``?), and is refused with the fix.

    Args:
        where: optional, one location per label (``"labelled dataset dev.jsonl:3"``), put in front of
            each message so a refused label is found in its file.

    Raises:
        ValueError: a label that is neither, a non-integral number, a boolean the model does not name,
            or an id outside the model's ``num_labels`` classes (a -1 or 7 for a 3-class head would
            silently never match, or fail inside the loss).
    """
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    num_labels = getattr(config, "num_labels", None)
    names = f"the model's labels {sorted(label2id)}"
    ids = f"class ids 0 to {num_labels - 1}" if isinstance(num_labels, int) and num_labels > 0 else "class ids"
    out = []
    for index, label in enumerate(labels):
        at = f"{where[index]}: " if where is not None else ""
        text = label.strip() if isinstance(label, str) else None
        # a string is the model's label name first: star ratings named "1".."5" are ids 0..4, not 1..5
        if isinstance(label, str) and label in label2id:
            out.append(label2id[label])
        elif isinstance(label, bool) or (text is not None and text.casefold() in _BOOLEANS):
            found = _boolean_class(label, label2id, num_labels)
            if found is None:
                kind = "a JSON boolean" if isinstance(label, bool) else "a boolean word"
                raise ValueError(f"{at}label {label!r} is {kind}, not a class: the model names no class true/false "
                                 f"and has {num_labels} classes (only a 2-class head reads False as 0 and True as "
                                 f"1), so which class it means would be a guess; write {ids} or {names}")
            out.append(found)
        elif isinstance(label, numbers.Integral) or (text is not None and _INTEGER.fullmatch(text)):
            out.append(int(label))
        elif isinstance(label, numbers.Real) or (text is not None and _NUMBER.fullmatch(text)):
            value = float(label)
            if not (math.isfinite(value) and value.is_integer()):
                raise ValueError(f"{at}label {label!r} is not a whole number, so it is no class id (a probability "
                                 f"or a score is not a class); write {ids} or {names}")
            out.append(int(value))  # 1.0 -> 1: the integer class written as a float
        elif str(label) in label2id:
            out.append(label2id[str(label)])
        else:
            raise ValueError(f"{at}label {label!r} is neither an integer class id nor one of {names}")
        if isinstance(num_labels, int) and num_labels > 0 and not 0 <= out[-1] < num_labels:
            raise ValueError(f"{at}label {label!r} is outside the model's {num_labels} classes; give class ids 0 to "
                             f"{num_labels - 1} or {names}")
    return out


@torch.no_grad()
def accuracy(
    model: nn.Module,
    examples: Sequence[tuple[str, Any]],
    tokenizer: Any,
    *,
    max_length: int = 128,
    batch_size: int = 8,
    desc: str = "Accuracy",
) -> float:
    """Fraction of ``examples`` whose argmax logit is the label (an integer id or a name in ``label2id``)."""
    labels = label_ids([label for _, label in examples], model.config)
    texts = [text for text, _ in examples]
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    correct = 0
    for start in hf_logging.tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        rows = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length)["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # right padding, done here so tokenizers without a pad token work
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        pred = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[start : start + batch_size])).sum())
    return correct / len(texts)


def measure_accuracy(
    dense: nn.Module | None, compressed: nn.Module, examples: Sequence[tuple[str, Any]], tokenizer: Any, *,
    max_length: int = 128, batch_size: int = 8, data_name: str | None = None,
) -> Measurements:
    """Accuracy of both classifiers on the same labelled examples (``dense=None``: compressed only;
    ``max_length`` is capped at the models' positions)."""
    max_length = capped_length(max_length, dense, compressed)
    kw = dict(max_length=max_length, batch_size=batch_size)
    return Measurements(
        accuracy_dense=None if dense is None else accuracy(dense, examples, tokenizer, desc="Accuracy (dense)", **kw),
        accuracy_compressed=accuracy(compressed, examples, tokenizer, desc="Accuracy (compressed)", **kw),
        accuracy_data=data_name,
    )


def measure_speed(
    dense: nn.Module,
    compressed: nn.Module,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    repeats: int = 15,
    warmup: int = 3,
    seed: int = 0,
) -> Measurements:
    """Median forward latency of both models on one random ``batch_size x seq_len`` batch, interleaved.

    Token values do not change the cost of a forward pass, so seeded random ids (no padding) stand
    in for text; both models run on their own device (which must be the same one).

    Raises:
        ValueError: a count below 1 (``warmup`` below 0), the models sit on different devices, or
            ``seq_len`` exceeds the model's positions.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("repeats", repeats, 1),
                               ("warmup", warmup, 0)):
        # a negative warmup silently ate timed runs (the loop counts warmup + repeats passes)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    device = _device(compressed)
    if _device(dense) != device:
        raise ValueError(f"dense and compressed models are on {_device(dense)} and {device}; put both on one device")
    limit = usable_positions(compressed)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds the model's {limit} positions; use a shorter sequence")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, compressed.config.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with PageFaults() as faults:
        times = measure_latency(
            {"dense": dense, "compressed": compressed}, inputs, repeats=repeats,
            warmup=warmup,
        )
    return Measurements(
        dense_latency_ms=times["dense"] * 1e3,
        compressed_latency_ms=times["compressed"] * 1e3,
        latency_device=describe_device(device),
        latency_inputs=f"batch {batch_size} x {seq_len} tokens",
        latency_page_faults=faults.per_pass(2 * (repeats + warmup)),
    )
