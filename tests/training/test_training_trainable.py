"""What trains after compression: ``set_trainable`` and ``SelectTrainableCallback`` in a real Trainer run."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, gpt2_config
from trainer_helpers import (
    changed,
    classification_dataset,
    compressed_classifier,
    dense_classifier,
    make_trainer,
    snapshot,
)

import drone_hf
from drone_hf import DroneLinear
from drone_hf.training import SelectTrainableCallback, set_trainable


def factor_param_names(model, which=("down", "up")) -> set[str]:
    """Expected names, built from the module tree (independent of the code under test)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, DroneLinear):
            for side in which:
                out |= {f"{name}.{side}.{p}" for p, _ in getattr(m, side).named_parameters()}
    return out


HEADS = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


@pytest.fixture(scope="module")
def pristine(tok):
    return compressed_classifier(tok)[1]


@pytest.fixture
def compressed(pristine):
    return copy.deepcopy(pristine)


@pytest.mark.parametrize(
    "mode, sides",
    [("factors", ("down", "up")), ("up", ("up",)), ("down", ("down",))],
)
def test_modes_select_the_factor_sides_plus_heads(compressed, mode, sides):
    summary = set_trainable(compressed, mode)
    trainable = {n for n, p in compressed.named_parameters() if p.requires_grad}
    expected = factor_param_names(compressed, sides) | HEADS
    assert trainable == expected
    assert "bert.embeddings.word_embeddings.weight" not in trainable
    assert not any("LayerNorm" in n for n in trainable)
    assert summary.trainable_params == sum(p.numel() for n, p in compressed.named_parameters() if n in expected)
    assert summary.factored_layers == sum(isinstance(m, DroneLinear) for m in compressed.modules())


def test_all_trains_everything_and_freeze_heads_freezes_only_heads(compressed):
    set_trainable(compressed, "all")
    assert all(p.requires_grad for p in compressed.parameters())
    summary = set_trainable(compressed, "all", freeze_heads=True)
    frozen = {n for n, p in compressed.named_parameters() if not p.requires_grad}
    assert frozen == HEADS
    assert summary.head_params == sum(p.numel() for n, p in compressed.named_parameters() if n in HEADS)


def test_factored_layers_are_chosen_by_type_not_name(tok):
    """A layer left dense keeps its dense weight frozen in "factors" mode, whatever its name."""
    dense = dense_classifier()
    cfg = drone_hf.DroneConfig(
        param_ratio=0.5,
        dataset=CALIBRATION_TEXTS,
        tokenizer=tok,
        modules_to_not_convert=["encoder.layer.1.attention.self.query"],
    )
    model = drone_hf.compress(dense, cfg, show_progress=False)
    set_trainable(model, "factors")
    kept_dense = model.bert.encoder.layer[1].attention.self.query
    assert isinstance(kept_dense, torch.nn.Linear) and not kept_dense.weight.requires_grad
    assert model.bert.encoder.layer[0].attention.self.query.down.weight.requires_grad


