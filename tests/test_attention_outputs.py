"""``output_attentions=True`` on models with query-key compressed attention.

The returned weights must be what the compressed model attends with: the softmax of the ``k``-wide
query-key scores (original scale, padding and causal masks), recomputed here by hand from each
module's own projections and its recorded input. Under SDPA the stock behaviour (a warning, no
weights) is kept, like the dense model's.
"""

from __future__ import annotations

import pytest
import torch
from attention_models import HEADS, build
from tiny_models import CALIBRATION_TEXTS, sample_inputs, tokenizer

import drone_hf
from drone_hf import DroneConfig
from drone_hf.modules.attention import drone_attention_modules

TOKENIZER = tokenizer()


def compressed(family: str, implementation: str, rank: int = 3):
    model = build(family)
    model.set_attn_implementation(implementation)
    cfg = DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=len(CALIBRATION_TEXTS), batch_size=3, compress_attention=True,
        attention_rank=rank, tokenizer=TOKENIZER,
    )
    return drone_hf.compress(model, cfg, show_progress=False)


def manual_probabilities(
    module, hidden: torch.Tensor, key_mask: torch.Tensor, causal: bool, position_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale + position bias + masks) from the module's own k-wide projections: [B, H, L, L]."""
    q, k = module.query_states(hidden), module.key_states(hidden)
    scores = (q @ k.transpose(-1, -2)) * module.scaling
    if position_bias is not None:  # MPNet's relative position bias, added after the product
        scores = scores + position_bias
    allowed = key_mask[:, None, None, :].bool()
    if causal:
        length = hidden.shape[1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet", "gpt2"])
def test_weights_are_the_softmax_of_the_compressed_scores(family) -> None:
    model = compressed(family, "eager")
    modules = drone_attention_modules(model)
    inputs = sample_inputs()
    calls: dict[str, tuple] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, a, kw, n=n: calls.__setitem__(n, (a, kw)), with_kwargs=True)
        for n, m in modules.items()
    ]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in hooks:
        h.remove()
    attentions = out.attentions
    assert attentions is not None and len(attentions) == len(modules) == 2
    key_mask = inputs["attention_mask"]
    assert (key_mask == 0).any()  # the padding mask is exercised
    for got, (name, m) in zip(attentions, modules.items(), strict=True):
        batch, length = key_mask.shape
        assert got.shape == (batch, HEADS, length, length)
        args, kwargs = calls[name]
        hidden = args[0] if args else kwargs["hidden_states"]
        bias = (args[2] if len(args) > 2 else kwargs.get("position_bias")) if family == "mpnet" else None
        assert family != "mpnet" or bias is not None
        want = manual_probabilities(m, hidden, key_mask, causal=family == "gpt2", position_bias=bias)
        real = key_mask.bool()  # rows of real query tokens
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[real], want.permute(0, 2, 1, 3)[real], rtol=1e-5, atol=1e-6)
        assert m.qk_rank == 3


def test_full_width_weights_equal_the_dense_models() -> None:
    dense = build("bert")
    dense.set_attn_implementation("eager")
    inputs = sample_inputs()
    with torch.no_grad():
        want = dense(**inputs, output_attentions=True).attentions
    model = compressed("bert", "eager", rank=8)  # k = head width: the scores are reproduced (float32 round-off)
    with torch.no_grad():
        got = model(**inputs, output_attentions=True).attentions
    real = inputs["attention_mask"].bool()
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.permute(0, 2, 1, 3)[real], w.permute(0, 2, 1, 3)[real], rtol=1e-3, atol=1e-4)


def test_sdpa_keeps_the_stock_behaviour() -> None:
    """The dense SDPA model returns no weights for output_attentions; neither does the compressed one."""
    dense = build("bert")
    inputs = sample_inputs()
    with torch.no_grad():
        want = dense(**inputs, output_attentions=True).attentions
        got = compressed("bert", "sdpa")(**inputs, output_attentions=True).attentions
    assert len(want) == 0 and len(got) == 0
