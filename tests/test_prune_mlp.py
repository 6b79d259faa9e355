"""``DroneConfig(prune_mlp=True)`` end to end: the budget holds, the record matches the layers, a
save/reload is exact, ``dequantize`` gives back the dense architecture with the same function, and
every unsupported combination or damaged record is refused with its fix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cost_model import FlopLatency, fake_end_to_end
from tiny_models import CALIBRATION_TEXTS, sample_inputs, save_tiny
from transformers import AutoModel, AutoModelForCausalLM

import drone_hf
import drone_hf.planner as planner_mod
from drone_hf import DroneConfig
from drone_hf.hub.summary import summarize_checkpoint
from drone_hf.modules.low_rank_linear import dense_weight_of
from drone_hf.modules.mlp_blocks import find_mlp_blocks, layer_shape
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


@pytest.mark.parametrize("arch,auto", [("bert", AutoModel), ("gpt2-lm", AutoModelForCausalLM)])
def test_with_attention_compression_both_records_survive_a_reload(tmp_path, arch, auto):
    """compress_attention and prune_mlp in one greedy run: the allocated Q/K head dimensions and the
    MLP widths are both recorded, and the checkpoint rebuilds both exactly."""
    dense_dir = save_tiny(arch, tmp_path / "dense")
    model = auto.from_pretrained(dense_dir, drone_config=_config(compress_attention=True))
    qc = model.config.quantization_config
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert qc.mlp_widths and qc.attention_ranks
    assert all(0 < r < head_dim for r in qc.attention_ranks.values()), qc.attention_ranks
    _check_record(model)
    out = _out(model)
    model.save_pretrained(tmp_path / "drone")
    reloaded = auto.from_pretrained(tmp_path / "drone")
    rq = reloaded.config.quantization_config
    assert (rq.mlp_widths, rq.attention_ranks) == (qc.mlp_widths, qc.attention_ranks)
    _check_record(reloaded)
    assert torch.equal(_out(reloaded), out)


class RecordingLatency(FlopLatency):
    """The FLOP model, recording the shapes asked for without ranks (the planner's narrowed layers)."""

    shapes: list[tuple[int, int]] = []

    def layer_times(self, out_f, in_f, ranks):
        if not ranks:
            RecordingLatency.shapes.append((out_f, in_f))
        return super().layer_times(out_f, in_f, ranks)


@pytest.mark.parametrize("arch,auto,method", [
    ("llama-gqa-lm", AutoModelForCausalLM, "drone-kfac"),
    ("bert", AutoModel, "drone"),
])
def test_speed_budget_prunes_widths_timed_at_anchors(tmp_path, monkeypatch, arch, auto, method):
    """target_speedup with prune_mlp under the deterministic cost model: narrowed layers are timed only
    at the anchor widths (full, narrowest) and interpolated between; on a cost linear in the width the
    interpolation is exact, so the predicted speedup is the measured one. The target holds, some block
    is pruned, and the result reloads exactly."""
    from drone_hf.width_stage import ANCHOR_STEPS

    RecordingLatency.shapes = []
    monkeypatch.setattr(planner_mod, "LatencyModel", RecordingLatency)
    monkeypatch.setattr(planner_mod, "end_to_end_times", fake_end_to_end(overhead=1e-4))
    dense_dir = save_tiny(arch, tmp_path / "dense")
    model = auto.from_pretrained(dense_dir, drone_config=_config(method=method, param_ratio=None, target_speedup=1.5))
    qc = model.config.quantization_config
    result = qc.allocation_result
    assert qc.mlp_widths and result["pruned_mlp_blocks"] == len(qc.mlp_widths)
    assert result["measured_speedup"] >= 1.5
    assert result["predicted_speedup"] == pytest.approx(result["measured_speedup"], rel=1e-9)
    _check_record(model)
    dense = auto.from_pretrained(dense_dir)
    dense_block = find_mlp_blocks(dense)[0]
    hidden = layer_shape(supported_layers(dense)[dense_block.output][1])[0]
    step, candidates = 8, 6  # width_step(64) = 8; at most 80% of 64 neurons: 6 steps
    anchors = {dense_block.width - step * s for s in [*range(0, candidates + 1, ANCHOR_STEPS), candidates]}
    measured = set(RecordingLatency.shapes)
    assert measured == {(w, hidden) for w in anchors} | {(hidden, w) for w in anchors}, (measured, anchors)
    assert any(r["width"] not in anchors for r in qc.mlp_widths.values())  # an interpolated width was chosen
    out = _out(model)
    model.save_pretrained(tmp_path / "drone")
    reloaded = auto.from_pretrained(tmp_path / "drone")
    assert reloaded.config.quantization_config.mlp_widths == qc.mlp_widths
    assert torch.equal(_out(reloaded), out)


def test_loss_budget_prunes_widths_within_the_allowance(tmp_path, monkeypatch):
    """max_loss with prune_mlp: the measured held-out loss increase stays within max_loss, widths are
    recorded, and a tighter allowance keeps at least as many neurons."""
    monkeypatch.setattr(planner_mod, "LatencyModel", FlopLatency)
    dense_dir = save_tiny("bert", tmp_path / "dense")
    kept = {}
    for max_loss in (0.05, 1e-6):
        model = AutoModel.from_pretrained(dense_dir, drone_config=_config(param_ratio=None, max_loss=max_loss))
        qc = model.config.quantization_config
        assert qc.allocation_result["measured_loss_increase"] <= max_loss
        _check_record(model)
        kept[max_loss] = sum(r["width"] for r in (qc.mlp_widths or {}).values()) + 64 * (
            len(find_mlp_blocks(model)) - len(qc.mlp_widths or {}))
    assert kept[1e-6] >= kept[0.05]
    assert kept[0.05] < 64 * 2, "the 0.05 allowance prunes some neurons of the two blocks"


def _kept_rows(narrowed: torch.Tensor, dense: torch.Tensor) -> list[int]:
    """Indices of the dense rows a narrowed input layer kept (row selection is exact)."""
    return [next(j for j in range(dense.shape[0]) if torch.equal(row, dense[j])) for row in narrowed]


@pytest.mark.parametrize("mode", [True, "compensated"])
def test_sequential_re_solves_each_narrowed_output_layer_on_the_compressed_stream(mode, tmp_path, monkeypatch):
    """sequential with prune_mlp: the plan's widths, and block 1's narrowed down_proj is the ridge
    least-squares fit on what the compressed model feeds it, computed here from activations recorded
    independently: block 0 compressed, and in block 1 (compensated) the attention groups factored,
    gate/up dense; plain sequential fits the compressed stream's own down outputs (Ĝ), compensated
    the dense model's (C = X X̂ᵀ). Plain sequential calibrates block 0 on the dense inputs: the
    one-shot narrowed weight. A second run on the same calibration_cache resumes every block and gives
    the same model."""
    from test_compress import build, record_inputs
    from test_compress import config as exact_config

    from drone_hf.calibration import load_texts
    from drone_hf.compress import _split_texts, held_out_count
    from drone_hf.solver.width import WIDTH_DAMP

    dense = build("llama")
    kw = dict(allocation="greedy", param_ratio=0.6, prune_mlp=True)
    seq = drone_hf.compress(copy.deepcopy(dense), exact_config(**kw, sequential=mode, calibration_cache=tmp_path),
                            show_progress=False)
    one = drone_hf.compress(copy.deepcopy(dense), exact_config(**kw), show_progress=False)
    widths = seq.config.quantization_config.mlp_widths
    assert widths == one.config.quantization_config.mlp_widths and "layers.1.mlp" in widths, widths
    assert seq.config.quantization_config.allocation_result["sequential"] == mode
    cfg = exact_config(**kw)
    texts = load_texts(cfg.dataset, cfg.num_samples + held_out_count(dense, cfg), cfg.seed)
    calib, _ = _split_texts(texts, held_out_count(dense, cfg), cfg.seed, cfg.num_samples)

    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0] = copy.deepcopy(seq.model.layers[0])
    if mode == "compensated":
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hybrid.model.layers[1].self_attn.set_submodule(name, seq.model.layers[1].self_attn.get_submodule(name))
    x_hat = record_inputs(hybrid, {"d": hybrid.model.layers[1].mlp.down_proj}, calib)["d"].double()
    x = record_inputs(dense, {"d": dense.model.layers[1].mlp.down_proj}, calib)["d"].double()
    w = dense.model.layers[1].mlp.down_proj.weight.detach().double()
    keep = _kept_rows(seq.model.layers[1].mlp.up_proj.weight.detach(), dense.model.layers[1].mlp.up_proj.weight)
    assert len(keep) == widths["layers.1.mlp"]["width"]
    assert keep == _kept_rows(seq.model.layers[1].mlp.gate_proj.weight.detach(),
                              dense.model.layers[1].mlp.gate_proj.weight)
    gram = x_hat @ x_hat.T
    lam = WIDTH_DAMP * float(gram.diagonal().mean())
    target = (w @ x if mode == "compensated" else w @ x_hat) @ x_hat[keep].T + lam * w[:, keep]
    expected = torch.linalg.solve(gram[keep][:, keep] + lam * torch.eye(len(keep), dtype=torch.float64), target.T).T
    torch.testing.assert_close(seq.model.layers[1].mlp.down_proj.weight.detach().double(), expected,
                               rtol=1e-6, atol=1e-9)
    assert not torch.allclose(seq.model.layers[1].mlp.down_proj.weight, one.model.layers[1].mlp.down_proj.weight)
    assert "layers.0.mlp" in widths
    if mode is True:  # compensated: block 0's attention is factored before its MLP
        torch.testing.assert_close(seq.model.layers[0].mlp.down_proj.weight, one.model.layers[0].mlp.down_proj.weight)

    import drone_hf.sequential as sequential_mod

    ran = []
    replay = sequential_mod.run_block
    monkeypatch.setattr(sequential_mod, "run_block", lambda *a, **k: ran.append(1) or replay(*a, **k))
    again = drone_hf.compress(copy.deepcopy(dense), exact_config(**kw, sequential=mode, calibration_cache=tmp_path),
                              show_progress=False)
    assert not ran, "every block was resumed from the cache, none replayed"
    with torch.no_grad():
        ids = torch.tensor([[3, 7, 11, 2, 5]])
        assert torch.equal(again(input_ids=ids).logits, seq(input_ids=ids).logits)


