"""The transformers plugin path: compress during from_pretrained, save, reload, dequantize."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, CALIBRATION_TEXTS, minilm_path, sample_inputs, save_tiny
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertModel,
)

import drone_hf
from drone_hf import DroneConfig, DroneLinear

AUTO_FOR = {
    "bert": AutoModel,
    "bert-seq-cls": AutoModelForSequenceClassification,
    "gpt2-lm": AutoModelForCausalLM,
    "llama-gqa-lm": AutoModelForCausalLM,
}


def small_config(**kw) -> DroneConfig:
    return DroneConfig(**({"param_ratio": 0.5, "dataset": CALIBRATION_TEXTS, "num_samples": 8} | kw))


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def drone_layers(model: nn.Module) -> dict[str, DroneLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DroneLinear)}


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# Fresh-process reload: prints nothing but writes the outputs of the reloaded model to a file.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    import drone_hf
    folder, auto_name, inputs_file, out_file = sys.argv[1:5]
    model = getattr(transformers, auto_name).from_pretrained(folder)
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        out = model(**inputs)
    out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(("query", "c_attn", "q_proj"))})
    torch.save({"out": out, "kinds": kinds, "n_drone": len(drone_hf.report(model))}, out_file)
    """
)


def reload_in_fresh_process(folder: Path, auto_name: str, inputs: dict, tmp_path: Path) -> dict:
    inputs_file, out_file = tmp_path / "inputs.pt", tmp_path / "reloaded.pt"
    torch.save(dict(inputs), inputs_file)
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(folder), auto_name, str(inputs_file), str(out_file)],
        check=True,
        capture_output=True,
    )
    return torch.load(out_file)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip_in_fresh_process(arch, tmp_path):
    src = save_tiny(arch, tmp_path / "dense")
    auto = AUTO_FOR[arch]
    model = auto.from_pretrained(src, drone_config=small_config())
    layers = drone_layers(model)
    assert layers, "nothing was factored"
    inputs = sample_inputs()
    expected = outputs(model, inputs)

    out = tmp_path / "drone"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "drone"
    assert saved["ranks"] == {drone_hf.modules.canonical_name(model, n): m.rank for n, m in layers.items()}
    assert "dataset" in saved and saved["dataset"] is None  # the list of texts never reaches config.json

    got = reload_in_fresh_process(out, auto.__name__, inputs, tmp_path)
    assert got["n_drone"] == len(layers)
    assert got["kinds"] == ["DroneLinear"]
    torch.testing.assert_close(got["out"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reload_has_no_missing_or_unexpected_keys(arch, tmp_path):
    src = save_tiny(arch, tmp_path / "dense")
    auto = AUTO_FOR[arch]
    auto.from_pretrained(src, drone_config=small_config()).save_pretrained(tmp_path / "drone")
    model, info = auto.from_pretrained(tmp_path / "drone", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert drone_layers(model)


def test_drone_config_and_quantization_config_give_the_same_model(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    a = AutoModel.from_pretrained(src, drone_config=small_config())
    b = AutoModel.from_pretrained(src, quantization_config=small_config())
    c = BertModel.from_pretrained(src, drone_config=small_config())  # concrete class too
    d = AutoModel.from_pretrained(src, drone_config=small_config().to_dict() | {"dataset": CALIBRATION_TEXTS})
    inputs = sample_inputs()
    for other in (b, c, d):
        torch.testing.assert_close(outputs(other, inputs), outputs(a, inputs), rtol=0, atol=0)


def test_drone_config_with_quantization_config_is_refused(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    with pytest.raises(ValueError, match="either drone_config= or quantization_config="):
        AutoModel.from_pretrained(src, drone_config=small_config(), quantization_config=small_config())


def test_users_config_object_is_not_mutated(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    cfg = small_config(ranks={r".*query": 4})
    before = cfg.to_dict()
    model = BertModel.from_pretrained(src, drone_config=cfg)
    assert cfg.to_dict() == before
    assert model.config.quantization_config.ranks["encoder.layer.0.attention.self.query"] == 4
    assert model.config.quantization_config.is_compressed


def test_task_checkpoint_reloads_as_base_model_and_back(tmp_path):
    src = save_tiny("bert-seq-cls", tmp_path / "dense")
    task = BertForSequenceClassification.from_pretrained(src, drone_config=small_config())
    task.save_pretrained(tmp_path / "task")
    base = AutoModel.from_pretrained(tmp_path / "task")
    inputs = sample_inputs()
    # the base model inside the task model and the reloaded base model agree exactly
    torch.testing.assert_close(outputs(base, inputs), outputs(task.bert, inputs), rtol=0, atol=0)
    assert set(drone_hf.report(base).rows) == set(drone_hf.report(task).rows)

    base.save_pretrained(tmp_path / "base")
    task2 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    torch.testing.assert_close(outputs(task2.bert, inputs), outputs(base, inputs), rtol=0, atol=0)
    assert len(drone_layers(task2)) == len(drone_layers(base))


def test_relative_errors_survive_reload(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    model = AutoModel.from_pretrained(src, drone_config=small_config())
    model.save_pretrained(tmp_path / "drone")
    again = AutoModel.from_pretrained(tmp_path / "drone")
    assert [r.relative_error for r in drone_hf.report(again)] == [r.relative_error for r in drone_hf.report(model)]
    assert all(r.relative_error is not None and 0 <= r.relative_error <= 1 for r in drone_hf.report(again))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_dequantize_merges_back_to_the_original_layer_kind(arch, tmp_path):
    src = save_tiny(arch, tmp_path / "dense")
    auto = AUTO_FOR[arch]
    dense = auto.from_pretrained(src)
    kinds = {n: type(m) for n, m in dense.named_modules()}
    model = auto.from_pretrained(src, drone_config=small_config())
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    model.dequantize()
    assert not drone_layers(model)
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=1e-4, atol=1e-5)
    # and the merged model saves as a plain dense checkpoint
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = auto.from_pretrained(tmp_path / "merged")
    assert not drone_layers(reloaded)
    torch.testing.assert_close(outputs(reloaded, inputs), outputs(model, inputs), rtol=0, atol=0)


def test_heads_are_not_targeted_by_default_but_can_be(tmp_path):
    src = save_tiny("bert-seq-cls", tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(src, drone_config=small_config())
    names = set(drone_layers(model))
    assert not any("pooler" in n or "classifier" in n for n in names)
    model = AutoModelForSequenceClassification.from_pretrained(
        src, drone_config=small_config(target_modules=["pooler.dense", "classifier"], ranks={"classifier": 1})
    )
    assert set(drone_layers(model)) == {"bert.pooler.dense", "classifier"}
    # the pooler sees one [CLS] vector per text: 8 texts span rank 8 < the uniform rank 16, so the
    # real (clamped) rank is recorded, never a padded one
    assert model.config.quantization_config.ranks == {"pooler.dense": 8, "classifier": 1}
    assert model.bert.pooler.dense.rank == 8


def test_gpt2_tied_lm_head_stays_dense(tmp_path):
    src = save_tiny("gpt2-lm", tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(src, drone_config=small_config())
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_failed_compression_leaves_source_folder_untouched(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    before = folder_digest(src)
    for bad in (
        small_config(ranks={"encoder.layer.0.attention.self.query": 10_000}),
        small_config(target_modules=["no_such_layer"]),
        small_config(dataset=[]),
    ):
        with pytest.raises(ValueError):
            AutoModel.from_pretrained(src, drone_config=bad)
    assert folder_digest(src) == before


def test_reload_rejects_a_config_without_ranks(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    AutoModel.from_pretrained(src, drone_config=small_config()).save_pretrained(tmp_path / "drone")
    cfg_file = tmp_path / "drone" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["ranks"] = None
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="records no ranks"):
        AutoModel.from_pretrained(tmp_path / "drone")


def test_reload_rejects_a_newer_format_version(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    AutoModel.from_pretrained(src, drone_config=small_config()).save_pretrained(tmp_path / "drone")
    cfg_file = tmp_path / "drone" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["format_version"] = drone_hf.FORMAT_VERSION + 1
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pip install -U drone-hf"):
        AutoModel.from_pretrained(tmp_path / "drone")


def test_quantizer_flags_for_trainer_and_compile(tmp_path):
    src = save_tiny("bert", tmp_path / "dense")
    model = AutoModel.from_pretrained(src, drone_config=small_config())
    q = model.hf_quantizer
    assert isinstance(q, drone_hf.DroneHfQuantizer)
    assert q.is_serializable() and q.is_trainable and q.is_qat_trainable and q.is_compileable
    assert model.is_quantized and model.quantization_method == "drone"


def test_registration_is_idempotent():
    import importlib

    import drone_hf.loading as loading

    loading.register()
    loading.patch_from_pretrained()
    importlib.reload(loading)
    loading.register()
    loading.patch_from_pretrained()
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["drone"].__name__ == "DroneHfQuantizer"
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["drone"].__name__ == "DroneConfig"


@pytest.mark.slow
def test_real_minilm_round_trip_in_fresh_process(tmp_path):
    model = AutoModel.from_pretrained(minilm_path(), drone_config=DroneConfig(param_ratio=0.5, num_samples=32))
    factored = len(drone_layers(model))  # of 36 targets (6 blocks x q, k, v, o, ffn in, ffn out); greedy
    record = model.config.quantization_config.allocation_result  # allocation may keep some dense
    assert 0 < factored <= 36 and record["dense_layers"] == 36 - factored
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    model.save_pretrained(tmp_path / "drone")
    got = reload_in_fresh_process(tmp_path / "drone", "AutoModel", inputs, tmp_path)
    assert got["kinds"] == ["DroneLinear"] and got["n_drone"] == factored
    torch.testing.assert_close(got["out"], expected, rtol=0, atol=0)
