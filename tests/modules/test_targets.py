"""Which layers get factored, under which names, and the module surgery."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from drone_hf.modules.low_rank_linear import DroneLinear
from drone_hf.modules.targets import (
    HEAD_COMPONENTS,
    build_skeleton,
    canonical_name,
    check_rank_keys,
    name_matches,
    rank_for,
    replace_modules,
    resolve_targets,
    supported_layers,
)

BERT_BLOCK = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
GPT2_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LLAMA_BLOCK = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=3,
    )


def tiny_bert_seq_cls() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(tiny_bert_config())


def tiny_gpt2_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2)
    )


def tiny_llama_lm(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=tie,
        )
    )


def block_names(prefix: str, layers: int, block: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{leaf}" for i in range(layers) for leaf in block]


# --------------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------------
def test_canonical_name_strips_the_base_prefix_only() -> None:
    task = tiny_bert_seq_cls()
    assert canonical_name(task, "bert.encoder.layer.0.attention.self.query") == "encoder.layer.0.attention.self.query"
    assert canonical_name(task, "classifier") == "classifier"  # outside the base model
    assert canonical_name(task, "bertx.encoder") == "bertx.encoder"  # prefix must end at a dot
    base = tiny_bert()
    assert canonical_name(base, "encoder.layer.0.output.dense") == "encoder.layer.0.output.dense"
    assert canonical_name(tiny_gpt2_lm(), "transformer.h.1.mlp.c_fc") == "h.1.mlp.c_fc"
    assert canonical_name(tiny_llama_lm(), "model.layers.0.mlp.up_proj") == "layers.0.mlp.up_proj"


def test_supported_layers_maps_canonical_to_full_names() -> None:
    task = tiny_bert_seq_cls()
    layers = supported_layers(task)
    assert list(layers) == block_names("encoder.layer", 2, BERT_BLOCK) + ["pooler.dense", "classifier"]
    full, layer = layers["encoder.layer.1.intermediate.dense"]
    assert full == "bert.encoder.layer.1.intermediate.dense"
    assert layer is task.bert.encoder.layer[1].intermediate.dense
    # the base model has the same canonical names (minus the head)
    assert list(supported_layers(tiny_bert())) == list(layers)[:-1]


def test_name_matches_is_exact_or_dotted_suffix() -> None:
    assert name_matches("query", "encoder.layer.0.attention.self.query", "")
    assert name_matches("self.query", "encoder.layer.0.attention.self.query", "")
    assert name_matches("bert.encoder.layer.0.attention.self.query", "x", "bert.encoder.layer.0.attention.self.query")
    assert not name_matches("uery", "encoder.layer.0.attention.self.query", "")
    assert not name_matches("layer.1", "encoder.layer.11", "")
    assert not name_matches("query", "encoder.layer.0.attention.self.query_proj", "")


# --------------------------------------------------------------------------------------------------
# default targeting
# --------------------------------------------------------------------------------------------------
def test_default_bert_task_model_skips_pooler_and_classifier() -> None:
    targets = resolve_targets(tiny_bert_seq_cls(), None, None)
    assert list(targets) == block_names("encoder.layer", 2, BERT_BLOCK)
    assert all(full == "bert." + c for c, (full, _) in targets.items())


def test_default_bert_base_model_skips_pooler() -> None:
    targets = resolve_targets(tiny_bert(), None, None)
    assert list(targets) == block_names("encoder.layer", 2, BERT_BLOCK)
    assert all(full == c for c, (full, _) in targets.items())


def test_default_gpt2_lm_skips_tied_lm_head_and_targets_conv1d() -> None:
    model = tiny_gpt2_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    targets = resolve_targets(model, None, None)
    assert list(targets) == block_names("h", 2, GPT2_BLOCK)
    assert all(isinstance(layer, Conv1D) for _, layer in targets.values())
    assert targets["h.0.attn.c_attn"][0] == "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("tie", [False, True])
def test_default_llama_lm_skips_lm_head(tie: bool) -> None:
    model = tiny_llama_lm(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    targets = resolve_targets(model, None, None)
    assert list(targets) == block_names("layers", 2, LLAMA_BLOCK)


class TiedProjection(nn.Module):
    """A base model (no prefix) whose output projection is tied to the input embedding under a
    name no head rule knows: only the tied-weight rule excludes it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.mix = nn.Linear(6, 6)
        self.unembed = nn.Linear(6, 20, bias=False)
        self.unembed.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return self.unembed(self.mix(self.embed(input_ids)))


