"""DroneConfig: defaults, validation (each error names its field), serialisation and copying."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
from transformers.utils.quantization_config import QuantizationConfigMixin

from drone_hf.config import DEFAULT_DAMP, FORMAT_VERSION, QUANT_METHOD, DroneConfig


class FakeTokenizer:
    """Stands in for a live tokenizer object (never serialisable)."""

    def __call__(self, *args, **kwargs):  # pragma: no cover - never called here
        raise AssertionError


def test_defaults() -> None:
    c = DroneConfig()
    assert isinstance(c, QuantizationConfigMixin)
    assert c.quant_method == QUANT_METHOD == "drone"
    assert c.param_ratio == 0.5
    assert c.dataset is None and c.tokenizer is None
    assert (c.num_samples, c.max_length, c.batch_size) == (128, 128, 8)
    assert c.target_modules is None and c.modules_to_not_convert is None
    assert c.damp == DEFAULT_DAMP == 0.0
    assert c.method == "drone" and c.seed == 0 and c.ranks is None
    assert c.relative_errors is None and c.calibration is None
    assert c.format_version == FORMAT_VERSION == 1
    assert not c.is_compressed


def test_fields_are_stored_and_containers_copied() -> None:
    targets, excluded, ranks = ("query", "value"), ["pooler"], {"encoder.layer.0.attention.self.query": 4}
    c = DroneConfig(
        param_ratio=0.25, num_samples=16, max_length=64, batch_size=2, target_modules=targets,
        modules_to_not_convert=excluded, damp=0.01, method="svd", seed=7, ranks=ranks,
    )
    assert c.target_modules == ["query", "value"] and isinstance(c.target_modules, list)
    assert c.modules_to_not_convert == ["pooler"] and c.modules_to_not_convert is not excluded
    assert c.ranks == ranks and c.ranks is not ranks
    excluded.append("classifier")
    ranks["x"] = 1
    assert c.modules_to_not_convert == ["pooler"] and "x" not in c.ranks
    assert (c.param_ratio, c.num_samples, c.max_length, c.batch_size, c.damp, c.method, c.seed) == (
        0.25, 16, 64, 2, 0.01, "svd", 7,
    )


def test_regex_target_modules_stays_a_string() -> None:
    c = DroneConfig(target_modules=r".*\.(query|value)")
    assert c.target_modules == r".*\.(query|value)"


def test_boundary_values_are_accepted() -> None:
    DroneConfig(param_ratio=1)
    DroneConfig(param_ratio=1.0)
    DroneConfig(param_ratio=1e-6)
    DroneConfig(num_samples=1, max_length=1, batch_size=1, damp=0, seed=-3)
    DroneConfig(damp=1e6)


# --------------------------------------------------------------------------------------------------
# validation: every error names its field
# --------------------------------------------------------------------------------------------------
INVALID = [
    ({"param_ratio": 0}, "param_ratio"),
    ({"param_ratio": 0.0}, "param_ratio"),
    ({"param_ratio": -0.5}, "param_ratio"),
    ({"param_ratio": 1.5}, "param_ratio"),
    ({"param_ratio": float("nan")}, "param_ratio"),
    ({"param_ratio": float("inf")}, "param_ratio"),
    ({"param_ratio": True}, "param_ratio"),
    ({"param_ratio": "0.5"}, "param_ratio"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": -1}, "num_samples"),
    ({"num_samples": 2.0}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"max_length": 0}, "max_length"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": "8"}, "batch_size"),
    ({"seed": 1.5}, "seed"),
    ({"seed": None}, "seed"),
    ({"seed": False}, "seed"),
    ({"damp": -1}, "damp"),
    ({"damp": -1e-9}, "damp"),
    ({"damp": float("nan")}, "damp"),
    ({"damp": float("inf")}, "damp"),
    ({"damp": True}, "damp"),
    ({"damp": "0.1"}, "damp"),
    ({"method": "foo"}, "method"),
    ({"method": "DRONE"}, "method"),
    ({"method": None}, "method"),
    ({"target_modules": "query("}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": ["query", ""]}, "target_modules"),
    ({"target_modules": ["query", 3]}, "target_modules"),
    ({"target_modules": {"query", "value"}}, "target_modules"),  # a set would not serialise
    ({"target_modules": 5}, "target_modules"),
    ({"modules_to_not_convert": [""]}, "modules_to_not_convert"),
    ({"modules_to_not_convert": [None]}, "modules_to_not_convert"),
    ({"modules_to_not_convert": "pooler"}, "modules_to_not_convert"),  # not split into characters
    ({"modules_to_not_convert": {"pooler"}}, "modules_to_not_convert"),
    ({"ranks": {"[bad": 2}}, "ranks"),
    ({"ranks": {"encoder.layer.0.attention.self.query": 0}}, "ranks"),
    ({"ranks": {"query": -1}}, "ranks"),
    ({"ranks": {"query": 2.0}}, "ranks"),
    ({"ranks": {"query": True}}, "ranks"),
    ({"ranks": {"": 2}}, "ranks"),
    ({"ranks": {3: 2}}, "ranks"),
    ({"format_version": FORMAT_VERSION + 1}, "format version"),
    ({"format_version": "1"}, "format version"),
    ({"quant_method": "gptq"}, "quant_method"),
    ({"unknown_knob": 1}, "unknown_knob"),
]


@pytest.mark.parametrize("kwargs, field", INVALID, ids=[f"{k}" for k, _ in INVALID])
def test_invalid_values_raise_naming_the_field(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DroneConfig(**kwargs)


def test_error_messages_show_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"param_ratio=1\.5 must be a number in \(0, 1\]"):
        DroneConfig(param_ratio=1.5)
    with pytest.raises(
        ValueError,
        match=r"method='foo' is not supported: use one of \['drone', 'svd', 'asvd', 'fwsvd', 'svdllm', 'drone-kfac'\]",
    ):
        DroneConfig(method="foo")
    with pytest.raises(ValueError, match=r"ranks\['q'\]=0 must be a positive integer"):
        DroneConfig(ranks={"q": 0})
    with pytest.raises(ValueError, match=r"target_modules entry 'query\(' is not a valid regular expression"):
        DroneConfig(target_modules="query(")
    with pytest.raises(ValueError, match=r"Unknown DroneConfig field\(s\) \['a', 'b'\]"):
        DroneConfig(b=1, a=2)


def test_unknown_key_in_from_dict_raises() -> None:
    d = DroneConfig().to_dict()
    d["future_field"] = True
    with pytest.raises(ValueError, match="future_field"):
        DroneConfig.from_dict(d)


def test_newer_format_version_in_from_dict_raises() -> None:
    d = DroneConfig().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}.*newer"):
        DroneConfig.from_dict(d)


def test_post_init_revalidates_after_mutation() -> None:
    c = DroneConfig()
    c.param_ratio = 2.0
    with pytest.raises(ValueError, match="param_ratio"):
        c.post_init()
    c.param_ratio = 0.5
    c.modules_to_not_convert = "pooler"
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        c.post_init()
    c.modules_to_not_convert = ("pooler",)  # tuples are fine (as in __init__)
    c.target_modules = ("query",)
    c.post_init()


# --------------------------------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------------------------------
def compressed_config() -> DroneConfig:
    return DroneConfig(
        param_ratio=0.3, dataset="sotu", tokenizer="some/tokenizer-path", num_samples=32, target_modules=["query"],
        modules_to_not_convert=["encoder.layer.1"], damp=0.05, seed=3,
        ranks={"encoder.layer.0.attention.self.query": 4},
        relative_errors={"encoder.layer.0.attention.self.query": 0.125},
        calibration={"dataset": "sotu", "num_texts": 32, "num_tokens": 900, "max_length": 128},
    )


@pytest.mark.parametrize("make", [DroneConfig, compressed_config])
def test_from_dict_round_trip(make) -> None:
    c = make()
    d = c.to_dict()
    back = DroneConfig.from_dict(d)
    assert back == c
    assert back.to_dict() == d
    assert json.loads(json.dumps(d)) == d  # JSON-native


def test_to_dict_contents() -> None:
    d = compressed_config().to_dict()
    assert d["quant_method"] == "drone"
    assert d["dataset"] == "sotu" and d["tokenizer"] == "some/tokenizer-path"
    assert d["ranks"] == {"encoder.layer.0.attention.self.query": 4}
    assert d["relative_errors"] == {"encoder.layer.0.attention.self.query": 0.125}
    assert d["calibration"]["num_tokens"] == 900
    assert d["format_version"] == FORMAT_VERSION
    # every setting and record is written (newer releases may add more)
    assert set(d) >= {
        "quant_method", "param_ratio", "dataset", "tokenizer", "num_samples", "max_length", "batch_size",
        "target_modules", "modules_to_not_convert", "damp", "method", "seed", "ranks", "relative_errors",
        "calibration", "format_version",
    }
    assert (d["param_ratio"], d["num_samples"], d["damp"], d["seed"]) == (0.3, 32, 0.05, 3)
    assert d["target_modules"] == ["query"] and d["modules_to_not_convert"] == ["encoder.layer.1"]


def test_to_dict_is_a_deep_copy() -> None:
    c = compressed_config()
    d = c.to_dict()
    d["ranks"]["encoder.layer.0.attention.self.query"] = 99
    d["target_modules"].append("key")
    assert c.ranks["encoder.layer.0.attention.self.query"] == 4
    assert c.target_modules == ["query"]


def test_is_compressed_follows_the_error_record() -> None:
    assert compressed_config().is_compressed
    assert not DroneConfig(ranks={"q": 2}).is_compressed


def test_configs_with_different_ranks_compare_unequal() -> None:
    a = DroneConfig(ranks={"encoder.layer.0.attention.self.query": 4})
    b = DroneConfig(ranks={"encoder.layer.0.attention.self.query": 5})
    c = DroneConfig(ranks={"encoder.layer.0.attention.self.query": 4})
    assert a != b
    assert a == c
    assert DroneConfig(param_ratio=0.4) != DroneConfig(param_ratio=0.5)
    assert DroneConfig() != {"quant_method": "drone"}
    with pytest.raises(TypeError):
        hash(a)


@pytest.mark.parametrize(
    "dataset",
    [
        ["some text", "more text"],
        ("a", "b"),
        datasets.Dataset.from_dict({"text": ["x", "y"]}),
        iter(["lazy"]),
    ],
    ids=["list", "tuple", "Dataset", "iterator"],
)
def test_runtime_objects_never_reach_to_dict(dataset) -> None:
    tokenizer = FakeTokenizer()
    c = DroneConfig(dataset=dataset, tokenizer=tokenizer)
    assert c.dataset is dataset and c.tokenizer is tokenizer  # kept for the compression run
    d = c.to_dict()
    assert d["dataset"] is None and d["tokenizer"] is None

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, list):
            for v in value:
                yield from walk(v)
        else:
            yield value

    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in walk(d))
    text = c.to_json_string()
    assert json.loads(text)["dataset"] is None
    assert "some text" not in text and "lazy" not in text
    assert "drone" in repr(c)


def test_string_dataset_and_tokenizer_are_written() -> None:
    d = DroneConfig(dataset="calib.jsonl", tokenizer="bert-base-uncased").to_dict()
    assert d["dataset"] == "calib.jsonl" and d["tokenizer"] == "bert-base-uncased"


def test_path_dataset_and_tokenizer_are_written_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    c = DroneConfig(dataset=path, tokenizer=tmp_path)
    assert c.dataset is path  # the object itself is kept for loading
    d = c.to_dict()
    assert d["dataset"] == str(path) and d["tokenizer"] == str(tmp_path)
    assert json.loads(c.to_json_string())["dataset"] == str(path)
    assert DroneConfig.from_dict(d) == c


def test_to_json_file_round_trip(tmp_path: Path) -> None:
    c = compressed_config()
    c.dataset = ["live", "texts"]
    out = tmp_path / "q.json"
    c.to_json_file(out)
    back = DroneConfig.from_dict(json.loads(out.read_text()))
    assert back.dataset is None
    assert back.ranks == c.ranks and back.relative_errors == c.relative_errors


# --------------------------------------------------------------------------------------------------
# copying
# --------------------------------------------------------------------------------------------------
def test_deepcopy_shares_runtime_objects_and_copies_the_rest() -> None:
    dataset = datasets.Dataset.from_dict({"text": ["x", "y"]})
    tokenizer = FakeTokenizer()
    c = DroneConfig(
        dataset=dataset,
        tokenizer=tokenizer,
        ranks={"q": 2},
        target_modules=["query"],
        modules_to_not_convert=["pooler"],
    )
    c.relative_errors = {"q": 0.5}
    dup = copy.deepcopy(c)
    assert type(dup) is DroneConfig
    assert dup.dataset is dataset and dup.tokenizer is tokenizer
    assert dup.ranks == {"q": 2} and dup.ranks is not c.ranks
    assert dup.target_modules is not c.target_modules
    assert dup.relative_errors is not c.relative_errors
    dup.ranks["q"] = 3
    dup.modules_to_not_convert.append("classifier")
    assert c.ranks == {"q": 2} and c.modules_to_not_convert == ["pooler"]
    assert dup != c


def test_deepcopy_inside_a_container_keeps_sharing() -> None:
    texts = ["a", "b"]
    c = DroneConfig(dataset=texts)
    kwargs = copy.deepcopy({"quantization_config": c, "other": [1]})
    assert kwargs["quantization_config"].dataset is texts
    assert kwargs["quantization_config"] == c


def test_numpy_scalars_are_taken_as_the_numbers_they_hold():
    """Budgets from a NumPy sweep: np.float32 / np.int64 are not Python float / int subclasses, and were
    refused as "not a number" (np.float64 was accepted); the record must also serialise to JSON."""
    import json

    import numpy as np

    cfg = DroneConfig(param_ratio=np.float32(0.5), num_samples=np.int64(8), batch_size=np.int32(2),
                      damp=np.float32(0.25), rank_grid=[np.int64(4), 8], latency_shape=(np.int64(2), 16),
                      seed=np.int64(3))
    assert (cfg.param_ratio, cfg.num_samples, cfg.batch_size, cfg.damp, cfg.seed) == (0.5, 8, 2, 0.25, 3)
    assert type(cfg.param_ratio) is float and type(cfg.num_samples) is int and type(cfg.rank_grid[0]) is int
    assert cfg.latency_shape == [2, 16] and type(cfg.latency_shape[0]) is int
    assert json.loads(json.dumps(cfg.to_dict()))["param_ratio"] == 0.5
    assert DroneConfig(max_loss=np.float32(0.125)).max_loss == 0.125
    attn = DroneConfig(compress_attention=True, attention_rank=np.int64(4), ranks={"query": np.int64(8)})
    assert type(attn.attention_rank) is int and type(attn.ranks["query"]) is int
    assert DroneConfig(compress_attention=True, attention_rank=np.float32(0.5)).attention_rank == 0.5
    arrays = DroneConfig(sequential=np.bool_(True), compress_attention=np.bool_(False),
                         latency_shape=np.array([2, 16]), rank_grid=np.arange(4, 12, 4))
    assert arrays.sequential is True and arrays.compress_attention is False
    assert arrays.latency_shape == [2, 16] and arrays.rank_grid == [4, 8] and type(arrays.rank_grid[0]) is int
    with pytest.raises(ValueError, match="param_ratio"):
        DroneConfig(param_ratio=np.float32(1.5))  # still validated after the conversion
    with pytest.raises(ValueError, match="num_samples"):
        DroneConfig(num_samples=np.float64(8.0))  # a float is not a count, NumPy or not
