"""The checkpoint marker in-process: what save_pretrained writes, what loading reads back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import sample_inputs
from transformers import AutoConfig, AutoModel, BertModel, PreTrainedConfig, PreTrainedModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import drone_hf
from drone_hf import DroneLinear
from drone_hf.hub import checkpoint as ckpt
from drone_hf.utils import public_names


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_saved_checkpoint_is_marked_and_carries_the_shim(compressed, tmp_path):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone")
    raw = read_config(tmp_path / "drone")
    assert raw["model_type"] == "drone"
    assert raw["auto_map"] == {"AutoConfig": "drone_hf_checkpoint.DroneCheckpointConfig"}
    info = raw["drone_checkpoint"]
    assert info["base_model_type"] == "bert" and info["format_version"] == ckpt.CHECKPOINT_FORMAT
    assert info["drone_hf_version"] == drone_hf.__version__ and "import drone_hf" in info["how_to_load"]
    assert info["base_model"] is None  # compressed from a local folder: no path is ever written
    assert raw["quantization_config"]["quant_method"] == "drone"
    shim = (tmp_path / "drone" / "drone_hf_checkpoint.py").read_text()
    compile(shim, "drone_hf_checkpoint.py", "exec")
    assert "pip install drone-hf" in shim and "DroneCheckpointConfig" in shim


def test_a_config_saved_on_its_own_stays_marked(compressed, tmp_path):
    """AutoConfig.from_pretrained gives the unmarked base config; saving it back (to edit id2label)
    must not write a config.json that plain transformers would load as a dense model with random
    weights in place of the factors. A dense config saved the same way stays a plain one."""
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone")
    before = read_config(tmp_path / "drone")
    config = AutoConfig.from_pretrained(tmp_path / "drone")
    assert config.model_type == "bert"
    config.id2label, config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    config.save_pretrained(tmp_path / "drone")
    raw = read_config(tmp_path / "drone")
    assert raw["model_type"] == "drone" and raw["auto_map"] == before["auto_map"]
    assert raw["drone_checkpoint"]["base_model_type"] == "bert" and raw["id2label"] == {"0": "neg", "1": "pos"}
    assert (tmp_path / "drone" / "drone_hf_checkpoint.py").is_file()
    config.save_pretrained(tmp_path / "elsewhere")  # a config-only folder, marked the same way
    assert read_config(tmp_path / "elsewhere")["model_type"] == "drone"
    reloaded = AutoModel.from_pretrained(tmp_path / "drone")
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**sample_inputs()).last_hidden_state,
                                   model(**sample_inputs()).last_hidden_state)
    type(model.config)().save_pretrained(tmp_path / "dense")
    assert read_config(tmp_path / "dense")["model_type"] == "bert"


def test_local_paths_are_never_written_into_the_checkpoint_or_its_card(tmp_path):
    """Calibration data and tokenizer given as local paths: the checkpoint and card name the file,
    never the user's directory layout (which a push would publish)."""
    from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer

    from drone_hf.hub import render_model_card

    private = tmp_path / "home" / "alice" / "secret-project"
    private.mkdir(parents=True)
    (private / "calib.txt").write_text("\n".join(CALIBRATION_TEXTS[:8]) + "\n")
    tokenizer().save_pretrained(private / "tok")
    torch.manual_seed(0)
    model = drone_hf.compress(BertModel(bert_config()).eval(), drone_hf.DroneConfig(
        dataset=str(private / "calib.txt"), tokenizer=str(private / "tok"), num_samples=8, allocation="uniform"),
        show_progress=False)
    model.save_pretrained(tmp_path / "drone")
    text = (tmp_path / "drone" / "config.json").read_text()
    assert "alice" not in text and str(tmp_path) not in text
    qc = json.loads(text)["quantization_config"]
    assert qc["dataset"] == qc["calibration"]["dataset"] == "<local path: calib.txt>"
    assert qc["tokenizer"] == "<local path: tok>"
    assert "alice" not in render_model_card(AutoModel.from_pretrained(tmp_path / "drone"), "me/model").content
    assert model.config.quantization_config.dataset == str(private / "calib.txt")  # the live object keeps it
    builtin = drone_hf.compress(BertModel(bert_config()).eval(), drone_hf.DroneConfig(
        dataset="sotu", tokenizer=tokenizer(), num_samples=8, allocation="uniform"), show_progress=False)
    builtin.save_pretrained(tmp_path / "builtin")
    assert read_config(tmp_path / "builtin")["quantization_config"]["dataset"] == "sotu"


