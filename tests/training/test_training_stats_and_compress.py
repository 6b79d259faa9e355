"""Compression statistics in the Trainer logs, and compressing inside a training run."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from attention_models import build
from tiny_models import CALIBRATION_TEXTS
from trainer_helpers import classification_dataset, compressed_classifier, dense_classifier, make_trainer
from transformers import AutoModelForSequenceClassification, DefaultFlowCallback, TrainerCallback

import drone_hf
from drone_hf import DroneLinear
from drone_hf.modules.attention import drone_attention_modules
from drone_hf.training import (
    CompressionStatsCallback,
    CompressOnTrainBeginCallback,
    SelectTrainableCallback,
    add_callbacks,
    compression_stats,
)
from drone_hf.training.callbacks import _check_plain_run


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: records every logs dict it is handed."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture(scope="module")
def pair(tok):
    return compressed_classifier(tok)


def test_stats_match_the_module_tree(pair):
    dense, model = pair
    stats = compression_stats(model, per_layer_ranks=True)
    layers = [m for m in model.modules() if isinstance(m, DroneLinear)]
    ranks = [m.rank for m in layers]
    report = drone_hf.report(model)
    assert stats["drone/factored_layers"] == len(layers) == 12
    assert stats["drone/params"] == sum(p.numel() for p in model.parameters())
    assert stats["drone/params_dense"] == sum(p.numel() for p in dense.parameters())
    assert stats["drone/targeted_param_ratio"] == pytest.approx(report.targeted_param_ratio)
    assert stats["drone/model_param_ratio"] == pytest.approx(report.model_param_ratio)
    assert (stats["drone/rank_min"], stats["drone/rank_max"]) == (min(ranks), max(ranks))
    assert stats["drone/rank_mean"] == pytest.approx(sum(ranks) / len(ranks))
    assert stats["drone/rank/encoder.layer.0.intermediate.dense"] == model.bert.encoder.layer[0].intermediate.dense.rank
    assert "drone/measured_speedup" not in stats  # a param_ratio budget measures no speed
    assert all(isinstance(v, float) for v in stats.values())


def test_measured_speedup_is_logged_only_while_it_is_true(pair):
    model = copy.deepcopy(pair[1])
    record = model.config.quantization_config
    record.allocation_result = dict(record.allocation_result or {}, measured_speedup=2.31)
    assert compression_stats(model)["drone/measured_speedup"] == pytest.approx(2.31)
    layer = model.bert.encoder.layer[0].attention.self.query
    record.ranks = dict(record.ranks, **{"encoder.layer.0.attention.self.query": layer.rank + 1})  # out of date
    assert "drone/measured_speedup" not in compression_stats(model)


def test_stats_reach_integrations_through_add_callbacks(tok, tmp_path, pair):
    model = copy.deepcopy(pair[1])
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path, max_steps=3)
    recorder = Recorder()
    handler = trainer.callback_handler  # where Trainer puts report_to integrations: right after DefaultFlowCallback
    handler.callbacks.insert(
        1 + next(i for i, c in enumerate(handler.callbacks) if isinstance(c, DefaultFlowCallback)), recorder
    )
    stats_cb = CompressionStatsCallback()
    add_callbacks(trainer, stats_cb, SelectTrainableCallback("factors"))
    assert handler.callbacks.index(stats_cb) < handler.callbacks.index(recorder)
    trainer.train()
    with_stats = [logs for logs in recorder.logs if "drone/factored_layers" in logs]
    assert len(with_stats) == 1, "stats are logged once while they do not change"
    first = with_stats[0]
    assert first["drone/trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert first["drone/trainable_params"] < first["drone/params"]
    assert "loss" in first  # added to a regular training log
    assert any("drone/rank_mean" in h for h in trainer.state.log_history)


def test_every_log_repeats_the_stats(tok, tmp_path, pair):
    trainer = make_trainer(copy.deepcopy(pair[1]), tok, classification_dataset(tok), tmp_path, max_steps=3)
    add_callbacks(trainer, CompressionStatsCallback(every_log=True))
    trainer.train()
    assert sum("drone/params" in h for h in trainer.state.log_history) == len(trainer.state.log_history)


def test_a_resumed_run_logs_the_stats_once_at_its_first_log(tok, tmp_path, pair):
    """The decision in CompressionStatsCallback's docstring: each train() call, fresh or resumed, shows
    the stats once, at its first log, whether the resume runs on a new Trainer (a new process) or on the
    same one. On the same Trainer the callback remembered the first call's entries and the resumed
    run's logs had none."""
    settings = dict(max_steps=3, save_strategy="steps", save_steps=1)
    data = classification_dataset(tok)
    checkpoint = str(tmp_path / "trainer" / "checkpoint-1")

    def stats_logs(recorder: Recorder) -> list[int]:
        return [i for i, logs in enumerate(recorder.logs) if "drone/params" in logs]

    trainer, recorder = make_trainer(copy.deepcopy(pair[1]), tok, data, tmp_path, **settings), Recorder()
    add_callbacks(trainer, CompressionStatsCallback(), recorder)
    trainer.train()
    assert stats_logs(recorder) == [0]
    recorder.logs.clear()
    trainer.train(resume_from_checkpoint=checkpoint)  # the same Trainer, the same callback
    assert stats_logs(recorder) == [0]
    # the checkpoint's history (step 1) and this run's first log (step 2) both hold them
    assert [h["step"] for h in trainer.state.log_history if "drone/params" in h] == [1, 2]

    fresh, recorder = make_trainer(copy.deepcopy(pair[1]), tok, data, tmp_path / "again", **settings), Recorder()
    add_callbacks(fresh, CompressionStatsCallback(), recorder)
    fresh.train(resume_from_checkpoint=checkpoint)  # as a new process would
    assert stats_logs(recorder) == [0]