def test_tied_lm_head_counts_as_embeddings(tok):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    drone_hf.compress(
        model, drone_hf.DroneConfig(param_ratio=0.5, dataset=CALIBRATION_TEXTS, tokenizer=tok), show_progress=False
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    summary = set_trainable(model, "factors")
    assert not model.transformer.wte.weight.requires_grad  # the tied head does not unfreeze 30522 x 32 embeddings
    assert summary.head_params == 0


def test_bad_input_names_the_fix(compressed):
    with pytest.raises(ValueError, match=r"use one of \['factors', 'all', 'up', 'down'\]"):
        set_trainable(compressed, "lora")
    with pytest.raises(ValueError, match="Compress it first"):
        set_trainable(dense_classifier(), "factors")
    with pytest.raises(ValueError, match="use one of"):
        SelectTrainableCallback("everything")


def test_callback_trains_only_the_chosen_side_and_logs_it(tok, tmp_path, compressed):
    """All parameters trainable when the Trainer builds its optimizer; the callback's choice wins."""
    before = snapshot(compressed)
    cb = SelectTrainableCallback("up")
    trainer = make_trainer(compressed, tok, classification_dataset(tok), tmp_path, callbacks=[cb])
    trainer.train()
    moved = changed(before, compressed)
    assert moved == factor_param_names(compressed, ("up",)) | HEADS
    logged = [h for h in trainer.state.log_history if "drone/trainable_params" in h]
    assert len(logged) == 1 and logged[0]["drone/trainable_params"] == cb.summary.trainable_params
    assert logged[0]["drone/trainable_fraction"] == pytest.approx(cb.summary.trainable_fraction)


def test_callback_adds_parameters_frozen_when_the_optimizer_was_built(tok, tmp_path, compressed):
    """Only the head trains when Trainer builds the optimizer; "factors" must still move the factors."""
    for n, p in compressed.named_parameters():
        p.requires_grad_(n in HEADS)
    before = snapshot(compressed)
    trainer = make_trainer(
        compressed, tok, classification_dataset(tok), tmp_path, callbacks=[SelectTrainableCallback("factors")]
    )
    trainer.train()
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    factors = factor_param_names(compressed)
    params = dict(compressed.named_parameters())
    assert all(id(params[n]) in held for n in factors)
    assert changed(before, compressed) == factors | HEADS
    # Trainer's weight-decay split is kept: biases join the no-decay group
    no_decay = {id(p) for p in trainer.optimizer.param_groups[1]["params"]}
    bias = next(n for n in factors if n.endswith("up.bias"))
    assert id(params[bias]) in no_decay


def test_a_run_that_unfreezes_resumes_exactly_from_its_checkpoint(tok, tmp_path, compressed):
    """The trainable set is chosen before the optimizer is built (on_init_end), so a resumed run's
    optimizer, into which Trainer loads the saved state before on_train_begin, holds the same
    parameters in the same order as the one that saved it."""
    def start():
        model = copy.deepcopy(compressed)
        set_trainable(model, "up")  # e.g. an earlier stage trained only `up`
        return model

    settings = dict(max_steps=4, learning_rate=1e-3, weight_decay=0.01, save_strategy="steps", save_steps=2)
    model = start()
    make_trainer(model, tok, classification_dataset(tok), tmp_path, callbacks=[SelectTrainableCallback("factors")],
                 **settings).train()
    resumed = start()
    make_trainer(resumed, tok, classification_dataset(tok), tmp_path / "again",
                 callbacks=[SelectTrainableCallback("factors")], **settings).train(
        resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))
    final = dict(model.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in resumed.named_parameters())


def test_a_run_that_unfreezes_resumes_exactly_when_added_with_add_callbacks(tok, tmp_path, compressed):
    """add_callbacks attaches after the Trainer fired on_init_end, where the trainable set is chosen before
    the optimizer exists: it fires it, so the resumed optimizer matches the saved one here too."""
    from drone_hf.training import add_callbacks

    def run(folder, **resume):
        model = copy.deepcopy(compressed)
        set_trainable(model, "up")
        trainer = make_trainer(model, tok, classification_dataset(tok), folder, max_steps=4, learning_rate=1e-3,
                               weight_decay=0.01, save_strategy="steps", save_steps=2)
        add_callbacks(trainer, SelectTrainableCallback("factors"))
        trainer.train(**resume)
        return dict(model.named_parameters())

    final = run(tmp_path)
    resumed = run(tmp_path / "again", resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))
    assert all(torch.equal(p, final[n]) for n, p in resumed.items())


@pytest.mark.parametrize("targets", [["value"], ["query", "key"]], ids=["with-linear", "attention-only"])
def test_query_key_compressed_attention_trains_with_the_factors(tok, targets):
    """compress_attention=True narrows the query/key projections: "factors" trains them with the
    factored layers, and an attention-only compressed model is a compressed model, not refused."""
    from drone_hf.modules.attention import DroneAttention

    torch.manual_seed(0)
    model = drone_hf.compress(dense_classifier(), drone_hf.DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tok, allocation="uniform", compress_attention=True,
        target_modules=targets), show_progress=False)
    attention = [m for m in model.modules() if isinstance(m, DroneAttention)]
    assert len(attention) == 2
    set_trainable(model, "factors")
    qk = {id(p) for m in attention for proj in (m.query_proj, m.key_proj) for p in proj.parameters()}
    factors = {id(p) for m in model.modules() if isinstance(m, DroneLinear) for p in m.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in qk | factors or name in HEADS), name
    set_trainable(model, "down")
    assert not any(p.requires_grad for m in attention for p in m.query_proj.parameters())


def test_callback_refuses_a_peft_model(tok, tmp_path, compressed):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(compressed), LoraConfig(r=2, target_modules=["classifier"]))
    with pytest.raises(ValueError, match="PEFT already chose what trains"):
        SelectTrainableCallback("factors").on_train_begin(None, None, None, model=peft_model)
