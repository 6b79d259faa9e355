"""``compress_attention=True`` end to end, checked against the mathematics on stored activations.

A float64 tiny model of each family is compressed through the public API. Independently, each
attention layer's inputs are recorded on the same texts (one text per forward, so no padding at all),
every head's full score matrix over all calibration tokens is formed, and the compressed module's own
projections must reach that matrix's Eckart-Young optimum at the chosen rank.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from attention_models import HEAD_DIM, HEADS, build, output_of
from tiny_models import CALIBRATION_TEXTS, llama_config, sample_inputs, tokenizer
from transformers import LlamaForCausalLM

import drone_hf
from drone_hf import DroneConfig, DroneLinear
from drone_hf.architectures import find_attention_layers
from drone_hf.modules.attention import DroneAttention, drone_attention_modules

TOKENIZER = tokenizer()
ONLY_ATTENTION = {"bert": ["query", "key"], "distilbert": ["q_lin", "k_lin"], "mpnet": ["attn.q", "attn.k"]}


def config(**kw) -> DroneConfig:
    base = {
        "dataset": CALIBRATION_TEXTS, "num_samples": len(CALIBRATION_TEXTS), "batch_size": 3,
        "compress_attention": True, "tokenizer": TOKENIZER,
        "allocation": "uniform",  # every text calibrates and every layer gets its known rank
    }
    return DroneConfig(**(base | kw))


def record_attention_inputs(model, texts) -> dict[str, torch.Tensor]:
    """X [n, N] per attention layer (canonical name): its inputs over every text's own forward pass."""
    layers = {name: adapter.input_layer(m) for name, (_, m, adapter) in find_attention_layers(model).items()}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for n, layer in layers.items()
    ]
    with torch.no_grad():
        for t in texts:
            enc = TOKENIZER(t, return_tensors="pt")
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(r).T.double() for n, r in rows.items()}


@torch.no_grad()
def scores(q_layer, k_layer, x: torch.Tensor, heads: int) -> torch.Tensor:
    """[H, N, N] raw head scores ``q_iᵀ k_j`` of (weight [H·d, n], bias) projections on X [n, N]."""
    q = (q_layer[0] @ x + q_layer[1][:, None]).reshape(heads, -1, x.shape[1])
    k = (k_layer[0] @ x + k_layer[1][:, None]).reshape(heads, -1, x.shape[1])
    return q.transpose(1, 2) @ k


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet", "gpt2"])
def test_score_error_on_calibration_data_is_the_optimum(family) -> None:
    dense = build(family).double()
    xs = record_attention_inputs(dense, CALIBRATION_TEXTS)
    originals = {n: a.qk_weights(m) for n, (_, m, a) in find_attention_layers(dense).items()}
    targets = ["c_attn"] if family == "gpt2" else ONLY_ATTENTION[family]
    cfg = config(attention_rank=3, target_modules=targets)
    model = drone_hf.compress(copy.deepcopy(dense), cfg, show_progress=False)
    qc = model.config.quantization_config
    assert set(qc.attention_ranks) == set(xs) and set(qc.attention_ranks.values()) == {3}
    modules = {drone_hf.modules.canonical_name(model, n): m for n, m in drone_attention_modules(model).items()}
    for name, x in xs.items():
        wq, bq, wk, bk = originals[name]
        exact = scores((wq, bq), (wk, bk), x, HEADS)
        m = modules[name]
        approx = scores(
            (m.query_proj.weight, m.query_proj.bias), (m.key_proj.weight, m.key_proj.bias), x, HEADS
        )
        err2 = float((exact - approx).pow(2).sum())
        best = sum(float(torch.linalg.svdvals(s)[3:].pow(2).sum()) for s in exact)
        total = float(exact.pow(2).sum())
        assert best > 1e-6 * total  # rank 3 of 8 really loses something
        assert abs(err2 - best) <= 1e-6 * best, (name, err2, best)
        assert math.isclose(qc.attention_errors[name], math.sqrt(best / total), rel_tol=1e-6)
        assert m.relative_error == qc.attention_errors[name]
    if family != "gpt2":
        assert not any(isinstance(m, DroneLinear) for m in model.modules())  # attention only
        assert qc.ranks == {} and qc.allocation_result is None


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_full_head_width_reproduces_the_model(family) -> None:
    dense = build(family).double()
    targets = ["c_attn"] if family == "gpt2" else ["query", "key"]
    kw = {"param_ratio": 1.0} if family == "gpt2" else {}
    model = drone_hf.compress(
        copy.deepcopy(dense), config(attention_rank=HEAD_DIM, target_modules=targets, **kw), show_progress=False
    )
    assert all(m.qk_rank == HEAD_DIM for m in drone_attention_modules(model).values())
    if family == "gpt2":  # the split value is factored too: put the exact c_attn slice back to isolate attention
        originals = find_attention_layers(dense)
        for name, m in drone_attention_modules(model).items():
            _, source, adapter = originals[drone_hf.modules.canonical_name(model, name)]
            m.value = adapter.extra_layers(source)["value"]
    inputs = sample_inputs()
    torch.testing.assert_close(output_of(model, inputs), output_of(dense, inputs), rtol=1e-9, atol=1e-9)


