"""PEFT LoRA on the factors (round trip through save/reload, merge keeps the factored structure),
gradient checkpointing, and full fine-tuning through Trainer's quantized-model checks."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import CALIBRATION_TEXTS
from trainer_helpers import classification_dataset, compressed_classifier, dense_classifier, make_trainer, snapshot
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf import DroneLinear
from drone_hf.training import compression_stats, load_lora_adapter, lora_target_modules, merge_lora, prepare_lora_model


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """A compressed tiny classifier and its DRONE checkpoint folder."""
    _, model = compressed_classifier(tok)
    folder = tmp_path_factory.mktemp("drone")
    model.save_pretrained(folder)
    return model, folder


def ranks_of(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, DroneLinear)}


def logits(model, tok):
    batch = tok(CALIBRATION_TEXTS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_targets_are_the_factors_of_factored_layers_only(tok):
    cfg = drone_hf.DroneConfig(
        param_ratio=0.5,
        dataset=CALIBRATION_TEXTS,
        tokenizer=tok,
        modules_to_not_convert=["encoder.layer.0.attention.self.query"],
    )
    model = drone_hf.compress(dense_classifier(), cfg, show_progress=False)
    names = lora_target_modules(model)
    factored = [n for n, m in model.named_modules() if isinstance(m, DroneLinear)]
    assert names == [f"{n}.{f}" for n in factored for f in ("down", "up")]
    assert not any(n.startswith("bert.encoder.layer.0.attention.self.query") for n in names)  # dense: not a target
    assert lora_target_modules(model, ("down",), layers=r"encoder\.layer\.1\..*") == [
        f"{n}.down" for n in factored if n.startswith("bert.encoder.layer.1.")
    ]
    with pytest.raises(ValueError, match="selects no factored layer"):
        lora_target_modules(model, layers="nothing")
    with pytest.raises(ValueError, match="must be a non-empty list"):
        lora_target_modules(model, "down")
    with pytest.raises(ValueError, match="Compress it first"):
        lora_target_modules(dense_classifier())


def test_lora_on_factored_layer_names_goes_on_their_factors(tok):
    """target_modules=["query", "value"], the usual BERT recipe, names factored layers PEFT cannot
    wrap: prepare_lora_model puts the adapters on their factors, leaving the config unchanged."""
    _, model = compressed_classifier(tok)
    config = LoraConfig(r=2, target_modules=["query", "value"])
    peft_model = prepare_lora_model(model, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
               and not n.endswith(("lora_A", "lora_B"))}
    expected = {f"bert.encoder.layer.{i}.attention.self.{p}.{f}" for i in range(2) for p in ("query", "value")
                for f in ("down", "up")}
    assert wrapped == expected
    assert config.target_modules == {"query", "value"}  # PEFT keeps a set; the user's object is not modified


def test_lora_round_trip_and_merge_keep_the_factored_model(tok, tmp_path, saved):
    source, folder = saved
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    peft_model = prepare_lora_model(model, LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"))
    stats, base_stats = compression_stats(peft_model), compression_stats(source)
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n or "modules_to_save" in n)
    assert stats["drone/params_dense"] == base_stats["drone/params_dense"]  # adapters are not part of the dense size
    assert stats["drone/params"] == base_stats["drone/params"] + adapters
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, DroneLinear) and hasattr(m.down, "lora_A")]
    assert len(wrapped) == 12 and all(hasattr(peft_model.get_submodule(n).up, "lora_A") for n in wrapped)
    before = snapshot(peft_model)
    make_trainer(peft_model, tok, classification_dataset(tok), tmp_path, max_steps=3).train()  # passes Trainer's checks
    moved = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all("lora_" in n or "classifier" in n for n in moved)  # the factors themselves stay frozen
    assert any(".down.lora_B" in n for n in moved) and any(".up.lora_B" in n for n in moved)
    trained = logits(peft_model, tok)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora_adapter(AutoModelForSequenceClassification.from_pretrained(folder), str(tmp_path / "adapter"))
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(logits(reloaded, tok), trained)

    merged = merge_lora(reloaded)
    assert ranks_of(merged) == ranks_of(source)  # still factored, same ranks
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, tok), trained, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert ranks_of(again) == ranks_of(source)
    torch.testing.assert_close(logits(again, tok), trained, rtol=1e-5, atol=1e-5)


def test_reentrant_checkpointing_reaches_adapters_only_with_input_grads(tok, saved):
    """PEFT skips enable_input_require_grads for quantized models; prepare_lora_model does not."""
    folder = saved[1]
    batch = tok(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)
    gc = {"use_reentrant": True}

    def lora_grads(peft_model) -> list[torch.Tensor | None]:
        peft_model.train()
        peft_model(**batch).logits.sum().backward()
        return [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n and "encoder.layer.0." in n]

    plain = AutoModelForSequenceClassification.from_pretrained(folder)
    plain.activation_checkpointing_enable(activation_checkpointing_kwargs=gc)
    plain.disable_input_require_grads()  # the state PEFT leaves a quantized model in
    with pytest.warns(UserWarning, match="requires_grad"):
        control = get_peft_model(plain, LoraConfig(r=2, target_modules=lora_target_modules(plain), task_type="SEQ_CLS"))
        grads = lora_grads(control)
    assert grads and all(g is None for g in grads)  # the adapters inside checkpointed blocks would never train

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    fixed = prepare_lora_model(
        model,
        LoraConfig(r=2, init_lora_weights=False, task_type="SEQ_CLS"),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=gc,
    )
    grads = lora_grads(fixed)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_full_fine_tuning_passes_trainers_checks_and_saves_factored(tok, tmp_path, saved):
    source, _ = saved
    model = copy.deepcopy(source)
    before = snapshot(model)
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path, activation_checkpointing=True)
    trainer.train()
    assert all(
        not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n.endswith(".down.weight")
    )
    trainer.save_model(str(tmp_path / "full"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full")
    assert ranks_of(reloaded) == ranks_of(source)
    torch.testing.assert_close(logits(reloaded, tok), logits(model, tok))

    # the check is real: a quantizer that did not report QAT support would be refused
    refused = copy.deepcopy(source)
    refused.hf_quantizer = type(
        "NoQat", (type(refused.hf_quantizer),), {"is_qat_trainable": property(lambda self: False)}
    )(refused.config.quantization_config, pre_quantized=True)
    with pytest.raises(ValueError, match="cannot perform fine-tuning on purely quantized models"):
        make_trainer(refused, tok, classification_dataset(tok), tmp_path)