def test_compress_on_train_begin_then_fine_tune_and_reload(tok, tmp_path):
    model = dense_classifier()
    train_ds = classification_dataset(tok, n=12)
    # uniform: all 10 rows calibrate and all 12 layers are factored (greedy would hold rows out)
    config = drone_hf.DroneConfig(param_ratio=0.5, num_samples=10, allocation="uniform")
    compress_cb = CompressOnTrainBeginCallback(config)

    class Snap(TrainerCallback):  # runs right after compression: the factors as compression left them
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            self.factors = {n: p.detach().clone() for n, p in model.named_parameters() if ".down." in n or ".up." in n}
            self.held = {id(p) for g in optimizer.param_groups for p in g["params"]}

    snap = Snap()
    trainer = make_trainer(model, tok, train_ds, tmp_path, callbacks=[compress_cb, snap], max_steps=3)
    dense_ids = {id(p) for p in model.parameters()}
    trainer.train()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DroneLinear)}
    assert len(layers) == 12 and compress_cb.compressed
    record = model.config.quantization_config
    assert record.calibration["num_texts"] == 10  # 10 training rows, drawn from the training set
    assert record.calibration["dataset"] == "<list>"
    live = {id(p) for p in model.parameters()}
    assert snap.held <= live  # the optimizer holds no departed dense weight...
    assert all(id(p) in snap.held for p in model.parameters())  # ...and every factor
    assert not (snap.held & (dense_ids - live))
    params = dict(model.named_parameters())
    assert all(not torch.equal(snap.factors[n], params[n].detach()) for n in snap.factors if n.endswith("down.weight"))
    assert any("drone/factored_layers" in h for h in trainer.state.log_history)

    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, DroneLinear)} == {
        n: m.rank for n, m in layers.items()
    }
    batch = tok(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits)


def test_a_run_compressed_at_train_begin_resumes_exactly_from_its_checkpoint(tok, tmp_path):
    """The callback's advice for a resume (load the checkpoint, resume without the callback) must give
    the uninterrupted run's weights: the optimizer state saved after compression has to line up,
    position by position, with the optimizer Trainer builds for the reloaded model (the factors were
    appended after the departed dense weights: Adam moments landed on the wrong parameters, or the
    load failed on their shapes)."""
    train_ds = classification_dataset(tok, n=16)
    config = drone_hf.DroneConfig(param_ratio=0.5, num_samples=10, allocation="uniform")
    settings = dict(max_steps=4, learning_rate=1e-3, weight_decay=0.01, save_strategy="steps", save_steps=2)
    model = dense_classifier()
    make_trainer(model, tok, train_ds, tmp_path, callbacks=[CompressOnTrainBeginCallback(config)], **settings).train()
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    resumed = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    make_trainer(resumed, tok, train_ds, tmp_path / "again", **settings).train(resume_from_checkpoint=str(checkpoint))
    final = dict(model.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in resumed.named_parameters())