def test_a_task_checkpoint_reloaded_as_its_base_model_saves_a_consistent_checkpoint(tmp_path):
    """A factored head is skipped when a task checkpoint loads as its base model; the loaded record
    must forget it, or the base model's save records a rank with no tensors behind it."""
    from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from drone_hf.hub import summarize_checkpoint

    torch.manual_seed(0)
    task = drone_hf.compress(BertForSequenceClassification(bert_config()).eval(), drone_hf.DroneConfig(
        dataset=CALIBRATION_TEXTS, tokenizer=tokenizer(), num_samples=8, allocation="uniform",
        target_modules=["query", "classifier"]), show_progress=False)
    assert "classifier" in task.config.quantization_config.ranks
    task.save_pretrained(tmp_path / "task")
    base = AutoModel.from_pretrained(tmp_path / "task")
    base.save_pretrained(tmp_path / "base")
    ranks = read_config(tmp_path / "base")["quantization_config"]["ranks"]
    assert sorted(ranks) == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    assert "classifier" not in read_config(tmp_path / "base")["quantization_config"]["relative_errors"]
    assert len(summarize_checkpoint(tmp_path / "base").report) == 2
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")  # a new head, as from any base
    assert sum(isinstance(m, DroneLinear) for m in again.modules()) == 2


def test_half_and_float_cast_a_drone_model_like_to_dtype(compressed):
    """transformers refuses .half()/.float() for quantized models; DRONE's factors are float weights."""
    model, _ = compressed("bert")
    model = copy.deepcopy(model)
    with torch.no_grad():
        want = copy.deepcopy(model).to(torch.float16)(**sample_inputs()).last_hidden_state
        assert model.half() is model and {p.dtype for p in model.parameters()} == {torch.float16}
        torch.testing.assert_close(model(**sample_inputs()).last_hidden_state, want)
        assert {p.dtype for p in model.float().parameters()} == {torch.float32}


def test_dense_models_are_saved_untouched(tmp_path):
    from tiny_models import save_tiny

    folder = save_tiny("bert", tmp_path / "dense")
    assert read_config(folder)["model_type"] == "bert"
    assert not (folder / "drone_hf_checkpoint.py").exists() and "drone_checkpoint" not in read_config(folder)


def test_concrete_and_auto_classes_reload_without_the_type_warning(compressed, tmp_path):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone")
    logger = hf_logging.get_logger("transformers.configuration_utils")
    with CaptureLogger(logger) as captured:
        concrete = BertModel.from_pretrained(tmp_path / "drone")
    assert "model of type `drone`" not in captured.out
    assert type(AutoConfig.from_pretrained(tmp_path / "drone")).__name__ == "BertConfig"
    auto = AutoModel.from_pretrained(tmp_path / "drone")
    inputs = sample_inputs()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        for other in (concrete, auto):
            assert any(isinstance(m, DroneLinear) for m in other.modules())
            torch.testing.assert_close(other(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    assert auto.config.model_type == "bert" and not hasattr(auto.config, "auto_map")


def test_resaving_keeps_the_recorded_base_model(compressed, tmp_path):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "a")
    raw = read_config(tmp_path / "a")
    raw["drone_checkpoint"]["base_model"] = "org/base-model"  # as if compressed from a Hub id
    (tmp_path / "a" / "config.json").write_text(json.dumps(raw))
    AutoModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert read_config(tmp_path / "b")["drone_checkpoint"]["base_model"] == "org/base-model"
    assert read_config(tmp_path / "b")["model_type"] == "drone"


def test_older_unmarked_checkpoints_still_load_and_get_marked_on_save(compressed, tmp_path):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "new")
    old = ckpt.unmark_config_dict(read_config(tmp_path / "new"))
    del old["drone_checkpoint"]
    (tmp_path / "new" / "config.json").write_text(json.dumps(old))  # the format before the marker
    reloaded = AutoModel.from_pretrained(tmp_path / "new")
    assert len(drone_hf.report(reloaded)) == len(drone_hf.report(model))
    reloaded.save_pretrained(tmp_path / "again")
    assert read_config(tmp_path / "again")["model_type"] == "drone"


def test_merged_model_saves_as_a_plain_dense_checkpoint(compressed, tmp_path):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone")
    model = AutoModel.from_pretrained(tmp_path / "drone")  # carries the drone_checkpoint record
    model.dequantize()
    model.save_pretrained(tmp_path / "merged")
    raw = read_config(tmp_path / "merged")
    assert raw["model_type"] == "bert" and "quantization_config" not in raw and "auto_map" not in raw
    assert ckpt.CHECKPOINT_KEY not in raw  # no DRONE provenance on a dense checkpoint
    assert not (tmp_path / "merged" / "drone_hf_checkpoint.py").exists()


