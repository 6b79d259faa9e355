"""Calibration inputs: from whatever the user has (texts, a dataset, a file, a built-in corpus) to
length-sorted token batches.

Only real tokens matter to DRONE's statistics; batches carry an attention mask so padding never
enters a Gram matrix, and texts are sorted by length before batching so little padding is computed
at all.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")

#: Built-in corpora shipped inside the package (public domain: U.S. State of the Union addresses,
#: CC0). ``"sotu"`` (1990-2012) is the default calibration text; ``"sotu-heldout"`` (2013-2021)
#: never overlaps it and serves for evaluation.
BUILTIN_CORPORA = ("sotu", "sotu-heldout")
DEFAULT_CORPUS = "sotu"


def load_builtin_corpus(name: str) -> list[str]:
    """The passages of a packaged corpus, one string each."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"Unknown built-in corpus {name!r}: available are {list(BUILTIN_CORPORA)}.")
    blob = resources.files("drone_hf.data.corpora").joinpath(f"{name}.txt.gz").read_bytes()
    return [line for line in gzip.decompress(blob).decode("utf-8").splitlines() if line.strip()]


def _read_text_file(path: Path) -> list[str]:
    """``.txt``: one sample per line; if blank lines separate the text, one sample per paragraph.
    Blank lines before the first or after the last text line separate nothing (an editor's extra
    newline at the end must not turn a one-per-line file into one sample)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    filled = [i for i, line in enumerate(lines) if line.strip()]
    lines = lines[filled[0] : filled[-1] + 1] if filled else []
    if any(not line.strip() for line in lines):
        paragraphs, cur = [], []
        for line in lines + [""]:
            if line.strip():
                cur.append(line.strip())
            elif cur:
                paragraphs.append(" ".join(cur))
                cur = []
        return paragraphs
    return [line for line in lines if line.strip()]


def _read_jsonl(path: Path, column: str) -> list[str]:
    """``.jsonl``: each line a JSON string, or an object with a ``text`` field."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON ({e.msg}); each line must be one JSON value.") from e
            if isinstance(row, str):
                texts.append(row)
            elif isinstance(row, dict) and isinstance(row.get(column), str):
                texts.append(row[column])
            else:
                raise ValueError(
                    f"{path}:{i} has no string field {column!r}; each line must be a JSON string or an "
                    f'object like {{"{column}": "..."}}.'
                )
    return texts


def _texts_from_dataset(ds: Any, column: str) -> list[str]:
    """A ``datasets.Dataset``: the ``text`` column, or its only string column."""
    names = list(getattr(ds, "column_names", None) or [])
    if isinstance(getattr(ds, "column_names", None), dict):  # DatasetDict
        raise ValueError(
            f"Got a DatasetDict with splits {list(ds.keys())}: pass one split, e.g. dataset=ds['train']."
        )
    if column not in names:
        features = getattr(ds, "features", {}) or {}
        string_cols = [n for n in names if getattr(features.get(n), "dtype", None) in ("string", "large_string")]
        if len(string_cols) != 1:
            raise ValueError(
                f"The dataset has no {column!r} column and not exactly one text column (columns: {names}); "
                f"rename the text column to {column!r}, e.g. ds.rename_column('sentence', '{column}')."
            )
        column = string_cols[0]
    return [t for t in ds[column]]


def _is_dataframe(obj: Any) -> bool:
    return type(obj).__name__ == "DataFrame" and hasattr(obj, "columns")


def _column_of(table: Any, column: str) -> Any:
    """The text column of a column mapping (``ds[:n]`` gives ``{"text": [...], ...}``) or a DataFrame:
    ``column``, or the only column of strings. Iterating one would yield its column names."""
    names = [str(n) for n in (table.columns if _is_dataframe(table) else table.keys())]
    if column not in names:
        strings = [n for n in names if all(isinstance(v, str) for v in list(table[n])[:100]) and len(table[n])]
        if len(strings) != 1:
            raise ValueError(
                f"The dataset is a table of columns {names} with no {column!r} column and not exactly one column "
                f"of strings; pass its text column, e.g. dataset=table['sentence'], or name it {column!r}."
            )
        column = strings[0]
    values = table[column]
    return values.tolist() if hasattr(values, "tolist") else values


