"""``DroneConfig(prune_mlp=True)`` end to end: the budget holds, the record matches the layers, a
save/reload is exact, ``dequantize`` gives back the dense architecture with the same function, and
every unsupported combination or damaged record is refused with its fix."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, sample_inputs, save_tiny
from transformers import AutoModel, AutoModelForCausalLM

import drone_hf
from drone_hf import DroneConfig
from drone_hf.hub.summary import summarize_checkpoint
from drone_hf.modules.low_rank_linear import dense_weight_of
from drone_hf.modules.mlp_blocks import find_mlp_blocks
from drone_hf.modules.targets import supported_layers

TEXTS = CALIBRATION_TEXTS * 4


def _config(**kw) -> DroneConfig:
    return DroneConfig(**({"dataset": TEXTS, "num_samples": 24, "prune_mlp": True, "param_ratio": 0.6} | kw))


def _out(model):
    with torch.no_grad():
        return model(**sample_inputs())[0]


def _check_record(model):
    """Every recorded block's layers have the recorded width; unrecorded blocks are full width."""
    widths = model.config.quantization_config.mlp_widths
    layers = supported_layers(model)
    for block in find_mlp_blocks(model):
        recorded = widths.get(block.name)
        if recorded is None:
            continue
        assert block.width == recorded["width"] < recorded["original"]
        for m in block.inputs:
            assert dense_weight_of(layers[m][1]).shape[0] == recorded["width"]
        assert dense_weight_of(layers[block.output][1]).shape[1] == recorded["width"]


@pytest.mark.parametrize("arch,auto,method", [
    ("llama-gqa-lm", AutoModelForCausalLM, "drone-kfac"),
    ("bert", AutoModel, "drone"),
    ("gpt2-lm", AutoModelForCausalLM, "drone"),
])
def test_compress_save_reload_dequantize(tmp_path, arch, auto, method):
    dense_dir = save_tiny(arch, tmp_path / "dense")
    model = auto.from_pretrained(dense_dir, drone_config=_config(method=method))
    qc = model.config.quantization_config
    assert qc.mlp_widths, "a 40% cut of tiny random MLPs prunes some block"
    assert qc.allocation_result["targeted_param_ratio"] <= 0.6 + 1e-9
    assert qc.allocation_result["pruned_mlp_blocks"] == len(qc.mlp_widths)
    assert "mlp_width_steps" not in qc.allocation_result  # planner internals are not part of the record
    _check_record(model)
    dense = auto.from_pretrained(dense_dir)
    out = _out(model)
    model.save_pretrained(tmp_path / "drone")
    reloaded = auto.from_pretrained(tmp_path / "drone")
    assert reloaded.config.quantization_config.mlp_widths == qc.mlp_widths
    _check_record(reloaded)
    assert torch.equal(_out(reloaded), out)
    # inspect reads the same widths and restores the dense parameter count from the files alone
    summary = summarize_checkpoint(tmp_path / "drone")
    assert {r.name: r.width for r in summary.report.pruned_rows} == {k: v["width"] for k, v in qc.mlp_widths.items()}
    assert summary.report.dense_model_params == sum(p.numel() for p in dense.parameters())
    assert "width-pruned" in str(summary)
    # dequantize: the architecture's widths again, the same function (zero neurons only)
    reloaded.dequantize()
    assert all(b.width == find_mlp_blocks(dense)[0].width for b in find_mlp_blocks(reloaded))
    assert torch.allclose(_out(reloaded), out, atol=1e-5, rtol=0)
    reloaded.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = auto.from_pretrained(tmp_path / "plain")
    assert torch.allclose(_out(plain), out, atol=1e-5, rtol=0)