def test_resuming_with_the_callback_still_attached_is_refused_before_the_load(tok, tmp_path):
    """Resumed with the setup that started the run (a dense model, the callback attached), Trainer loads
    the compressed checkpoint into the dense model (most keys unmatched under its strict=False), and the
    run died in torch's optimizer load on group sizes. It now stops at the load, saying what to do, with
    the dense model untouched."""
    config = drone_hf.DroneConfig(param_ratio=0.5, num_samples=8, allocation="uniform")
    settings = dict(max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(dense_classifier(), tok, classification_dataset(tok), tmp_path,
                 callbacks=[CompressOnTrainBeginCallback(config)], **settings).train()
    model = dense_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, tok, classification_dataset(tok), tmp_path / "again",
                           callbacks=[CompressOnTrainBeginCallback(config)], **settings)
    with pytest.raises(ValueError, match=r"DRONE-compressed checkpoint.*from_pretrained\(checkpoint\).*without "
                                         "CompressOnTrainBeginCallback"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-1"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_resuming_an_attention_only_run_with_the_callback_attached_is_refused_too(tok, tmp_path):
    """A run that compressed only attention (query/key heads narrowed, no linear layer factored) writes
    checkpoints with no factor keys at all: the refusal missed them, and torch's load then died on
    query/key size mismatches, after copying every tensor that did fit into the dense model. Refused at
    the load now, with the same advice, which works: from_pretrained(checkpoint) resumes without it."""
    config = drone_hf.DroneConfig(num_samples=8, compress_attention=True, attention_rank=4,
                                  target_modules=["query", "key"])
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1)
    data = classification_dataset(tok)
    make_trainer(dense_classifier(), tok, data, tmp_path, callbacks=[CompressOnTrainBeginCallback(config)],
                 **settings).train()
    checkpoint = tmp_path / "trainer" / "checkpoint-1"
    record = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert record["attention_ranks"] and not record["ranks"]  # attention alone, as the checkpoint records it
    model = dense_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, tok, data, tmp_path / "again", callbacks=[CompressOnTrainBeginCallback(config)],
                           **settings)
    with pytest.raises(ValueError, match=r"DRONE-compressed checkpoint \(e.g. 'bert.encoder.layer.0.attention.self' "
                                         r"has compressed query/key heads\).*from_pretrained\(checkpoint\).*without "
                                         "CompressOnTrainBeginCallback"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    resumed = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    make_trainer(resumed, tok, data, tmp_path / "advised", **settings).train(resume_from_checkpoint=str(checkpoint))


#: case -> (family, DroneConfig fields): every kind of DRONE checkpoint, attention alone in every family
#: (GPT-2's target is its fused c_attn, which the attention stage splits; its value is then factored).
CHECKPOINT_KINDS = {
    "bert-factored": ("bert", dict(param_ratio=0.5)),
    "bert-factored+attention": ("bert", dict(param_ratio=0.5, compress_attention=True)),
    "gpt2-factored+attention": ("gpt2", dict(param_ratio=0.5, compress_attention=True)),
    **{f"{family}-attention": (family, dict(compress_attention=True, target_modules=list(absorbed)))
       for family, absorbed in {"bert": ("query", "key"), "roberta": ("query", "key"),
                                "distilbert": ("q_lin", "k_lin"), "mpnet": ("q", "k"), "gpt2": ("c_attn",)}.items()},
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_KINDS))
def test_the_load_refusal_knows_every_kind_of_drone_checkpoint(tok, case):
    """What Trainer's resume does (model.load_state_dict(checkpoint's tensors, strict=False)) on the dense
    model the callback armed: every kind of compressed checkpoint stops before a tensor is copied."""
    family, fields = CHECKPOINT_KINDS[case]
    cfg = drone_hf.DroneConfig(dataset=CALIBRATION_TEXTS, tokenizer=tok, num_samples=8, **fields)
    compressed = drone_hf.compress(build(family), cfg, show_progress=False)
    assert bool(drone_attention_modules(compressed)) == ("attention" in case)
    assert any(isinstance(m, DroneLinear) for m in compressed.modules()) == ("factored" in case or family == "gpt2")
    saved = compressed.state_dict()
    dense = build(family)
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    CompressOnTrainBeginCallback(cfg).on_init_end(None, None, None, model=dense)
    with pytest.raises(ValueError, match=r"DRONE-compressed checkpoint \(e.g. '.+' (is factored|has compressed "
                                         r"query/key heads)\).*without CompressOnTrainBeginCallback"):
        dense.load_state_dict(saved, strict=False)
    assert all(torch.equal(p, before[n]) for n, p in dense.named_parameters())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_load_refusal_lets_a_dense_checkpoint_load(family):
    """The refusal must not take a dense checkpoint of the same model (every key and shape fitting) for a
    compressed one: its tensors load through the armed hook as they would without it."""
    dense, other = build(family), build(family, seed=1)
    CompressOnTrainBeginCallback(drone_hf.DroneConfig(compress_attention=True)).on_init_end(None, None, None,
                                                                                          model=dense)
    result = dense.load_state_dict(other.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    theirs = dict(other.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in dense.named_parameters())


def test_a_dense_checkpoint_is_not_refused_as_a_drone_one_on_resume(tok, tmp_path):
    """Resumed from a dense run's checkpoint with the callback attached, the weights load (no DRONE refusal)
    and the run stops at train begin on the callback's own rule: it compresses at the start of a fresh run."""
    settings = dict(max_steps=1, save_strategy="steps", save_steps=1)
    data = classification_dataset(tok)
    trained = dense_classifier(seed=1)
    make_trainer(trained, tok, data, tmp_path, **settings).train()
    model = dense_classifier()
    trainer = make_trainer(model, tok, data, tmp_path / "again",
                           callbacks=[CompressOnTrainBeginCallback(drone_hf.DroneConfig(compress_attention=True))],
                           **settings)
    with pytest.raises(ValueError, match="runs at the start of a fresh training run, but this run resumes at step 1"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-1"))
    theirs = dict(trained.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in model.named_parameters())


def test_compress_callback_refuses_what_it_cannot_do(tok, tmp_path, pair):
    cb = CompressOnTrainBeginCallback(drone_hf.DroneConfig(param_ratio=0.5))
    args = SimpleNamespace(
        world_size=1, deepspeed=None, fsdp="", torch_compile=False, disable_tqdm=True, weight_decay=0.0
    )
    state = SimpleNamespace(global_step=0)
    with pytest.raises(ValueError, match=r"already DRONE-compressed \(\d+ factored layers"):
        cb.on_train_begin(args, state, None, model=copy.deepcopy(pair[1]))
    attention_only = drone_hf.compress(dense_classifier(), drone_hf.DroneConfig(
        num_samples=8, dataset=CALIBRATION_TEXTS, tokenizer=tok, compress_attention=True, attention_rank=4,
        target_modules=["query", "key"]), show_progress=False)
    with pytest.raises(ValueError, match=r"already DRONE-compressed \(\d+ compressed attention modules"):
        cb.on_train_begin(args, state, None, model=attention_only)  # compressed a second time before
    with pytest.raises(ValueError, match="needs a tokenizer"):
        cb.on_train_begin(args, state, None, model=dense_classifier(), train_dataloader=None, processing_class=None)
    with pytest.raises(ValueError, match="torch_compile=True captured them"):
        _check_plain_run(SimpleNamespace(**{**vars(args), "torch_compile": True}), state, "X")
    with pytest.raises(ValueError, match="world_size=2"):
        _check_plain_run(SimpleNamespace(**{**vars(args), "world_size": 2}), state, "X")
    with pytest.raises(ValueError, match="resumes at step 5"):
        _check_plain_run(args, SimpleNamespace(global_step=5), "X")
    with pytest.raises(ValueError, match="must be a drone_hf.DroneConfig"):
        CompressOnTrainBeginCallback({"param_ratio": 0.5})
    model = dense_classifier()
    with pytest.raises(ValueError):  # nothing changed on failure
        cb.on_train_begin(args, state, None, model=model, processing_class=tok, train_dataloader=None)
    assert not any(isinstance(m, DroneLinear) for m in model.modules())


def test_add_callbacks_rejects_classes(tok, tmp_path, pair):
    trainer = make_trainer(copy.deepcopy(pair[1]), tok, classification_dataset(tok), tmp_path)
    with pytest.raises(ValueError, match="TrainerCallback instances"):
        add_callbacks(trainer, CompressionStatsCallback)
