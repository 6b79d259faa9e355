"""Progressive rank schedule: the cut re-solves the current weights, and the Trainer keeps training."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS
from trainer_helpers import (
    classification_dataset,
    compressed_classifier,
    dense_classifier,
    make_trainer,
    training_args,
)
from transformers import AutoModelForSequenceClassification

from drone_hf import DroneLinear
from drone_hf.allocation import uniform_rank
from drone_hf.solver import decompose
from drone_hf.training import CompressionStatsCallback, ProgressiveRankCallback, add_callbacks, lower_ranks
from drone_hf.training.progressive import final_ranks_for, input_grams, stage_ranks


@pytest.fixture(scope="module")
def pristine(tok):
    return compressed_classifier(tok)[1]


def ranks_of(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, DroneLinear)}


def test_stage_ranks_interpolate_and_end_at_the_final_budget():
    start, final = {"a": 16, "b": 10}, {"a": 4, "b": 10}
    assert stage_ranks(start, final, 1, 3) == {"a": 12, "b": 10}
    assert stage_ranks(start, final, 2, 3) == {"a": 8, "b": 10}
    assert stage_ranks(start, final, 3, 3) == final


def test_final_ranks_from_a_ratio_or_names(pristine):
    layers = {n: m for n, m in pristine.named_modules() if isinstance(m, DroneLinear)}
    by_ratio = final_ranks_for(layers, pristine, 0.25, None)
    assert by_ratio == {n: min(m.rank, uniform_rank(m.out_features, m.in_features, 0.25)) for n, m in layers.items()}
    named = final_ranks_for(layers, pristine, None, {"encoder.layer.0.attention.self.query": 2})
    assert named["bert.encoder.layer.0.attention.self.query"] == 2
    assert (
        named["bert.encoder.layer.1.attention.self.query"] == layers["bert.encoder.layer.1.attention.self.query"].rank
    )
    with pytest.raises(ValueError, match="exactly one final budget"):
        final_ranks_for(layers, pristine, 0.3, {"x": 1})
    with pytest.raises(ValueError, match="not a factored layer"):
        final_ranks_for(layers, pristine, None, {"encoder.layer.0.attention.self.nope": 2})
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        final_ranks_for(layers, pristine, 1.5, None)


def test_lower_ranks_is_the_drone_optimum_of_the_current_weights(tok, pristine):
    model = copy.deepcopy(pristine).double()
    name = "bert.encoder.layer.0.intermediate.dense"
    layer = model.get_submodule(name)
    with torch.no_grad():  # pretend training moved the factors
        layer.up.weight.add_(0.05 * torch.randn_like(layer.up.weight))
    down_param, up_param = layer.down.weight, layer.up.weight
    optimizer = torch.optim.AdamW(model.parameters())
    model(**tok(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)).logits.sum().backward()
    optimizer.step()
    assert down_param in optimizer.state
    current = layer.merged_weight().detach().clone()
    batches = [dict(tok(CALIBRATION_TEXTS, return_tensors="pt", padding=True))]
    gram = input_grams(model, {name: layer}, batches)[name]
    k = layer.rank - 3
    errors = lower_ranks(model, {name: k}, batches, optimizer)
    expected = decompose(current, gram).factors(k)
    assert layer.rank == k and tuple(layer.down.weight.shape) == (k, layer.in_features)
    assert layer.down.weight is down_param and layer.up.weight is up_param  # the optimizer still holds them
    assert down_param not in optimizer.state and up_param not in optimizer.state  # moments of the old shape dropped
    torch.testing.assert_close(layer.merged_weight(), expected.up @ expected.down)
    assert errors[name] == pytest.approx(expected.relative_error)
    record = model.config.quantization_config
    assert record.ranks["encoder.layer.0.intermediate.dense"] == k
    assert record.relative_errors["encoder.layer.0.intermediate.dense"] is None


def test_lower_ranks_without_data_is_the_svd_of_the_product(pristine):
    model = copy.deepcopy(pristine).double()
    name = "bert.encoder.layer.1.output.dense"
    layer = model.get_submodule(name)
    current = layer.merged_weight().detach().clone()
    assert lower_ranks(model, {name: 3}, None, method="svd") == {name: None}
    u, s, vh = torch.linalg.svd(current)
    torch.testing.assert_close(layer.merged_weight(), (u[:, :3] * s[:3]) @ vh[:3])
    assert lower_ranks(model, {name: 5}, None, method="svd") == {}  # never raises a rank
    with pytest.raises(ValueError, match="re-solves on data"):
        lower_ranks(model, {name: 2}, None, method="drone")


def test_lower_ranks_takes_base_relative_names_and_refuses_unknown_ones(pristine):
    """The record and final_ranks name layers relative to the base model; lower_ranks accepted only
    full names and silently cut nothing for anything else, typos included."""
    model = copy.deepcopy(pristine)
    full = "bert.encoder.layer.0.attention.self.query"
    assert model.get_submodule(full).rank > 2
    assert set(lower_ranks(model, {"encoder.layer.0.attention.self.query": 2}, method="svd")) == {full}
    assert model.get_submodule(full).rank == 2
    assert model.config.quantization_config.ranks["encoder.layer.0.attention.self.query"] == 2
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention.self.qery', which is not a factored layer"):
        lower_ranks(model, {"bert.encoder.layer.0.attention.self.qery": 2}, method="svd")


def test_schedule_in_a_trainer_run_reaches_the_final_ranks_and_saves_them(tok, tmp_path, pristine):
    model = copy.deepcopy(pristine)
    start = ranks_of(model)
    cb = ProgressiveRankCallback(final_param_ratio=0.25, num_stages=2, start=0.2, end=0.6, calibration_samples=8)
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path, max_steps=6)
    add_callbacks(trainer, cb, CompressionStatsCallback())
    trainer.train()
    layers = {n: model.get_submodule(n) for n in start}
    final = {n: min(r, uniform_rank(layers[n].out_features, layers[n].in_features, 0.25)) for n, r in start.items()}
    assert cb.schedule == {2: 1, 4: 2}  # round(6 x 0.4), round(6 x 0.6)
    assert [h["step"] for h in cb.history] == [2, 4]
    assert cb.history[0]["ranks"] == stage_ranks(start, final, 1, 2)
    assert ranks_of(model) == final and final != start
    logged = {h["step"]: h for h in trainer.state.log_history if "drone/progressive_stage" in h}
    assert sorted(logged) == [2, 4] and logged[4]["drone/progressive_stage"] == 2
    assert logged[4]["drone/rank_mean"] == pytest.approx(sum(final.values()) / len(final))  # the stats follow
    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert ranks_of(reloaded) == final


def test_callback_validates_its_arguments():
    with pytest.raises(ValueError, match="exactly one of final_param_ratio"):
        ProgressiveRankCallback()
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        ProgressiveRankCallback(final_param_ratio=0.3, start=0.7, end=0.5)
    with pytest.raises(ValueError, match="num_stages"):
        ProgressiveRankCallback(final_param_ratio=0.3, num_stages=0)
    with pytest.raises(ValueError, match="'drone'"):
        ProgressiveRankCallback(final_param_ratio=0.3, method="qr")


def test_compress_select_and_progressive_in_one_run(tok, tmp_path):
    """Dense model in, factored model at the final budget out: the three callbacks compose in order."""
    import drone_hf
    from drone_hf.training import CompressOnTrainBeginCallback, SelectTrainableCallback

    model = dense_classifier()
    schedule = ProgressiveRankCallback(final_param_ratio=0.25, num_stages=1, start=0.0, end=0.5, method="svd")
    callbacks = [
        # uniform: every layer factored (greedy on 8 texts may keep some dense); this test is the composition
        CompressOnTrainBeginCallback(drone_hf.DroneConfig(param_ratio=0.5, num_samples=8, allocation="uniform")),
        SelectTrainableCallback("factors"),
        schedule,
    ]
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path, callbacks=callbacks, max_steps=4)
    trainer.train()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DroneLinear)}
    assert len(layers) == 12 and list(schedule.schedule) == [2]
    assert all(m.rank == uniform_rank(m.out_features, m.in_features, 0.25) for m in layers.values())
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad  # "factors" held through the cuts
    assert model.get_submodule("bert.encoder.layer.0.attention.self.query").down.weight.requires_grad


def test_load_best_model_at_end_compares_only_checkpoints_at_the_final_ranks(tok, tmp_path, pristine):
    """A checkpoint saved before a cut holds larger factors: it must not win "best" (loading it into the cut
    model fails on a size mismatch at the end of the run). The first evaluation scores highest here."""
    from transformers import DataCollatorWithPadding, Trainer

    model = copy.deepcopy(pristine)
    start = ranks_of(model)
    cb = ProgressiveRankCallback(final_param_ratio=0.25, num_stages=1, start=0.4, end=0.5, calibration_samples=8)
    scores = iter([3.0, 2.0, 1.0])  # evaluations at steps 2, 4, 6: each worse than the one before
    data = classification_dataset(tok)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                           save_steps=2, load_best_model_at_end=True, metric_for_best_model="score",
                           greater_is_better=True, per_device_eval_batch_size=8),
        train_dataset=data, eval_dataset=data, data_collator=DataCollatorWithPadding(tok), processing_class=tok,
        compute_metrics=lambda _: {"score": next(scores)}, callbacks=[cb],
    )
    trainer.train()
    assert cb.schedule == {3: 1}
    final = ranks_of(model)
    assert final != start and all(final[n] <= start[n] for n in start)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")  # the best after the cut, not step 2's
    assert trainer.state.best_metric == 2.0


# --- resuming a progressive run from its Trainer checkpoints ----------------------------------------------------

RESUME = dict(max_steps=6, learning_rate=1e-3, weight_decay=0.01, save_strategy="steps", save_steps=1)


def schedule_2_4() -> ProgressiveRankCallback:
    return ProgressiveRankCallback(final_param_ratio=0.25, num_stages=2, start=0.2, end=0.6, calibration_samples=8)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def uninterrupted(tok, tmp_path_factory, pristine):
    """A 6-step run cutting at steps 2 and 4, with a checkpoint after every step."""
    folder = tmp_path_factory.mktemp("progressive")
    model, cb = copy.deepcopy(pristine), schedule_2_4()
    trainer = make_trainer(model, tok, classification_dataset(tok), folder, callbacks=[cb], **RESUME)
    trainer.train()
    assert cb.schedule == {2: 1, 4: 2}
    return folder / "trainer", model, cb, losses(trainer)


@pytest.mark.parametrize(
    ("step", "restore"),
    [(1, False), (2, False), (3, False), (5, False), (3, True)],
    ids=["before-the-cuts", "at-a-cut", "between-cuts", "after-the-cuts", "between-cuts-restore-callback-states"],
)
def test_a_progressive_run_resumes_exactly_from_any_checkpoint(tok, tmp_path, pristine, uninterrupted, step, restore):
    """Resuming with the same model and callback gives the uninterrupted run, bit for bit. After a cut
    Trainer loaded the thinner factors into the model at its starting ranks (a size mismatch before any
    callback event); before a cut the callback refused, and its advice (resume without it) skipped the
    cuts still to come."""
    checkpoints, final_model, cb, final_losses = uninterrupted
    model, resumed_cb = copy.deepcopy(pristine), schedule_2_4()
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path, callbacks=[resumed_cb],
                           **RESUME | {"restore_callback_states_from_checkpoint": restore})
    trainer.train(resume_from_checkpoint=str(checkpoints / f"checkpoint-{step}"))
    final = dict(final_model.named_parameters())
    params = dict(model.named_parameters())
    assert params.keys() == final.keys() and all(torch.equal(p, final[n]) for n, p in params.items())
    assert ranks_of(model) == ranks_of(final_model)
    assert model.config.quantization_config.ranks == final_model.config.quantization_config.ranks  # saves right
    assert losses(trainer) == final_losses
    live = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressiveRankCallback))
    assert live.history == cb.history and live.schedule == cb.schedule
    assert not model._load_state_dict_pre_hooks  # the resize-on-load hook does not outlive the resume


def test_a_progressive_run_added_with_add_callbacks_resumes_too(tok, tmp_path, pristine, uninterrupted):
    """add_callbacks attaches after the Trainer's on_init_end, where the resize-on-load hook is armed."""
    checkpoints, final_model, _, _ = uninterrupted
    model = copy.deepcopy(pristine)
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path, **RESUME)
    add_callbacks(trainer, schedule_2_4(), CompressionStatsCallback())
    trainer.train(resume_from_checkpoint=str(checkpoints / "checkpoint-3"))
    final = dict(final_model.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in model.named_parameters())


