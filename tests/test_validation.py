"""Load-time validation: a DRONE checkpoint's weights must agree with its config.json."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import CALIBRATION_TEXTS, save_tiny
from transformers import AutoModel, AutoModelForSequenceClassification

import drone_hf


@pytest.fixture
def drone_checkpoint(tmp_path):
    src = save_tiny("bert-seq-cls", tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(
        src, drone_config=drone_hf.DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8)
    )
    model.save_pretrained(tmp_path / "drone")
    return tmp_path / "drone"


def edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


def test_rank_disagreeing_with_the_weights_names_layer_and_shapes(drone_checkpoint):
    name = "encoder.layer.1.intermediate.dense"
    edit_config(drone_checkpoint, lambda q: q["ranks"].__setitem__(name, 3))
    with pytest.raises(
        ValueError,
        match=rf"disagree on '{name}': the config records rank 3 \(down \[3, 32\]\) "
        r"but the weights hold down \[\d+, 32\]",
    ):
        AutoModelForSequenceClassification.from_pretrained(drone_checkpoint)
    with pytest.raises(ValueError, match="disagree"):  # the base class sees the same layer
        AutoModel.from_pretrained(drone_checkpoint)


def test_missing_factor_tensor_is_named(drone_checkpoint):
    weights = drone_checkpoint / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("attention.self.key.up.weight"))
    del tensors[key]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"have no '.*attention\.self\.key\.up\.weight' tensor"):
        AutoModelForSequenceClassification.from_pretrained(drone_checkpoint)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_safetensors_is_refused_clearly(drone_checkpoint, keep):
    weights = drone_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AutoModelForSequenceClassification.from_pretrained(drone_checkpoint)


def test_a_valid_checkpoint_passes(drone_checkpoint):
    model = AutoModelForSequenceClassification.from_pretrained(drone_checkpoint)
    assert len(drone_hf.report(model)) == 12
