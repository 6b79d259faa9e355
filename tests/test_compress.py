"""The engine end to end, checked against the mathematics on stored activations.

A float64 tiny model is compressed through the public API; independently, each target layer's
inputs are recorded on the same texts (one text per forward, so no padding exists at all), and
every factored layer must reach the Eckart-Young optimum ``sqrt(Σ_{j>k} σ_j(W X)²)`` of those
inputs.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, bert_config, gpt2_config, llama_config, tokenizer
from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

import drone_hf
from drone_hf import DroneConfig, DroneLinear
from drone_hf.modules import dense_weight_of, resolve_targets

MODELS = {
    "bert": (BertModel, bert_config),
    "gpt2": (GPT2LMHeadModel, gpt2_config),
    "llama": (LlamaForCausalLM, llama_config),
}


TOKENIZER = tokenizer()


def build(name: str, seed: int = 0):
    cls, make = MODELS[name]
    torch.manual_seed(seed)
    return cls(make()).double().eval()


def record_inputs(model, names_to_layers, texts) -> dict[str, torch.Tensor]:
    """X [n, N] per layer: inputs of each text's own (unpadded) forward pass, stacked."""
    tok = TOKENIZER
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names_to_layers}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for n, layer in names_to_layers.items()
    ]
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")  # ids and mask only, as calibration feeds the model
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(r).T.double() for n, r in rows.items()}


def config(**kw) -> DroneConfig:
    base = {
        "dataset": CALIBRATION_TEXTS,
        "num_samples": len(CALIBRATION_TEXTS),
        "batch_size": 3,
        "damp": 0.0,
        "tokenizer": TOKENIZER,
        # these tests check the solver on every calibration text at known ranks; greedy allocation
        # (the default) holds texts out and picks ranks itself: tests/test_allocation.py covers it
        "allocation": "uniform",
    }
    return DroneConfig(**(base | kw))


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("param_ratio", [0.25, 0.6])
def test_every_layer_reaches_the_optimum_on_its_calibration_inputs(arch, param_ratio):
    model = build(arch)
    targets = {c: layer for c, (_, layer) in resolve_targets(model, None, None).items()}
    weights = {c: dense_weight_of(layer).detach().clone() for c, layer in targets.items()}
    xs = record_inputs(model, targets, CALIBRATION_TEXTS)

    drone_hf.compress(model, config(param_ratio=param_ratio), show_progress=False)
    factored = {r.name: r for r in drone_hf.report(model)}
    assert set(factored) == set(targets)
    for name, module in model.named_modules():
        if not isinstance(module, DroneLinear):
            continue
        c = drone_hf.modules.canonical_name(model, name)
        w, x = weights[c], xs[c]
        y = w @ x
        sigma = torch.linalg.svdvals(y)
        k = module.rank
        optimum = sigma[k:].pow(2).sum().sqrt()
        approx = (module.up.weight @ module.down.weight).detach()
        achieved = float(((w - approx) @ x).norm())
        assert achieved == pytest.approx(float(optimum), rel=1e-6, abs=1e-9 * float(y.norm())), c
        assert module.relative_error == pytest.approx(float(optimum / y.norm()), rel=1e-6, abs=1e-9), c


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_drone_is_never_worse_than_plain_svd_on_calibration_data(arch):
    dense = build(arch)
    targets = {c: layer for c, (_, layer) in resolve_targets(dense, None, None).items()}
    xs = record_inputs(dense, targets, CALIBRATION_TEXTS)
    ws = {c: dense_weight_of(layer).detach().clone() for c, layer in targets.items()}
    errors = {}
    for method in ("drone", "svd"):
        model = drone_hf.compress(copy.deepcopy(dense), config(method=method, param_ratio=0.3), show_progress=False)
        errors[method] = {
            drone_hf.modules.canonical_name(model, n): float(((ws[c] - m.merged_weight().detach()) @ xs[c]).norm())
            for n, m in model.named_modules()
            if isinstance(m, DroneLinear) and (c := drone_hf.modules.canonical_name(model, n))
        }
    assert errors["drone"].keys() == errors["svd"].keys()
    for c in errors["drone"]:
        assert errors["drone"][c] <= errors["svd"][c] * (1 + 1e-9), c
    assert sum(errors["drone"].values()) < sum(errors["svd"].values())