def _is_iterable_dataset(obj: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(obj, datasets.IterableDataset)


def _row_text(row: Any, column: str) -> Any:
    """One row of a streamed dataset: its ``column`` field, or its only string field."""
    if not isinstance(row, Mapping):
        return row
    if column in row:
        return row[column]
    strings = [k for k, v in row.items() if isinstance(v, str)]
    if len(strings) != 1:
        raise ValueError(
            f"The streamed dataset's rows have no {column!r} field and not exactly one string field (fields: "
            f"{list(row)}); rename the text field, e.g. ds.rename_column('sentence', '{column}')."
        )
    return row[strings[0]]


def _first_texts(stream: Iterable[Any], num_samples: int) -> list[str]:
    """The first ``num_samples`` non-empty texts of a stream, reading no further (a streamed Hub
    dataset is not downloaded to its end). Empty texts do not count, as in a list."""
    texts: list[str] = []
    for item in stream:
        if not isinstance(item, str):
            raise ValueError("An iterable dataset must yield strings.")
        if item.strip():
            texts.append(item)
            if len(texts) == num_samples:
                break
    return texts


def load_texts(dataset: Any, num_samples: int, seed: int = 0, column: str = "text") -> list[str]:
    """Resolve a calibration ``dataset`` to at most ``num_samples`` non-empty texts.

    Accepted forms: ``None`` (the built-in default corpus), a built-in corpus name, a path to a
    ``.txt`` / ``.jsonl`` file, a list of strings, a ``datasets.Dataset``, a column mapping
    (``ds[:n]``) or pandas DataFrame, or a stream (a ``datasets.IterableDataset``, a generator), of
    which the first ``num_samples`` non-empty texts are read. When there are more
    texts than ``num_samples``, a seeded random subset is taken (kept in source order), so runs are
    reproducible.

    Raises:
        ValueError: the dataset is empty, of an unsupported form, or holds no non-empty text.
    """
    if dataset is None:
        dataset = DEFAULT_CORPUS
    if isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        if name in BUILTIN_CORPORA:
            texts = load_builtin_corpus(name)
        else:
            path = Path(name)
            if not path.is_file():
                raise ValueError(
                    f"dataset={name!r} is neither a built-in corpus {list(BUILTIN_CORPORA)} nor an existing "
                    ".txt/.jsonl file. Pass a list of strings, a datasets.Dataset, or a valid path."
                )
            if path.suffix == ".jsonl":
                texts = _read_jsonl(path, column)
            elif path.suffix in (".txt", ".text", ".md"):
                texts = _read_text_file(path)
            else:
                raise ValueError(f"Unsupported calibration file {path.name!r}: use a .txt or .jsonl file.")
    elif _is_iterable_dataset(dataset):
        texts = _first_texts((_row_text(row, column) for row in dataset), num_samples)
    elif (isinstance(dataset, Mapping) and not hasattr(dataset, "column_names")) or _is_dataframe(dataset):
        texts = list(_column_of(dataset, column))  # ds[:n], a pandas DataFrame: columns, not texts
    elif (isinstance(dataset, Sequence) and not isinstance(dataset, (bytes, bytearray))) or isinstance(dataset, Set):
        texts = list(dataset)
        if isinstance(dataset, Set):
            # no order, and a set of strings iterates in hash order, which differs between processes
            # (PYTHONHASHSEED): sorted, every run and every process takes the same texts
            texts.sort(key=lambda t: (not isinstance(t, str), str(t)))
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            where = f"entry {bad[0]}" if not isinstance(dataset, Set) else f"the set holds {texts[bad[0]]!r}, which"
            raise ValueError(
                f"dataset entries must be strings; {where} is {type(texts[bad[0]]).__name__}. "
                "Pass raw texts (the tokenizer is applied by drone-hf)."
            )
    elif hasattr(dataset, "column_names"):
        texts = _texts_from_dataset(dataset, column)
    elif isinstance(dataset, Iterable):
        texts = _first_texts(dataset, num_samples)
    else:
        raise ValueError(
            f"Unsupported dataset of type {type(dataset).__name__}: pass a list of strings, a datasets.Dataset, "
            f"a .txt/.jsonl path, or a built-in corpus name {list(BUILTIN_CORPORA)}."
        )
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(
            "The calibration dataset is empty (no non-empty text). Pass texts representative of the model's "
            f"use, or leave dataset=None for the built-in corpus {DEFAULT_CORPUS!r}."
        )
    return seeded_draw(texts, num_samples, seed)


def seeded_draw(items: Sequence[_T], num_samples: int, seed: int = 0) -> list[_T]:
    """At most ``num_samples`` of ``items``: all of them when there are that few, else a seeded random
    subset kept in source order.

    The one rule every seeded subset follows (:func:`load_texts`, the labelled rows of ``drone-hf
    eval``): the same items, count and seed always give the same subset, on any machine and in any
    process (``random.Random(seed)``, not the global generator), and another seed gives another one.
    Source order is kept so a subset of a file reads in the file's order.
    """
    if len(items) <= num_samples:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), num_samples))
    return [items[i] for i in keep]


