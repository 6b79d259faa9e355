"""Half-precision models and bit-for-bit determinism of compression on CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, CALIBRATION_TEXTS, sample_inputs, tokenizer

import drone_hf
from drone_hf.modules.low_rank_linear import DroneLinear
from drone_hf.solver.numerics import cast_factors

#: unit round-off of each dtype: a cast changes a product by about this, relatively
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def compressed(arch: str, dtype: torch.dtype = torch.float32, **config) -> torch.nn.Module:
    cls, make_config = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = cls(make_config()).to(dtype).eval()
    cfg = drone_hf.DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tokenizer(), **config)
    return drone_hf.compress(model, cfg, show_progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_half_precision_model_compresses_with_factors_in_its_dtype(dtype: torch.dtype) -> None:
    model = compressed("bert", dtype)
    layers = [m for m in model.modules() if isinstance(m, DroneLinear)]
    assert len(layers) == 12
    for layer in layers:
        assert layer.up.weight.dtype == layer.down.weight.dtype == dtype
        assert torch.isfinite(layer.up.weight).all() and torch.isfinite(layer.down.weight).all()
        # the cast error is measured and of the order of the dtype's round-off, never hidden
        assert layer.cast_error is not None and 0.0 <= layer.cast_error < 8 * ROUNDOFF[dtype]
        assert 0.0 < layer.relative_error < 1.0
    with torch.no_grad():
        out = model(**sample_inputs()).last_hidden_state
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_cast_error_is_the_real_change_of_the_product() -> None:
    g = torch.Generator().manual_seed(0)
    up, down = (
        torch.randn(16, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 24, generator=g, dtype=torch.float64),
    )
    up_c, down_c, err = cast_factors(up, down, torch.bfloat16)
    exact = up @ down
    assert err == pytest.approx(float((up_c.double() @ down_c.double() - exact).norm() / exact.norm()), rel=1e-12)
    assert 0 < err < 8 * ROUNDOFF[torch.bfloat16]
    assert (
        cast_factors(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), torch.float16)[2]
        == 0
    )


def test_factors_that_overflow_float16_are_refused_with_the_fix() -> None:
    up = torch.full((4, 2), 1e5, dtype=torch.float64)
    down = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"overflow torch\.float16 \(largest entry 1e\+05\).*Load the model in float32"
    ):
        cast_factors(up, down, torch.float16, "the factors of a 4x4 layer")


@pytest.mark.parametrize("arch,config", [
    ("bert-seq-cls", {}),
    ("gpt2-lm", {"damp": 0.01}),
    ("bert", {"allocation": "greedy"}),
], ids=["bert-uniform", "gpt2-damped", "bert-greedy"])
def test_compression_is_bit_for_bit_deterministic(arch: str, config: dict) -> None:
    """Same model, texts, seed and versions: identical factors (torch.equal), ranks and errors."""
    first, second = compressed(arch, **config), compressed(arch, **config)
    a = {n: m for n, m in first.named_modules() if isinstance(m, DroneLinear)}
    b = {n: m for n, m in second.named_modules() if isinstance(m, DroneLinear)}
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name].up.weight, b[name].up.weight), name
        assert torch.equal(a[name].down.weight, b[name].down.weight), name
    qa, qb = first.config.quantization_config, second.config.quantization_config
    assert qa.ranks == qb.ranks and qa.relative_errors == qb.relative_errors