def test_ratio_rank_is_a_fraction_of_the_head_width() -> None:
    cfg = config(attention_rank=0.5, target_modules=["query", "key"])
    model = drone_hf.compress(build("bert"), cfg, show_progress=False)
    assert model.config.quantization_config.attention_ranks == {
        "encoder.layer.0.attention.self": 4, "encoder.layer.1.attention.self": 4,
    }
    default = drone_hf.compress(build("bert"), config(target_modules=["query", "key"]), show_progress=False)
    assert set(default.config.quantization_config.attention_ranks.values()) == {4}  # DEFAULT_ATTENTION_RANK


def test_combines_with_linear_compression_of_values_output_and_ffn() -> None:
    model = drone_hf.compress(build("bert"), config(attention_rank=2, param_ratio=0.5), show_progress=False)
    qc = model.config.quantization_config
    factored = {
        drone_hf.modules.canonical_name(model, n) for n, m in model.named_modules() if isinstance(m, DroneLinear)
    }
    assert factored == set(qc.ranks)
    suffixes = {n.split("layer.0.", 1)[1] for n in factored if "layer.0." in n}
    assert suffixes == {"attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"}
    assert not any(n.endswith((".query", ".key")) for n in qc.ranks)  # q/k are the attention stage's
    for m in drone_attention_modules(model).values():
        assert isinstance(m.value, DroneLinear) and m.qk_rank == 2
    inputs = sample_inputs()
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).last_hidden_state).all()


def test_gpt2_value_split_from_c_attn_is_factored_with_the_other_layers() -> None:
    model = drone_hf.compress(build("gpt2"), config(attention_rank=3, param_ratio=0.5), show_progress=False)
    qc = model.config.quantization_config
    assert {"h.0.attn.value", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"} <= set(qc.ranks)
    assert qc.ranks["h.0.attn.value"] == 8  # uniform rank of a 32x32 layer at param_ratio 0.5
    assert not any("c_attn" in n for n in qc.ranks) and qc.relative_errors["h.0.attn.value"] is not None
    assert isinstance(model.transformer.h[0].attn.value, DroneLinear)
    result = qc.allocation_result  # the split values are counted with the layers the allocation factored
    assert result["split_value_layers"] == {n: k for n, k in qc.ranks.items() if n.endswith(".attn.value")}
    assert result["factored_layers"] == len(qc.ranks) == len(drone_hf.report(model).rows)


def test_rotary_models_are_refused_with_the_reason_and_the_alternative() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"rotary position embeddings.*q/k/v/o projections are still compressible"):
        drone_hf.compress(model, config(attention_rank=2), show_progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_inputs_fail_before_anything_changes() -> None:
    model = build("bert")
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="larger than the head width 8"):
        drone_hf.compress(model, config(attention_rank=9), show_progress=False)
    with pytest.raises(ValueError, match="compressed jointly"):
        drone_hf.compress(model, config(ranks={"encoder.layer.0.attention.self.query": 2}), show_progress=False)
    with pytest.raises(ValueError, match="excludes every attention layer"):
        drone_hf.compress(model, config(modules_to_not_convert=["attention"]), show_progress=False)
    assert set(model.state_dict()) == keys and not drone_attention_modules(model)
    drone_hf.compress(model, config(target_modules=["query", "key"]), show_progress=False)
    with pytest.raises(ValueError, match=r"already DRONE-compressed \(2 compressed attention modules"):
        drone_hf.compress(model, config(target_modules=["value"]), show_progress=False)
    with pytest.raises(ValueError, match=r"already DRONE-compressed \(2 compressed attention modules"):
        drone_hf.compress(model, config(compress_attention=False), show_progress=False)  # linear layers alone too


def test_modules_to_not_convert_keeps_a_layer_dense() -> None:
    model = drone_hf.compress(build("bert"), config(modules_to_not_convert=["encoder.layer.1"]), show_progress=False)
    assert set(model.config.quantization_config.attention_ranks) == {"encoder.layer.0.attention.self"}
    assert not isinstance(model.encoder.layer[1].attention.self, DroneAttention)


def test_dequantize_restores_the_original_classes_with_identical_outputs() -> None:
    model = drone_hf.compress(build("gpt2"), config(attention_rank=3, param_ratio=0.5), show_progress=False)
    inputs = sample_inputs()
    expected = output_of(model, inputs)
    model.dequantize()
    assert not drone_attention_modules(model) and not any(isinstance(m, DroneLinear) for m in model.modules())
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention"
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_dequantize_after_a_cast_keeps_the_models_dtype_and_runs() -> None:
    """The model was compressed in float32 and cast to bfloat16: config.dtype still says float32, and
    merged layers cast to it would not run next to the bfloat16 rest."""
    model = drone_hf.compress(build("gpt2"), config(attention_rank=3, param_ratio=0.5), show_progress=False)
    model.config.dtype = torch.float32  # as from_pretrained records the dtype it loaded
    model.to(torch.bfloat16)
    inputs = sample_inputs()
    expected = output_of(model, inputs)
    model.dequantize()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=0.02, atol=0.02)
    again = drone_hf.compress(build("gpt2"), config(attention_rank=3, param_ratio=0.5), show_progress=False)
    again.dequantize(dtype=torch.float64)  # an explicit dtype: the whole model, restored attention included
    assert {p.dtype for p in again.parameters()} == {torch.float64}
    output_of(again, inputs)


def test_config_fields_are_validated_and_serialised() -> None:
    with pytest.raises(ValueError, match="compress_attention=1 must be True or False"):
        DroneConfig(compress_attention=1)
    with pytest.raises(ValueError, match="pass compress_attention=True"):
        DroneConfig(attention_rank=4)
    for bad in (0, -1, 1.5, 0.0, True, "4"):
        with pytest.raises(ValueError, match="attention_rank="):
            DroneConfig(compress_attention=True, attention_rank=bad)
    with pytest.raises(ValueError, match="attention_ranks="):
        DroneConfig(attention_ranks={"a": 0})
    records = {"attention_ranks": {"h.0.attn": 2}, "attention_errors": {"h.0.attn": 0.5}}
    c = DroneConfig(compress_attention=True, attention_rank=0.25, **records)
    back = DroneConfig.from_dict(c.to_dict())
    assert back == c and back.attention_ranks == {"h.0.attn": 2} and back.is_compressed
    assert DroneConfig(compress_attention=True) != DroneConfig()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_compressing_an_attention_compressed_model_again_is_refused(family) -> None:
    """Only factored linear layers counted as compressed: compressing the linear layers of an
    attention-only model (compress_attention=False) factored the narrowed query/key inside its
    DroneAttention modules. One check and message now, whatever the second config asks."""
    only = {"target_modules": ONLY_ATTENTION[family]} if family in ONLY_ATTENTION else {}
    model = drone_hf.compress(build(family), config(attention_rank=4, **only), show_progress=False)
    assert drone_attention_modules(model)
    refusal = r"already DRONE-compressed \((\d+ factored layers and )?\d+ compressed attention modules, e\.g\. '.*'\)"
    for again in (config(compress_attention=False), config(attention_rank=4, **only)):
        with pytest.raises(ValueError, match=refusal + r".*dequantize\(\)"):
            drone_hf.compress(model, again, show_progress=False)
    restored = model.dequantize()  # the advised fix works: dense again, and compressible
    assert not drone_attention_modules(restored)
    assert drone_attention_modules(drone_hf.compress(restored, config(attention_rank=4, **only), show_progress=False))