@dataclass
class CalibrationBatches:
    """Token batches ready for the model, plus what they count.

    Attributes:
        batches: dicts with ``input_ids`` and ``attention_mask`` ([B, L] each), sorted by length.
        num_texts: texts that produced at least one real token.
        num_tokens: real (unpadded) tokens over all batches.
    """

    batches: list[dict[str, torch.Tensor]]
    num_texts: int
    num_tokens: int


def padding_id(tokenizer: Any) -> int:
    """The id padded positions get. Their value never reaches the statistics (the attention mask
    keeps them out), but the model must be able to embed it: a pad token added to the tokenizer and
    not to the model (``add_special_tokens({"pad_token": "[PAD]"})``, the usual Llama recipe, id =
    the model's vocabulary size) would index past the embedding table. Such an id, at or above the
    tokenizer's base vocabulary, is replaced by EOS, or 0."""
    base = getattr(tokenizer, "vocab_size", None)

    def usable(i: Any) -> bool:
        return isinstance(i, int) and i >= 0 and (not isinstance(base, int) or i < base)

    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if usable(candidate):
            return candidate
    return 0


def tokenize_batches(texts: list[str], tokenizer: Any, max_length: int, batch_size: int) -> CalibrationBatches:
    """Tokenize, drop texts with no content token, sort by length, and pad each batch to its longest.

    Padding is done here, not by the tokenizer, so tokenizers without a pad token (GPT-2, Llama)
    need no change; padded positions are masked out and never reach the statistics.
    """
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_special_tokens_mask=True,
    )
    # Special tokens typed in the text ("[PAD] [PAD]") are not flagged by special_tokens_mask (it marks
    # only the ones the tokenizer adds), so they are compared by id too: a row of padding is no data.
    special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    rows = []
    for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"], strict=True):
        if ids and not all(s or i in special_ids for i, s in zip(ids, special, strict=True)):
            rows.append(ids)
    if not rows:
        raise ValueError(
            f"All {len(texts)} calibration texts tokenize to nothing but special tokens; check that the "
            "texts and the tokenizer match the model (e.g. the text column holds sentences, not ids)."
        )
    rows.sort(key=len)
    pad_id = padding_id(tokenizer)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return CalibrationBatches(batches=batches, num_texts=len(rows), num_tokens=sum(len(r) for r in rows))