def test_mark_and_unmark_are_inverse_and_keep_other_auto_map_entries():
    base = {
        "model_type": "bert",
        "hidden_size": 32,
        "auto_map": {"AutoTokenizer": "tok.Tok"},
        "quantization_config": {"quant_method": "drone"},  # a marked dict without it is refused on read
    }
    marked = ckpt.mark_config_dict(base, {"format_version": 1, "base_model": None})
    assert marked["model_type"] == "drone" and marked["auto_map"]["AutoTokenizer"] == "tok.Tok"
    assert base["model_type"] == "bert"  # the input is not modified
    back = ckpt.unmark_config_dict(marked)
    assert back.pop("drone_checkpoint")["base_model_type"] == "bert"
    assert back == base
    assert ckpt.unmark_config_dict(base) is base  # unmarked dicts pass through


def test_remote_code_base_configs_are_not_marked():
    with pytest.raises(ValueError, match="remote-code"):
        ckpt.mark_config_dict({"model_type": "x", "auto_map": {"AutoConfig": "their.Config"}}, {})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.pop("drone_checkpoint"), "has no drone_checkpoint.base_model_type"),
        (lambda d: d["drone_checkpoint"].update(format_version=ckpt.CHECKPOINT_FORMAT + 1), "pip install -U drone-hf"),
    ],
)
def test_damaged_or_newer_markers_fail_loudly(compressed, tmp_path, damage, message):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone")
    raw = read_config(tmp_path / "drone")
    damage(raw)
    (tmp_path / "drone" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(tmp_path / "drone")


@pytest.mark.parametrize(
    "name, hub_id",
    [("org/model", "org/model"), ("gpt2", "gpt2"), ("/abs/path", None), ("./rel", None), ("a/b/c", None), (None, None)],
)
def test_only_hub_ids_are_recorded_as_base_model(name, hub_id):
    assert public_names.hub_id(name) == hub_id


def test_local_folders_are_not_hub_ids(tmp_path):
    (tmp_path / "model").mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert public_names.hub_id("model") is None
    finally:
        os.chdir(cwd)


def test_install_is_idempotent():
    def hooks():
        config_hook = PreTrainedConfig.__dict__["get_config_dict"]
        return PreTrainedModel.save_pretrained, PreTrainedModel.push_to_hub, PreTrainedConfig.to_json_file, config_hook

    before = hooks()
    ckpt.install()
    ckpt.install()
    after = hooks()
    assert before[:3] == after[:3] and before[3].__func__ is after[3].__func__
    assert all(getattr(f, "_drone_hf_checkpoint_patched", False) for f in (*after[:3], after[3].__func__))


def test_save_pretrained_with_push_commits_the_marked_checkpoint(compressed, tmp_path, fake_hub):
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone", push_to_hub=True, repo_id="me/tiny-drone", commit_message="hi")
    assert [r["repo_id"] for r in fake_hub.repos] == ["me/tiny-drone"]
    (commit,) = fake_hub.commits
    assert commit["commit_message"] == "hi"
    assert json.loads(commit["files"]["config.json"])["model_type"] == "drone"
    assert {"drone_hf_checkpoint.py", "model.safetensors", "README.md", "rank_per_layer.png"} <= set(commit["files"])
    assert read_config(tmp_path / "drone")["model_type"] == "drone"  # the local copy too


def test_save_with_push_uploads_what_the_save_wrote_not_the_rest_of_the_folder(compressed, tmp_path, fake_hub):
    """A Trainer output_dir holds optimizer states and training_args.bin next to the model: a push from
    save_pretrained must not publish them, and a README.md of the user's stays on disk as it was."""
    model, _ = compressed("bert")
    folder = tmp_path / "out"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "training_args.bin").write_bytes(b"pickled arguments")
    (folder / "README.md").write_text("# My experiment notes\n")
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/tiny-drone")
    (commit,) = fake_hub.commits
    files = set(commit["files"])
    model.save_pretrained(tmp_path / "reference")
    assert files == {p.name for p in (tmp_path / "reference").iterdir()} | {"README.md", "rank_per_layer.png"}
    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\n") and "drone-hf" in card  # the Hub gets the DRONE card ...
    assert (folder / "README.md").read_text() == "# My experiment notes\n"  # ... the user's file stays
    assert (folder / "checkpoint-1" / "optimizer.pt").read_bytes() == b"optimizer state"  # kept locally
    assert read_config(folder)["model_type"] == "drone"

    model.save_pretrained(folder / "again", push_to_hub=True, repo_id="me/tiny-drone")  # a fresh folder: card on disk
    assert "drone-hf" in (folder / "again" / "README.md").read_text()
    model.save_pretrained(folder / "again", push_to_hub=True, repo_id="me/tiny-drone")  # our own card: rewritten
    assert fake_hub.commits[-1]["files"]["README.md"] == (folder / "again" / "README.md").read_bytes()