def test_a_progressive_run_resumes_from_the_checkpoint_model_as_well(tok, tmp_path, uninterrupted):
    """from_pretrained(checkpoint) already has the cut ranks: the schedule continues from the state it saved."""
    checkpoints, final_model, _, _ = uninterrupted
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints / "checkpoint-3")
    make_trainer(model, tok, classification_dataset(tok), tmp_path, callbacks=[schedule_2_4()], **RESUME).train(
        resume_from_checkpoint=str(checkpoints / "checkpoint-3"))
    final = dict(final_model.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in model.named_parameters())


def test_a_resume_refuses_what_would_not_continue_the_same_schedule(tok, tmp_path, pristine, uninterrupted):
    checkpoints = uninterrupted[0]
    data = classification_dataset(tok)
    other = ProgressiveRankCallback(final_param_ratio=0.25, num_stages=3, start=0.2, end=0.6, calibration_samples=8)
    with pytest.raises(ValueError, match=r"made with num_stages=2 \(now 3\).*same ProgressiveRankCallback arguments"):
        make_trainer(copy.deepcopy(pristine), tok, data, tmp_path / "a", callbacks=[other], **RESUME).train(
            resume_from_checkpoint=str(checkpoints / "checkpoint-1"))
    # a checkpoint of a run without the schedule: the stages done are unknown
    make_trainer(copy.deepcopy(pristine), tok, data, tmp_path / "plain", **RESUME | {"max_steps": 1}).train()
    with pytest.raises(ValueError, match="holds no ProgressiveRankCallback schedule.*from_pretrained"):
        make_trainer(copy.deepcopy(pristine), tok, data, tmp_path / "b", callbacks=[schedule_2_4()], **RESUME).train(
            resume_from_checkpoint=str(tmp_path / "plain" / "trainer" / "checkpoint-1"))
    # a model compressed below the checkpoint's ranks cannot be the one the run started from
    thinner = compressed_classifier(tok, param_ratio=0.2)[1]
    with pytest.raises(ValueError, match="above the model's rank.*a progressive schedule only lowers ranks"):
        make_trainer(thinner, tok, data, tmp_path / "c", callbacks=[schedule_2_4()], **RESUME).train(
            resume_from_checkpoint=str(checkpoints / "checkpoint-1"))