def test_a_sequential_re_solve_past_max_loss_falls_back_to_the_one_shot_narrowed_blocks(tmp_path, monkeypatch, caplog):
    """max_loss + sequential + prune_mlp: a re-solve that breaks the budget (here every narrowed output
    layer re-solved to 1000x its compensation) is replaced by the one-shot plan, narrowed blocks included, which the
    planner measured within max_loss; the record is the returned model's."""
    import logging

    from drone_hf.width_stage import WidthStage

    monkeypatch.setattr(planner_mod, "LatencyModel", FlopLatency)
    narrowed_from = WidthStage.narrowed_from

    def broken(self, steps, output, stats):
        layers = narrowed_from(self, steps, output, stats)
        out = self.targets[output][0]
        with torch.no_grad():
            layers[out].weight.mul_(1000.0)
        return layers

    monkeypatch.setattr(WidthStage, "narrowed_from", broken)
    dense_dir = save_tiny("bert", tmp_path / "dense")
    cfg = _config(param_ratio=None, max_loss=0.05, sequential="compensated")
    with caplog.at_level(logging.WARNING):
        model = AutoModel.from_pretrained(dense_dir, drone_config=cfg)
    qc = model.config.quantization_config
    result = qc.allocation_result
    assert qc.mlp_widths and result["sequential_kept"] is False and "keeping the one-shot factors" in caplog.text
    assert result["sequential_loss_increase"] > 0.05 >= result["measured_loss_increase"]
    _check_record(model)
    one = AutoModel.from_pretrained(dense_dir, drone_config=_config(param_ratio=None, max_loss=0.05))
    assert one.config.quantization_config.mlp_widths == qc.mlp_widths
    assert torch.equal(_out(model), _out(one))  # the one-shot plan's factors and narrowed layers


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
    summary = report.summary()
    assert summary.startswith(f"{len(qc.mlp_widths)} MLP blocks width-pruned") and "layers factored" not in summary
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert report.dense_model_params == sum(p.numel() for p in dense.parameters())


def _llama():
    from tiny_models import llama_config

    torch.manual_seed(0)
    return llama_config()


@pytest.mark.parametrize("overrides,match", [
    ({"method": "svd"}, "method='svd'"),
    ({"allocation": "uniform"}, "allocation='uniform'"),
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
