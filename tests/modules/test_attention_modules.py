"""Compressed attention modules of every family, independent of the solver.

Projections are set by hand: the original ones at full head width (the model must not change), or
random narrow ones compared with a dense module of the original class whose heads are zero-padded
(exactly the same scores, scale and masks). Masks are checked behaviourally: padding against the
same text alone, causality against changed future tokens.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model helpers
from attention_models import FAMILIES, HEAD_DIM, HEADS, build, output_of  # noqa: E402
from tiny_models import sample_inputs, tokenizer  # noqa: E402

from drone_hf.architectures import find_attention_layers, restore_attention  # noqa: E402
from drone_hf.modules.attention import DroneAttention, drone_attention_modules, set_qk_layout  # noqa: E402
from drone_hf.modules.targets import replace_modules  # noqa: E402

IMPLEMENTATIONS = ("sdpa", "eager")
#: (attention implementation, qk_layout): the layout only matters for SDPA (eager always runs narrow).
MODES = [("sdpa", "auto"), ("sdpa", "narrow"), ("eager", "auto")]
INPUTS = sample_inputs()


def with_implementation(model, implementation: str):
    if implementation != "sdpa" or getattr(model, "_supports_sdpa", False):
        model.set_attn_implementation(implementation)
    return model


def compress_by_hand(model, rank: int, seed: int = 0):
    """Swap every attention module for a compressed one: original projections at full width,
    random ones (seeded) below it. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    replacements = {}
    for _, (full, module, adapter) in find_attention_layers(model).items():
        new = adapter.new_module(module, rank, model.config)
        if rank == HEAD_DIM:
            new.load_projections(*adapter.qk_weights(module))
        else:
            n, width = new.query_proj.in_features, HEADS * rank
            qw, qb, kw, kb = (torch.randn(*s, generator=g) * 0.5 for s in ((width, n), (width,), (width, n), (width,)))
            new.load_projections(qw, qb, kw, kb)
        replacements[full] = new
    replace_modules(model, replacements)
    return model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_head_width_with_the_original_projections_changes_nothing(family, implementation) -> None:
    dense = with_implementation(build(family), implementation)
    inputs = INPUTS
    expected = output_of(dense, inputs)
    model = compress_by_hand(copy.deepcopy(dense), HEAD_DIM)
    assert len(drone_attention_modules(model)) == 2
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation,layout", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_narrow_heads_equal_the_zero_padded_original_module(family, implementation, layout) -> None:
    model = compress_by_hand(with_implementation(build(family), implementation), rank=3)
    set_qk_layout(model, layout)
    inputs = INPUTS
    got = output_of(model, inputs)
    dense = copy.deepcopy(model)
    assert restore_attention(dense) == 2 and not drone_attention_modules(dense)
    kinds = {type(m).__name__ for _, (_, m, _) in find_attention_layers(dense).items()}
    assert all(not k.startswith("Drone") for k in kinds)
    torch.testing.assert_close(got, output_of(dense, inputs), rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 0


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2"])
def test_padding_never_reaches_real_tokens(family) -> None:
    model = compress_by_hand(build(family), rank=3)
    tok = tokenizer()
    texts = ["A short text.", "A noticeably longer text that forces padding onto the first one."]
    batch = output_of(model, tok(texts, return_tensors="pt", padding=True))
    alone = output_of(model, tok(texts[:1], return_tensors="pt"))
    torch.testing.assert_close(batch[0, : alone.shape[1]], alone[0], rtol=1e-4, atol=1e-5)


def test_gpt2_is_causal_and_generation_with_the_cache_matches_full_recomputation() -> None:
    model = compress_by_hand(build("gpt2"), rank=3)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 1012]])
    changed = ids.clone()
    changed[0, 4:] = torch.tensor([7592, 2088])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)  # earlier positions never see later ones
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(generated, uncached)


def bert_decoder():
    from tiny_models import bert_config
    from transformers import BertLMHeadModel

    torch.manual_seed(0)
    return BertLMHeadModel(bert_config(is_decoder=True, hidden_size=32, num_attention_heads=HEADS)).eval()


@pytest.mark.parametrize("family", ["gpt2", "bert-decoder"])
def test_decoders_fill_the_kv_cache_and_a_cached_step_equals_full_recomputation(family) -> None:
    """Generation on a tiny random model can repeat one token with or without a cache, so the cache is
    checked directly: after a prefix it holds the prefix, and the next token's logits from it equal
    those of the whole sequence recomputed (transformers passes it as ``cache=``)."""
    from transformers import DynamicCache

    model = compress_by_hand(build("gpt2") if family == "gpt2" else bert_decoder(), rank=3)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 1012]])
    cache = DynamicCache()
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        assert cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        full = model(input_ids=ids).logits
    torch.testing.assert_close(prefix.logits, full[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, full[:, -1], rtol=1e-5, atol=1e-5)


def test_mpnet_eager_path_with_attention_weights_matches_sdpa() -> None:
    model = compress_by_hand(build("mpnet"), rank=3)
    inputs = INPUTS
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        weighted = model(**inputs, output_attentions=True)
    torch.testing.assert_close(weighted.last_hidden_state, plain, rtol=1e-5, atol=1e-5)
    assert weighted.attentions[0].shape == (2, HEADS, plain.shape[1], plain.shape[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_names_keep_the_family_names_with_narrow_shapes(family) -> None:
    model = compress_by_hand(build(family), rank=3)
    names = {"bert": "query", "roberta": "query", "distilbert": "q_lin", "mpnet": "q", "gpt2": "query"}
    keys = {k: v.shape for k, v in model.state_dict().items() if k.endswith(f".{names[family]}.weight")}
    assert len(keys) == 2 and all(tuple(s) == (HEADS * 3, 32) for s in keys.values())
    assert not any("c_attn" in k for k in model.state_dict())  # GPT-2's fused layer is split


def test_module_validates_rank_and_layout() -> None:
    model = build("bert")
    (_, (_, module, adapter)), *_ = find_attention_layers(model).items()
    with pytest.raises(ValueError, match=r"use an integer in \[1, 8\]"):
        adapter.new_module(module, HEAD_DIM + 1, model.config)
    with pytest.raises(ValueError, match="layout="):
        set_qk_layout(model, "wide")
    new = adapter.new_module(module, 2, model.config)
    assert isinstance(new, DroneAttention) and "qk_rank=2" in repr(new) and "drone.BertSelfAttention" in repr(new)
    assert new.value is module.value  # carried, not copied: factored values survive the swap
    with pytest.raises(ValueError, match="does not fit"):
        new.load_projections(torch.zeros(3, 32), torch.zeros(3), torch.zeros(3, 32), torch.zeros(3))
    assert new.qk_parameters * 4 == new.dense_qk_parameters