def test_an_all_pruned_model_is_compressed_and_refused_a_second_time(tmp_path):
    """GPT-2 at a 40% cut: every MLP block pruned, no layer factored (no ranks at all) is a valid result."""
    dense_dir = save_tiny("gpt2-lm", tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense_dir, drone_config=_config())
    qc = model.config.quantization_config
    assert qc.mlp_widths and not qc.ranks
    with pytest.raises(ValueError, match="already DRONE-compressed .*pruned MLP blocks"):
        drone_hf.compress(model, _config())
    report = drone_hf.report(model)
    assert len(report.pruned_rows) == len(qc.mlp_widths) and not report.rows
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert report.dense_model_params == sum(p.numel() for p in dense.parameters())


def _llama():
    from tiny_models import llama_config

    torch.manual_seed(0)
    return llama_config()


@pytest.mark.parametrize("overrides,match", [
    ({"method": "svd"}, "method='svd'"),
    ({"allocation": "uniform"}, "allocation='uniform'"),
    ({"param_ratio": None, "max_loss": 0.1}, "target_speedup or max_loss"),
    ({"param_ratio": None, "target_speedup": 1.5}, "target_speedup or max_loss"),
    ({"sequential": True}, "sequential=True"),
])
def test_unsupported_combinations_are_refused(overrides, match):
    with pytest.raises(ValueError, match=r"prune_mlp=True .*" + match.replace("(", r"\(")):
        _config(**overrides)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="prune_mlp='yes' must be True or False"):
        _config(prune_mlp="yes")
    with pytest.raises(ValueError, match="mlp_widths=.* must map MLP block names"):
        DroneConfig(mlp_widths={"layers.0.mlp": {"width": 90, "original": 64}})


def test_no_prunable_block_is_refused():
    model = AutoModelForCausalLM.from_config(_llama())
    with pytest.raises(ValueError, match="prune_mlp=True found no MLP block"):
        drone_hf.compress(model, _config(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
                          show_progress=False)
    with pytest.raises(ValueError, match=r"none pinned by ranks="):
        drone_hf.compress(model, _config(ranks={r".*down_proj": 4}), show_progress=False)


def test_serialised_setting_round_trips():
    cfg = _config(method="drone-kfac")
    assert cfg.to_dict()["prune_mlp"] is True
    assert DroneConfig.from_dict(cfg.to_dict()) == cfg


def test_an_edited_width_is_refused_before_anything_loads(tmp_path):
    dense_dir = save_tiny("llama-gqa-lm", tmp_path / "dense")
    AutoModelForCausalLM.from_pretrained(dense_dir, drone_config=_config()).save_pretrained(tmp_path / "drone")
    path = tmp_path / "drone" / "config.json"
    raw = json.loads(path.read_text())
    widths = raw["quantization_config"]["mlp_widths"]
    name = next(iter(widths))
    widths[name]["width"] -= 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"pruned MLP layer .* nothing was loaded"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "drone")


def test_lora_trains_on_a_narrowed_layer(tmp_path):
    from peft import LoraConfig, get_peft_model

    dense_dir = save_tiny("llama-gqa-lm", tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense_dir, drone_config=_config())
    name = next(iter(model.config.quantization_config.mlp_widths))
    width = model.config.quantization_config.mlp_widths[name]["width"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    batch = sample_inputs()
    before = _out(peft_model)
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_A" in n and name.replace("mlp", "mlp.down_proj") in n]
    assert lora and lora[0].shape[1] == width and lora[0].grad is not None
    merged = peft_model.merge_and_unload()
    assert torch.allclose(_out(merged), before, atol=1e-5)


def test_model_card_lists_pruned_blocks_and_skips_an_empty_rank_plot(tmp_path):
    from drone_hf.hub.push import write_card_files

    dense_dir = save_tiny("gpt2-lm", tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense_dir, drone_config=_config())
    assert not model.config.quantization_config.ranks  # every MLP block pruned, nothing factored
    written = write_card_files(model, tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert written == ["README.md"] and "## MLP widths" in card and "| `prune_mlp` | `True` |" in card
    for name, record in model.config.quantization_config.mlp_widths.items():
        assert f"| `{name}` | {record['width']} | {record['original']} |" in card
