"""Layer-sequential compression: each block is solved on the outputs of the compressed blocks before it."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, tokenizer
from test_compress import build, config

import drone_hf
import drone_hf.sequential as sequential_mod
from drone_hf import DroneLinear
from drone_hf.calibration.blocks import find_blocks
from drone_hf.modules import dense_weight_of, resolve_targets

TOK = tokenizer()


def test_each_block_is_optimal_on_what_the_compressed_blocks_feed_it():
    dense = build("bert")
    comp = drone_hf.compress(copy.deepcopy(dense), config(param_ratio=0.4, sequential=True), show_progress=False)
    result = comp.config.quantization_config.allocation_result
    assert result["sequential"] is True
    # the record has the same counts as a one-shot run's (the uniform-sequential route lacked them)
    n_targets = len(resolve_targets(dense, None, None))
    assert result["factored_layers"] == n_targets and result["dense_layers"] == 0
    # Independently: feed block 1 of the DENSE model the outputs of the COMPRESSED block 0 and record
    # what each of its layers sees; the factors in block 1 must be optimal for exactly that data.
    hybrid = copy.deepcopy(dense)
    hybrid.encoder.layer[0] = comp.encoder.layer[0]
    layers = {n: m for n, m in hybrid.encoder.layer[1].named_modules() if isinstance(m, torch.nn.Linear)}
    xs = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n, m in layers.items()]
    with torch.no_grad():
        for t in CALIBRATION_TEXTS:
            enc = TOK(t, return_tensors="pt")
            hybrid(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    for name, dense_layer in layers.items():
        module = comp.encoder.layer[1].get_submodule(name)
        assert isinstance(module, DroneLinear)
        x = torch.cat(xs[name]).T.double()
        w = dense_weight_of(dense_layer).detach().double()
        y = w @ x
        sigma = torch.linalg.svdvals(y)
        optimum = float(sigma[module.rank:].pow(2).sum().sqrt())
        achieved = float(((w - module.merged_weight().detach().double()) @ x).norm())
        assert achieved == pytest.approx(optimum, rel=1e-6, abs=1e-9), name
    # and block 0 saw the same inputs as in one-shot mode: identical factors
    one_shot = drone_hf.compress(copy.deepcopy(dense), config(param_ratio=0.4), show_progress=False)
    for name, m in comp.encoder.layer[0].named_modules():
        if isinstance(m, DroneLinear):
            torch.testing.assert_close(m.merged_weight(), one_shot.encoder.layer[0].get_submodule(name).merged_weight())


def test_block_one_differs_from_one_shot():
    dense = build("bert")
    seq = drone_hf.compress(copy.deepcopy(dense), config(param_ratio=0.3, sequential=True), show_progress=False)
    one = drone_hf.compress(copy.deepcopy(dense), config(param_ratio=0.3), show_progress=False)
    a = seq.encoder.layer[1].attention.self.query.merged_weight()
    b = one.encoder.layer[1].attention.self.query.merged_weight()
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoders_compress_sequentially_and_reload(arch, tmp_path):
    model = drone_hf.compress(build(arch).float(), config(param_ratio=0.4, sequential=True), show_progress=False)
    assert len(drone_hf.report(model)) == len(resolve_targets(build(arch), None, None))
    ids = TOK(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        got = again(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_budgets_that_need_spectra_reuse_the_one_shot_plan():
    dense = build("bert")
    cfg = dict(param_ratio=0.4, allocation="greedy", rank_grid=[2, 4, 6, 8, 12])
    one = drone_hf.compress(copy.deepcopy(dense), config(**cfg), show_progress=False)
    seq = drone_hf.compress(copy.deepcopy(dense), config(sequential=True, **cfg), show_progress=False)
    assert seq.config.quantization_config.ranks == one.config.quantization_config.ranks


def test_failure_midway_restores_the_dense_model(monkeypatch):
    model = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = sequential_mod.collect_grams

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # block 0 is already factored when block 1 fails
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_mod, "collect_grams", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        drone_hf.compress(model, config(param_ratio=0.4, sequential=True), show_progress=False)
    assert not any(isinstance(m, DroneLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pooler_outside_the_blocks_is_calibrated_last():
    model = drone_hf.compress(
        build("bert"), config(param_ratio=0.4, sequential=True, target_modules=["pooler.dense", "query"]),
        show_progress=False,
    )
    assert isinstance(model.pooler.dense, DroneLinear) and isinstance(model.encoder.layer[1].attention.self.query, DroneLinear)


def test_find_blocks_and_refusals():
    model = build("bert")
    names = [n for n, _ in find_blocks(model, {"encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"})]
    assert names == ["encoder.layer.0", "encoder.layer.1"]
    with pytest.raises(ValueError, match="found no repeated blocks"):
        find_blocks(model, {"pooler.dense"})
    with pytest.raises(ValueError, match="compress_attention=True is not supported yet"):
        drone_hf.DroneConfig(sequential=True, compress_attention=True)
    with pytest.raises(ValueError, match="sequential='yes' must be True or False"):
        drone_hf.DroneConfig(sequential="yes")