def test_full_rank_reproduces_the_model():
    model = build("bert")
    inputs = tokenizer()(CALIBRATION_TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    # rank = min(out, in) on every layer; the calibration data (8 short texts) spans less than
    # that for some layers, so the rank is clamped to the data span: exact on the data's subspace.
    ranks = {c: min(dense_weight_of(m).shape) for c, (_, m) in resolve_targets(model, None, None).items()}
    drone_hf.compress(model, config(ranks=ranks), show_progress=False)
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert all(r.relative_error < 1e-9 for r in drone_hf.report(model))


def test_error_is_monotone_in_rank():
    errs = []
    for k in (2, 4, 8, 16):
        model = drone_hf.compress(build("bert"), config(ranks={".*": k}), show_progress=False)
        errs.append([r.relative_error for r in drone_hf.report(model)])
    for lower, higher in itertools.pairwise(errs):
        assert all(h <= lo + 1e-12 for lo, h in zip(lower, higher, strict=True))


def test_compress_does_not_mutate_config_and_records_ranks():
    cfg = config(ranks={r"encoder\.layer\.0\..*": 3})
    before = cfg.to_dict()
    model = drone_hf.compress(build("bert"), cfg, show_progress=False)
    assert cfg.to_dict() == before
    recorded = model.config.quantization_config
    assert recorded is not cfg and recorded.is_compressed
    assert all(v == 3 for k, v in recorded.ranks.items() if k.startswith("encoder.layer.0."))
    assert recorded.calibration["num_texts"] == len(CALIBRATION_TEXTS)
    assert recorded.calibration["num_tokens"] == sum(len(tokenizer()(t)["input_ids"]) for t in CALIBRATION_TEXTS)


def test_a_checkpoint_record_with_an_ignored_option_still_reads_back():
    """The solver-option refusals are made at compression time: a record that holds such a pair (it only
    ever meant the linear layers) still loads as a config."""
    record = DroneConfig(method="svdllm", damp=0.01, compress_attention=True, attention_rank=4).to_dict()
    assert DroneConfig.from_dict(record).damp == 0.01


def test_overrides_shorthand():
    model = drone_hf.compress(build("bert"), config(), param_ratio=0.25, show_progress=False)
    assert model.config.quantization_config.param_ratio == 0.25
    with pytest.raises(ValueError, match="Unknown DroneConfig field"):
        drone_hf.compress(build("bert"), config(), not_a_field=1)
    with pytest.raises(TypeError, match="DroneConfig"):
        drone_hf.compress(build("bert"), {"param_ratio": 0.5})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(ranks={"encoder.layer.0.attention.self.query": 33}), "rank at most 32"),
        (dict(ranks={"no.such.layer": 4}), "ranks key 'no.such.layer' matches no targeted layer"),
        (dict(target_modules=["nope"]), "target_modules entry 'nope' matches no linear layer"),
        (dict(target_modules=r"nope\..*"), "matches no linear layer"),
        (dict(modules_to_not_convert=["nope"]), "modules_to_not_convert entry 'nope'"),
        (dict(dataset=[]), "empty"),
        (dict(dataset=["   ", "\n"]), "empty"),
        (dict(dataset=["\u200b", "\x00\x01"]), "tokenize to nothing"),
        # options the chosen solver would drop: refused, not ignored
        *[(dict(method=m, damp=0.01), f"damp=0.01 is DRONE's input ridge and method='{m}' does not use it")
          for m in ("svd", "asvd", "fwsvd", "svdllm")],
        *[(dict(method=m, compress_attention=True, attention_rank=4),
           f"compress_attention=True with method='{m}': the query-key stage has a DRONE and a plain-SVD form only")
          for m in ("asvd", "fwsvd", "svdllm")],
    ],
)
def test_bad_input_fails_early_and_leaves_the_model_untouched(bad, match):
    model = build("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        drone_hf.compress(model, config(**bad), show_progress=False)
    assert not any(isinstance(m, DroneLinear) for m in model.modules())
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1, float("nan")])
def test_param_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"param_ratio=.* must be a number in \(0, 1\]"):
        DroneConfig(param_ratio=ratio)


def test_compressing_twice_is_refused():
    model = drone_hf.compress(build("bert"), config(), show_progress=False)
    with pytest.raises(ValueError, match="already DRONE-compressed"):
        drone_hf.compress(model, config(), show_progress=False)


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="nothing to compress"):
        drone_hf.compress(torch.nn.Sequential(torch.nn.ReLU()), config(), show_progress=False)


def test_tokenizer_is_required_when_the_model_has_no_folder():
    model = build("bert")
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="No tokenizer for calibration"):
        drone_hf.compress(model, config(tokenizer=None), show_progress=False)
    drone_hf.compress(model, config(), show_progress=False)
    assert drone_hf.report(model).rows


def test_train_mode_is_restored_after_compression():
    model = build("bert").train()
    drone_hf.compress(model, config(), show_progress=False)
    assert model.training and all(m.training for m in model.modules())


def test_report_table_and_ratios():
    dense = build("bert")
    n_dense = sum(p.numel() for p in dense.parameters())
    model = drone_hf.compress(dense, config(param_ratio=0.5), show_progress=False)
    rep = drone_hf.report(model)
    assert rep.dense_model_params == n_dense
    assert rep.model_params == sum(p.numel() for p in model.parameters())
    assert rep.targeted_param_ratio == pytest.approx(
        sum(r.rank * (r.in_features + r.out_features) for r in rep) / sum(r.in_features * r.out_features for r in rep)
    )
    assert rep.targeted_param_ratio <= 0.5
    text = str(rep)
    assert "encoder.layer.0.attention.self.query" in text and "rel. error" in text and "layers factored" in text
    md = rep.to_markdown()
    assert md.startswith("| layer |") and md.count("\n|") == len(rep) + 1
    assert len(rep.to_dicts()) == len(rep)
    with pytest.raises(ValueError, match="no DRONE-factored layer"):
        drone_hf.report(build("bert"))


def test_same_inputs_give_bit_identical_factors():
    a = drone_hf.compress(build("llama"), config(param_ratio=0.4), show_progress=False).state_dict()
    b = drone_hf.compress(build("llama"), config(param_ratio=0.4), show_progress=False).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "compression is not deterministic on CPU"