class OutputEmbeddingHead(TiedProjection):
    """Untied output embeddings reported by get_output_embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.unembed = nn.Linear(6, 20, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.unembed


@pytest.mark.parametrize("cls", [TiedProjection, OutputEmbeddingHead])
def test_default_skips_tied_and_output_embeddings(cls) -> None:
    model = cls()
    assert list(supported_layers(model)) == ["mix", "unembed"]
    assert list(resolve_targets(model, None, None)) == ["mix"]
    if cls is OutputEmbeddingHead:  # an untied output embedding: naming it targets it
        assert list(resolve_targets(model, ["unembed"], None)) == ["unembed"]
    else:  # a tied one is refused even when named: factoring it unties it and breaks the reload
        with pytest.raises(ValueError, match=r"selects 'unembed', whose weight is tied to the input embeddings"):
            resolve_targets(model, ["unembed"], None)


@pytest.mark.parametrize("named", [["c_attn", "lm_head"], ".*"])
def test_a_named_tied_lm_head_is_refused_with_the_fix(named) -> None:
    with pytest.raises(ValueError, match=r"'lm_head', whose weight is tied .*tie_word_embeddings=False"):
        resolve_targets(tiny_gpt2_lm(), named, None)
    targets = resolve_targets(tiny_llama_lm(tie=False), ["lm_head"], None)  # untied: an ordinary layer
    assert list(targets) == ["lm_head"]


@pytest.mark.parametrize("component", sorted(HEAD_COMPONENTS))
def test_every_head_component_is_skipped_by_default(component: str) -> None:
    model = nn.Module()
    model.body = nn.Linear(4, 4)
    head = nn.Module()
    head.dense = nn.Linear(4, 4)
    model.add_module(component, head)
    assert list(supported_layers(model)) == ["body", f"{component}.dense"]
    assert list(resolve_targets(model, None, None)) == ["body"]


def test_head_components_match_whole_name_parts_only() -> None:
    model = nn.Module()
    model.scorer = nn.Linear(4, 4)  # "scorer" is not "score"
    model.classifier_like = nn.Linear(4, 4)
    assert list(resolve_targets(model, None, None)) == ["scorer", "classifier_like"]


def test_task_head_outside_base_model_is_skipped_whatever_its_name() -> None:
    model = tiny_bert_seq_cls()
    model.extra_proj = nn.Linear(8, 8)  # outside the "bert" base model, not a known head name
    assert "extra_proj" in supported_layers(model)
    assert "extra_proj" not in resolve_targets(model, None, None)
    assert list(resolve_targets(model, ["extra_proj"], None)) == ["extra_proj"]


# --------------------------------------------------------------------------------------------------
# target_modules
# --------------------------------------------------------------------------------------------------
def test_target_modules_list_uses_suffix_matching_in_module_order() -> None:
    targets = resolve_targets(tiny_bert_seq_cls(), ["value", "query"], None)
    assert list(targets) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]


def test_target_modules_list_accepts_canonical_full_and_head_names() -> None:
    model = tiny_bert_seq_cls()
    t = resolve_targets(
        model,
        ["encoder.layer.1.output.dense", "bert.encoder.layer.0.intermediate.dense", "classifier", "pooler.dense"],
        None,
    )
    assert list(t) == [
        "encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense", "pooler.dense", "classifier"
    ]
    # "output.dense" is a suffix of both attention.output.dense and output.dense
    t = resolve_targets(model, ["output.dense"], None)
    assert list(t) == [
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
        "encoder.layer.1.attention.output.dense",
        "encoder.layer.1.output.dense",
    ]


def test_target_modules_regex_must_match_whole_names() -> None:
    model = tiny_bert_seq_cls()
    t = resolve_targets(model, r".*attention\.self\.(query|key)", None)
    assert list(t) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.key",
    ]
    # full names match too
    assert list(resolve_targets(model, r"bert\.encoder\.layer\.1\.intermediate\.dense", None)) == [
        "encoder.layer.1.intermediate.dense"
    ]
    # a partial match is not a match
    with pytest.raises(ValueError, match=r"target_modules='query'.*regular expression"):
        resolve_targets(model, "query", None)


def test_unknown_target_entry_raises_naming_it() -> None:
    model = tiny_bert_seq_cls()
    with pytest.raises(
        ValueError, match=r"target_modules entry 'qkv' matches no linear layer of BertForSequenceClassification"
    ):
        resolve_targets(model, ["query", "qkv"], None)
    with pytest.raises(ValueError, match=r"'nothing_here'.*layer names look like 'encoder\.layer\.0"):
        resolve_targets(model, r"nothing_here", None)


def test_model_without_linear_layers_raises() -> None:
    model = nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="has nothing to compress"):
        resolve_targets(model, None, None)


# --------------------------------------------------------------------------------------------------
# modules_to_not_convert
# --------------------------------------------------------------------------------------------------
def test_modules_to_not_convert_excludes_layers() -> None:
    t = resolve_targets(tiny_bert_seq_cls(), None, ["query", "encoder.layer.1.output.dense"])
    expected = [
        n for n in block_names("encoder.layer", 2, BERT_BLOCK)
        if not n.endswith(".query") and n != "encoder.layer.1.output.dense"
    ]
    assert list(t) == expected


@pytest.mark.parametrize("entry", ["encoder.layer.1", "bert.encoder.layer.1", "layer.1"])
def test_modules_to_not_convert_excludes_whole_containers(entry: str) -> None:
    t = resolve_targets(tiny_bert_seq_cls(), None, [entry])
    assert list(t) == block_names("encoder.layer", 1, BERT_BLOCK)


def test_modules_to_not_convert_container_does_not_swallow_similar_prefixes() -> None:
    model = nn.Module()
    model.layer = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])
    t = resolve_targets(model, None, ["layer.1"])
    assert "layer.1" not in t
    assert "layer.10" in t and "layer.11" in t and len(t) == 11


def test_modules_to_not_convert_combines_with_target_modules() -> None:
    t = resolve_targets(tiny_bert_seq_cls(), ["query", "key"], ["encoder.layer.0"])
    assert list(t) == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"]


def test_modules_to_not_convert_unknown_entry_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"modules_to_not_convert entry 'decoder' matches no module"):
        resolve_targets(tiny_bert_seq_cls(), None, ["decoder"])


def test_modules_to_not_convert_may_name_a_non_target_module() -> None:
    # the pooler is already skipped by default; naming it is allowed and harmless
    t = resolve_targets(tiny_bert_seq_cls(), None, ["pooler"])
    assert list(t) == block_names("encoder.layer", 2, BERT_BLOCK)


def test_excluding_everything_raises() -> None:
    with pytest.raises(ValueError, match="No layer is left to compress"):
        resolve_targets(tiny_bert_seq_cls(), ["query"], ["encoder"])


# --------------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------------
def test_rank_for_exact_names_then_regex_in_dict_order() -> None:
    c, full = "encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.query"
    assert rank_for(c, full, None) is None
    assert rank_for(c, full, {}) is None
    assert rank_for(c, full, {c: 3}) == 3
    assert rank_for(c, full, {full: 4}) == 4
    # an exact name wins over an earlier regex
    assert rank_for(c, full, {r".*query": 2, c: 5}) == 5
    # regexes: first full match in dict order
    assert rank_for(c, full, {r".*key": 1, r".*query": 2, r".*": 7}) == 2
    assert rank_for(c, full, {r".*": 7, r".*query": 2}) == 7
    assert rank_for(c, full, {r"bert\..*self\.query": 6}) == 6
    # partial matches do not count
    assert rank_for(c, full, {"query": 2, "layer.0": 3}) is None


def test_check_rank_keys_accepts_exact_full_and_regex_keys() -> None:
    targets = resolve_targets(tiny_bert_seq_cls(), None, None)
    check_rank_keys(None, targets)
    check_rank_keys(
        {
            "encoder.layer.0.attention.self.query": 2,
            "bert.encoder.layer.1.output.dense": 3,
            r"encoder\.layer\.\d+\.intermediate\.dense": 4,
        },
        targets,
    )


@pytest.mark.parametrize("key", ["query", "pooler.dense", "classifier", r"encoder\.layer\.5\..*"])
def test_check_rank_keys_rejects_keys_matching_no_target(key: str) -> None:
    targets = resolve_targets(tiny_bert_seq_cls(), None, None)
    with pytest.raises(ValueError, match=re.escape(f"ranks key {key!r} matches no targeted layer")):
        check_rank_keys({"encoder.layer.0.attention.self.key": 2, key: 3}, targets)


# --------------------------------------------------------------------------------------------------
# surgery
# --------------------------------------------------------------------------------------------------
def test_replace_modules_swaps_by_full_name() -> None:
    model = tiny_bert_seq_cls()
    old = model.bert.encoder.layer[0].attention.self.query
    new = DroneLinear(8, 8, 2)
    replace_modules(model, {"bert.encoder.layer.0.attention.self.query": new})
    assert model.bert.encoder.layer[0].attention.self.query is new
    assert model.get_submodule("bert.encoder.layer.0.attention.self.query") is not old
    assert model.bert.encoder.layer[1].attention.self.query is not new


def test_build_skeleton_creates_empty_factored_layers_of_the_right_shape() -> None:
    model = tiny_gpt2_lm()
    ranks = {"h.0.attn.c_attn": 3, "h.1.mlp.c_proj": 2, "score": 1}
    missing = build_skeleton(model, ranks)
    assert missing == ["score"]
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, DroneLinear)
    assert (attn.in_features, attn.out_features, attn.rank, attn.source) == (8, 24, 3, "conv1d")
    proj = model.transformer.h[1].mlp.c_proj
    assert isinstance(proj, DroneLinear)
    assert (proj.in_features, proj.out_features, proj.rank) == (32, 8, 2)
    assert proj.weight.shape == (32, 8)  # Conv1D layout
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)  # untouched
    keys = set(model.state_dict())
    assert {"transformer.h.0.attn.c_attn.down.weight", "transformer.h.0.attn.c_attn.up.weight",
            "transformer.h.0.attn.c_attn.up.bias"} <= keys
    assert "transformer.h.0.attn.c_attn.weight" not in keys


def test_build_skeleton_on_task_model_uses_canonical_names_and_linear_layout() -> None:
    model = tiny_bert_seq_cls()
    missing = build_skeleton(model, {"encoder.layer.0.intermediate.dense": 4})
    assert missing == []
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, DroneLinear)
    assert (layer.in_features, layer.out_features, layer.rank, layer.source) == (8, 16, 4, "linear")


def test_build_skeleton_rejects_a_rank_the_shape_cannot_hold() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"rank 9 for 'encoder\.layer\.0\.attention\.self\.query'"):
        build_skeleton(model, {"encoder.layer.0.attention.self.query": 9})
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)  # nothing swapped