def test_a_resume_checks_the_model_is_at_the_ranks_of_the_stages_done(pristine, uninterrupted):
    """The model's ranks must be those of the last stage done (here: the starting ranks, one stage later)."""
    checkpoints = uninterrupted[0]
    saved = json.loads((checkpoints / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"]
    state = SimpleNamespace(global_step=3, stateful_callbacks=saved)
    layers = {n: m for n, m in copy.deepcopy(pristine).named_modules() if isinstance(m, DroneLinear)}
    with pytest.raises(ValueError, match=r"done 1 of 2 stage\(s\), but the model's ranks differ"):
        schedule_2_4()._resume(state, layers)


@pytest.mark.parametrize("step", [1, 3], ids=["before-the-cut", "after-the-cut"])
def test_a_run_compressed_at_train_begin_with_a_schedule_resumes_from_the_checkpoint_model(tok, tmp_path, step):
    """CompressOnTrainBeginCallback's resume route (from_pretrained(checkpoint), without that callback) keeps
    the schedule: the other callbacks stay attached and it continues, cut included, as the uninterrupted run."""
    import drone_hf
    from drone_hf.training import CompressOnTrainBeginCallback, SelectTrainableCallback

    def callbacks():
        return [SelectTrainableCallback("factors"),
                ProgressiveRankCallback(final_param_ratio=0.25, num_stages=1, start=0.0, end=0.5, method="svd")]

    config = drone_hf.DroneConfig(param_ratio=0.5, num_samples=8, allocation="uniform")
    settings = dict(max_steps=4, learning_rate=1e-3, weight_decay=0.01, save_strategy="steps", save_steps=1)
    data = classification_dataset(tok)
    model = dense_classifier()
    make_trainer(model, tok, data, tmp_path, callbacks=[CompressOnTrainBeginCallback(config), *callbacks()],
                 **settings).train()
    checkpoint = tmp_path / "trainer" / f"checkpoint-{step}"  # compressed; the cut is at step 2
    resumed = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    make_trainer(resumed, tok, data, tmp_path / "again", callbacks=callbacks(), **settings).train(
        resume_from_checkpoint=str(checkpoint))
    final = dict(model.named_parameters())
    assert ranks_of(resumed) == ranks_of(model) and all(torch.equal(p, final[n]) for n, p in resumed.named_parameters())
