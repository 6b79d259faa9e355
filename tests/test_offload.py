"""Compressing a model loaded with accelerate offload (device_map with "cpu" and "disk" entries):
the same factors as in memory, nothing left on the meta device, one block materialised at a time in
sequential mode, and clear errors for placements that cannot be honoured."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer
from transformers import BertModel

import drone_hf
from drone_hf import DroneConfig, DroneLinear
from drone_hf.calibration.cache import weights_fingerprint
from drone_hf.calibration.offload import is_offloaded

TOK = tokenizer()
MAP = {
    "embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "disk", "encoder.layer.2": "disk", "pooler": "cpu"
}


def save_three_layer(cls, folder):
    """A seeded 3-layer tiny ``cls`` and the tokenizer, saved into ``folder`` (returned)."""
    torch.manual_seed(0)
    cls(bert_config(num_hidden_layers=3)).eval().save_pretrained(folder)
    TOK.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_three_layer(BertModel, tmp_path_factory.mktemp("tiny-bert"))


def config(**kw) -> DroneConfig:
    base = {"dataset": CALIBRATION_TEXTS, "num_samples": len(CALIBRATION_TEXTS), "batch_size": 2, "tokenizer": TOK,
            "param_ratio": 0.4, "allocation": "uniform"}  # uniform: every text calibrates (greedy holds some out)
    return DroneConfig(**(base | kw))


@pytest.mark.parametrize("sequential", [True, False])
def test_offloaded_compression_equals_in_memory(checkpoint, tmp_path, sequential):
    reference = BertModel.from_pretrained(checkpoint, drone_config=config(sequential=sequential))
    model = BertModel.from_pretrained(
        checkpoint, drone_config=config(sequential=sequential), device_map=MAP, offload_folder=tmp_path / "offload"
    )
    # the run really was offloaded: layers that are not targets stay on disk behind their hooks
    norm = model.encoder.layer[1].output.LayerNorm
    assert is_offloaded(norm) and norm.weight.device.type == "meta"
    factored = {n: m for n, m in reference.named_modules() if isinstance(m, DroneLinear)}
    assert len(factored) == 3 * 6
    for name, ref in factored.items():
        got = model.get_submodule(name)
        assert isinstance(got, DroneLinear), name
        assert all(t.device.type == "cpu" for t in got.parameters()), name  # written back factored, not on meta
        assert torch.equal(got.up.weight, ref.up.weight) and torch.equal(got.down.weight, ref.down.weight), name
        assert torch.equal(got.up.bias, ref.up.bias), name
    assert model.config.quantization_config.ranks == reference.config.quantization_config.ranks
    enc = TOK(["The union is strong.", "Offloaded or not, the same answer."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
        assert torch.equal(out, reference(**enc).last_hidden_state)
    # the compressed model, its norms still on disk, saves a checkpoint that reloads to the same outputs
    model.save_pretrained(tmp_path / "saved")
    reloaded = BertModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(**enc).last_hidden_state, out)


def test_sequential_materialises_one_block_at_a_time(checkpoint, tmp_path, monkeypatch):
    import drone_hf.sequential as sequential_mod

    seen = []
    real = sequential_mod.collect_grams

    def spy(model, layers, *args, **kwargs):
        # while a block calibrates, the next offloaded block's targets are still on disk (meta + hook)
        later = model.encoder.layer[2].attention.self.query
        seen.append((sorted(layers)[0].split(".")[2], is_offloaded(later)))
        return real(model, layers, *args, **kwargs)

    monkeypatch.setattr(sequential_mod, "collect_grams", spy)
    BertModel.from_pretrained(checkpoint, drone_config=config(sequential=True), device_map=MAP,
                              offload_folder=tmp_path / "offload")
    assert seen == [("0", True), ("1", True), ("2", False)]


def test_offloaded_weights_are_fingerprinted_from_their_store(checkpoint, tmp_path):
    dense = BertModel.from_pretrained(checkpoint)
    offloaded = BertModel.from_pretrained(checkpoint, device_map=MAP, offload_folder=tmp_path / "offload")
    assert offloaded.encoder.layer[2].intermediate.dense.weight.device.type == "meta"
    assert weights_fingerprint(offloaded) == weights_fingerprint(dense)


@pytest.mark.parametrize(("place", "why"), [("cuda:7", "torch sees"), ("meta", "the meta device holds no weights"),
                                            ("nowhere", "that is not a device name")])
def test_a_device_map_that_cannot_be_honoured_is_refused_before_loading(checkpoint, place, why):
    with pytest.raises(ValueError, match=f"device_map places 'encoder.layer.1' on '{place}', but {why}"):
        BertModel.from_pretrained(checkpoint, drone_config=config(), device_map=MAP | {"encoder.layer.1": place})


def test_meta_weights_without_an_offload_store_are_refused():
    with torch.device("meta"):
        skeleton = BertModel(bert_config())
    with pytest.raises(ValueError, match="meta device and no accelerate offload hook"):
        drone_hf.compress(skeleton, config(), show_progress=False)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    from transformers import BertForSequenceClassification

    return save_three_layer(BertForSequenceClassification, tmp_path_factory.mktemp("tiny-bert-cls"))


def test_offloaded_fisher_weighted_svd_equals_in_memory(classifier_checkpoint, tmp_path):
    """FWSVD's row Fisher is the weights' gradient: an offloaded weight is a placeholder autograd never
    reaches, which left the Fisher zero and the factors plain SVD's."""
    from transformers import BertForSequenceClassification

    load = BertForSequenceClassification.from_pretrained
    device_map = {f"bert.{k}": v for k, v in MAP.items()} | {"classifier": "cpu"}
    reference = load(classifier_checkpoint, drone_config=config(method="fwsvd"))
    model = load(classifier_checkpoint, drone_config=config(method="fwsvd"), device_map=device_map,
                 offload_folder=tmp_path / "offload")
    plain = load(classifier_checkpoint, drone_config=config(method="svd"))
    name = "bert.encoder.layer.2.intermediate.dense"  # on disk in the map
    got, ref, svd = (m.get_submodule(name) for m in (model, reference, plain))
    assert not torch.equal(ref.down.weight, svd.down.weight)  # the Fisher weighting changes the factors here
    assert torch.equal(got.up.weight, ref.up.weight) and torch.equal(got.down.weight, ref.down.weight)


def test_offloaded_gradient_passes_leave_requires_grad_as_it_was(classifier_checkpoint, tmp_path):
    """The gradient passes (loss-aware DRONE here) switch requires_grad off and back on; an offloaded
    module gets a new placeholder tensor at each forward, so restoring the objects held at entry left
    the module's own tensors frozen."""
    from transformers import BertForSequenceClassification

    device_map = {f"bert.{k}": v for k, v in MAP.items()} | {"classifier": "cpu"}
    model = BertForSequenceClassification.from_pretrained(
        classifier_checkpoint, drone_config=config(method="drone-kfac"), device_map=device_map,
        offload_folder=tmp_path / "offload")
    norm = model.bert.encoder.layer[2].output.LayerNorm  # not a target, still on disk
    assert is_offloaded(norm)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == []
