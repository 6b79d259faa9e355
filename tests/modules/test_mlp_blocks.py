"""MLP blocks: found per family by name and shape; narrowing keeps exactly the chosen neurons; padding
back is the same function; the reload skeleton has the recorded widths and refuses a foreign record."""

from __future__ import annotations

import pytest
import torch
from tiny_models import bert_config, gpt2_config, llama_config, sample_inputs
from transformers import BertModel, DistilBertConfig, DistilBertModel, GPT2LMHeadModel, LlamaForCausalLM

from drone_hf.modules.low_rank_linear import dense_weight_of
from drone_hf.modules.mlp_blocks import find_mlp_blocks, narrow_block, narrow_skeleton, restore_widths
from drone_hf.modules.targets import replace_modules, supported_layers


def _models():
    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(llama_config()).double().eval(),
        "bert": BertModel(bert_config()).double().eval(),
        "gpt2": GPT2LMHeadModel(gpt2_config()).double().eval(),
        "distilbert": DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                                       max_position_embeddings=128)).double().eval(),
    }


EXPECTED = {
    "llama": ("layers.0.mlp", ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"), "layers.0.mlp.down_proj", 64),
    "bert": ("encoder.layer.0", ("encoder.layer.0.intermediate.dense",), "encoder.layer.0.output.dense", 64),
    "gpt2": ("transformer.h.0.mlp", ("transformer.h.0.mlp.c_fc",), "transformer.h.0.mlp.c_proj", 128),
    "distilbert": ("transformer.layer.0.ffn", ("transformer.layer.0.ffn.lin1",), "transformer.layer.0.ffn.lin2", 48),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_blocks_are_found_per_family(arch):
    model = _models()[arch]
    blocks = find_mlp_blocks(model)
    assert len(blocks) == 2
    name, inputs, output, width = EXPECTED[arch]
    prefix = "transformer." if arch == "gpt2" else ""  # GPT2LMHeadModel's base model prefix is stripped
    first = blocks[0]
    assert (prefix + first.name, tuple(prefix + i for i in first.inputs), prefix + first.output, first.width) == (
        name, inputs, output, width)


def test_a_block_with_an_untargeted_projection_is_not_a_block():
    model = _models()["llama"]
    names = {c for c in supported_layers(model) if not c.endswith("up_proj")}
    assert find_mlp_blocks(model, names) == []


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_narrowing_drops_exactly_the_removed_neurons_and_padding_back_is_the_same_function(arch):
    model = _models()[arch]
    inputs = sample_inputs()
    block = find_mlp_blocks(model)[0]
    layers = supported_layers(model)
    keep = [j for j in range(block.width) if j % 3 != 1]
    out_layer = layers[block.output][1]
    # reference: the dense model with the removed neurons' output columns zeroed
    with torch.no_grad():
        weight = dense_weight_of(out_layer)
        saved = weight.clone()
        removed = [j for j in range(block.width) if j not in keep]
        weight[:, removed] = 0
        reference = _out(model, inputs)
        weight.copy_(saved)
    narrowed = narrow_block(layers, block, keep, saved[:, keep].clone())
    replace_modules(model, narrowed)
    for full, layer in narrowed.items():
        assert type(layer) is type(layers[{v[0]: k for k, v in layers.items()}[full]][1])
    assert dense_weight_of(supported_layers(model)[block.output][1]).shape[1] == len(keep)
    pruned = _out(model, inputs)
    assert torch.allclose(pruned, reference, atol=1e-12, rtol=0)
    restore_widths(model, {block.name: {"width": len(keep), "original": block.width}})
    assert dense_weight_of(supported_layers(model)[block.output][1]).shape[1] == block.width
    assert torch.allclose(_out(model, inputs), pruned, atol=1e-12, rtol=0)


def test_skeleton_has_the_recorded_widths_and_reports_unknown_blocks():
    model = _models()["llama"]
    missing = narrow_skeleton(model, {"layers.1.mlp": {"width": 24, "original": 64},
                                      "layers.9.mlp": {"width": 8, "original": 64}})
    assert missing == ["layers.9.mlp"]
    mlp = model.model.layers[1].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (24, 24, 24)
    assert model.model.layers[0].mlp.down_proj.in_features == 64


def test_skeleton_refuses_a_record_of_another_width():
    model = _models()["llama"]
    with pytest.raises(ValueError, match="pruned to 24 of 96 neurons, but this model's block has 64"):
        narrow_skeleton(model, {"layers.0.mlp": {"width": 24, "original": 96}})
