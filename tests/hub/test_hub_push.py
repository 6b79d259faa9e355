"""Pushing to the Hub, checked at the ``HfApi`` boundary: exactly which bytes one commit would carry."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import sample_inputs
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import drone_hf
from drone_hf import DroneLinear
from drone_hf.hub import Measurements

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
MODEL_FILES = {"config.json", "model.safetensors", "drone_hf_checkpoint.py", "README.md", "rank_per_layer.png"}


def unpack(files: dict[str, bytes], folder):
    """Write committed files to ``folder``: what a user downloading the repository would get."""
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_helper_commits_weights_config_tokenizer_card_and_plot(compressed, tmp_path, fake_hub):
    model, src = compressed("bert")
    measured = Measurements(dense_latency_ms=12.0, compressed_latency_ms=8.0, latency_device="CPU test-cpu, 2 threads",
                            latency_inputs="batch 8 x 128 tokens", fidelity_cosine=0.95, fidelity_relative_error=0.2,
                            fidelity_tokens=1234, fidelity_data="sotu-heldout")
    result = drone_hf.push_to_hub(model, "me/tiny-drone", tokenizer=AutoTokenizer.from_pretrained(src),
                                  base_model="org/tiny-bert", measurements=measured, private=True, license="mit")
    assert result == "commit-1"
    assert fake_hub.repos == [{"repo_id": "me/tiny-drone", "private": True, "exist_ok": True}]
    (commit,) = fake_hub.commits
    files = commit["files"]
    # exactly: what save_pretrained + the tokenizer write, plus the card and its plot, nothing else
    model.save_pretrained(tmp_path / "reference")
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "reference")
    expected = {p.name for p in (tmp_path / "reference").iterdir()} | {"README.md", "rank_per_layer.png"}
    assert set(files) == expected and MODEL_FILES | TOKENIZER_FILES <= expected
    assert files["config.json"] == (tmp_path / "reference" / "config.json").read_bytes()
    assert files["rank_per_layer.png"].startswith(b"\x89PNG\r\n\x1a\n")

    config = json.loads(files["config.json"])
    assert config["model_type"] == "drone" and config["quantization_config"]["ranks"] == {
        r.name: r.rank for r in drone_hf.report(model)
    }

    card = files["README.md"].decode()
    assert card.startswith("---\n") and "base_model: org/tiny-bert" in card and "license: mit" in card
    assert "1.50x" in card and "CPU test-cpu, 2 threads" in card and "cosine 0.9500" in card
    for row in drone_hf.report(model):
        assert f"| `{row.name}` | {row.out_features}x{row.in_features} | {row.rank} |" in card
    assert "@inproceedings{chen2021drone" in card and "import drone_hf" in card

    # what was committed is a working checkpoint: the same outputs, factored
    folder = unpack(files, tmp_path / "downloaded")
    again = AutoModel.from_pretrained(folder)
    assert any(isinstance(m, DroneLinear) for m in again.modules())
    inputs = AutoTokenizer.from_pretrained(folder)(["The state of the union."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).last_hidden_state, model(**inputs).last_hidden_state, rtol=0, atol=0)


def test_models_own_push_to_hub_goes_through_drone_hf(compressed, tmp_path, fake_hub):
    model, _ = compressed("gpt2-lm")
    model.save_pretrained(tmp_path / "drone")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "drone")
    AutoTokenizer.from_pretrained(model.name_or_path).save_pretrained(tmp_path / "drone")
    reloaded.push_to_hub("me/gpt2-drone", commit_message="compressed")
    (commit,) = fake_hub.commits
    assert commit["commit_message"] == "compressed"
    files = commit["files"]
    assert MODEL_FILES | TOKENIZER_FILES | {"generation_config.json"} <= set(files)  # tokenizer found next to it
    card = files["README.md"].decode()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "Speed**: not measured" in card  # nothing measured, and the card says so


def test_tokenizer_defaults_to_the_models_folder_and_is_optional(compressed, fake_hub, tmp_path):
    model, _ = compressed("bert")
    drone_hf.push_to_hub(model, "me/a")  # name_or_path is the dense folder, which has a tokenizer
    assert TOKENIZER_FILES <= set(fake_hub.commits[-1]["files"])
    model.save_pretrained(tmp_path / "no-tokenizer")
    bare = AutoModel.from_pretrained(tmp_path / "no-tokenizer")
    bare.config.quantization_config.tokenizer = None
    drone_hf.push_to_hub(bare, "me/b")
    assert not TOKENIZER_FILES & set(fake_hub.commits[-1]["files"])
    assert MODEL_FILES <= set(fake_hub.commits[-1]["files"])


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "bad repo", "-x/", None])
def test_bad_repo_id_fails_before_any_hub_call(compressed, fake_hub, repo_id):
    model, _ = compressed("bert")
    with pytest.raises(ValueError, match="repo_id"):
        drone_hf.push_to_hub(model, repo_id)
    assert not fake_hub.repos and not fake_hub.commits


def test_dense_models_are_refused_with_the_fix(fake_hub, tmp_path):
    from tiny_models import save_tiny

    dense = AutoModel.from_pretrained(save_tiny("bert", tmp_path / "dense"))
    with pytest.raises(ValueError, match="Compress it first"):
        drone_hf.push_to_hub(dense, "me/dense")
    assert not fake_hub.repos


def test_measurements_as_dict_and_unknown_fields(compressed, fake_hub):
    model, _ = compressed("bert")
    drone_hf.push_to_hub(model, "me/a", measurements={"perplexity_dense": 20.0, "perplexity_compressed": 25.0})
    assert "20.00 dense -> 25.00 compressed" in fake_hub.commits[-1]["files"]["README.md"].decode()
    with pytest.raises(ValueError, match="Unknown Measurements field"):
        drone_hf.push_to_hub(model, "me/a", measurements={"speed": 2})


def test_pushed_outputs_match_in_memory_model(compressed, fake_hub, tmp_path):
    """The in-memory model is not changed by pushing (saving must not swap or move its layers)."""
    model, _ = compressed("bert")
    inputs = sample_inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        drone_hf.push_to_hub(model, "me/a")
        torch.testing.assert_close(model(**inputs).last_hidden_state, before, rtol=0, atol=0)
