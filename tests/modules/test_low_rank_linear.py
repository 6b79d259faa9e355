"""DroneLinear: the factored layer, its construction from factors and its way back to a dense layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from drone_hf.modules.low_rank_linear import SOURCE_KINDS, DroneLinear, dense_weight_of, source_kind

f64 = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_linear(in_f: int, out_f: int, bias: bool = True, dtype=f64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()  # nn.Linear's default bias init is tiny: make it matter
    return layer


def make_conv1d(in_f: int, out_f: int, dtype=f64, seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(out_f, in_f).to(dtype)  # Conv1D(nf=out, nx=in), weight [in, out]
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def svd_factors(weight_out_in: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight_out_in.detach().to(f64), full_matrices=False)
    return u[:, :k] * s[:k], vh[:k]


def inputs(in_f: int, dtype=f64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, in_f, generator=seeded(seed), dtype=f64).to(dtype)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_x_down_up_plus_bias(bias: bool) -> None:
    layer = DroneLinear(6, 4, 3, bias=bias, dtype=f64)
    with torch.no_grad():
        layer.down.weight.copy_(torch.randn(3, 6, generator=seeded(2), dtype=f64))
        layer.up.weight.copy_(torch.randn(4, 3, generator=seeded(3), dtype=f64))
        if bias:
            layer.up.bias.copy_(torch.randn(4, generator=seeded(4), dtype=f64))
    x = inputs(6)
    expected = x @ layer.down.weight.T @ layer.up.weight.T
    if bias:
        expected = expected + layer.up.bias
    y = layer(x)
    assert y.shape == (2, 5, 4)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert (layer.bias is None) == (not bias)
    if bias:
        assert layer.bias is layer.up.bias


def test_factors_are_plain_linear_modules_with_stable_names() -> None:
    layer = DroneLinear(8, 5, 2)
    names = dict(layer.named_parameters())
    assert set(names) == {"down.weight", "up.weight", "up.bias"}
    assert isinstance(layer.down, nn.Linear) and isinstance(layer.up, nn.Linear)
    assert layer.down.weight.shape == (2, 8) and layer.up.weight.shape == (5, 2)
    assert layer.down.bias is None


def test_gradients_reach_both_factors() -> None:
    layer = DroneLinear(6, 4, 2)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    assert layer.down.weight.grad is not None and float(layer.down.weight.grad.abs().sum()) > 0
    assert layer.up.weight.grad is not None and float(layer.up.weight.grad.abs().sum()) > 0


# --------------------------------------------------------------------------------------------------
# from_factors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_from_factors_on_linear_reproduces_source_at_full_rank(bias: bool) -> None:
    src = make_linear(6, 9, bias=bias)
    up, down = svd_factors(src.weight, 6)
    layer = DroneLinear.from_factors(src, up, down, relative_error=0.0)
    assert (layer.in_features, layer.out_features, layer.rank, layer.source) == (6, 9, 6, "linear")
    assert layer.relative_error == 0.0
    x = inputs(6)
    assert torch.allclose(layer(x), src(x), rtol=0, atol=1e-12)
    if bias:
        assert torch.equal(layer.bias, src.bias)
        assert layer.bias.data_ptr() != src.bias.data_ptr()  # copied, not shared


def test_from_factors_on_conv1d_reproduces_source_at_full_rank() -> None:
    src = make_conv1d(7, 5)  # weight [in=7, out=5]
    assert src.weight.shape == (7, 5)
    dense = dense_weight_of(src)
    assert dense.shape == (5, 7)
    up, down = svd_factors(dense, 5)
    layer = DroneLinear.from_factors(src, up, down)
    assert (layer.in_features, layer.out_features, layer.source) == (7, 5, "conv1d")
    x = inputs(7)
    assert torch.allclose(layer(x), src(x), rtol=0, atol=1e-12)
    assert torch.equal(layer.bias, src.bias)


def test_from_factors_truncated_rank_computes_up_down_product() -> None:
    src = make_linear(8, 6)
    up, down = svd_factors(src.weight, 2)
    layer = DroneLinear.from_factors(src, up, down)
    assert layer.rank == 2
    x = inputs(8)
    assert torch.allclose(layer(x), x @ (up @ down).T + src.bias, rtol=0, atol=1e-12)
    assert not torch.allclose(layer(x), src(x), atol=1e-3)  # truncation loses something


def test_from_factors_casts_to_source_dtype_and_keeps_training_mode() -> None:
    src = make_linear(6, 4, dtype=torch.float32).eval()
    up, down = svd_factors(src.weight, 4)  # float64 factors
    layer = DroneLinear.from_factors(src, up, down)
    assert layer.up.weight.dtype == torch.float32 and layer.down.weight.dtype == torch.float32
    assert layer.up.weight.device == src.weight.device
    assert not layer.training
    x = inputs(6, dtype=torch.float32)
    assert torch.allclose(layer(x), src(x), rtol=1e-5, atol=1e-5)
    assert DroneLinear.from_factors(src.train(), up, down).training


@pytest.mark.parametrize(
    "up_shape, down_shape", [((4, 2), (3, 6)), ((5, 2), (2, 6)), ((4, 2), (2, 5)), ((6, 2), (2, 4))]
)
def test_from_factors_rejects_factors_that_do_not_fit(up_shape, down_shape) -> None:
    src = make_linear(6, 4)
    with pytest.raises(ValueError, match="do not fit a 4x6 layer"):
        DroneLinear.from_factors(src, torch.zeros(up_shape), torch.zeros(down_shape))


def test_from_factors_rejects_unsupported_layers() -> None:
    with pytest.raises(TypeError, match="Conv2d is not a layer DRONE can factor"):
        DroneLinear.from_factors(nn.Conv2d(2, 2, 1), torch.zeros(2, 1), torch.zeros(1, 2))


def test_source_kind_and_dense_weight_layouts() -> None:
    lin, conv = make_linear(3, 2), make_conv1d(3, 2)
    assert source_kind(lin) == "linear" and source_kind(conv) == "conv1d"
    assert source_kind(nn.Embedding(3, 2)) is None and source_kind(nn.Conv2d(1, 1, 1)) is None
    assert dense_weight_of(lin) is lin.weight
    assert torch.equal(dense_weight_of(conv), conv.weight.T)
    assert SOURCE_KINDS == ("linear", "conv1d")


# --------------------------------------------------------------------------------------------------
# to_dense and the weight property
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [2, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_to_dense_linear_round_trip(rank: int, bias: bool) -> None:
    src = make_linear(5, 7, bias=bias)
    layer = DroneLinear.from_factors(src, *svd_factors(src.weight, rank))
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    assert (dense.in_features, dense.out_features) == (5, 7)
    assert (dense.bias is None) == (not bias)
    assert dense.weight.dtype == f64
    x = inputs(5)
    assert torch.allclose(dense(x), layer(x), rtol=0, atol=1e-12)
    if rank == 5:
        assert torch.allclose(dense.weight, src.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [2, 4])
def test_to_dense_conv1d_round_trip(rank: int) -> None:
    src = make_conv1d(6, 4)
    layer = DroneLinear.from_factors(src, *svd_factors(dense_weight_of(src), rank))
    dense = layer.to_dense()
    assert type(dense) is Conv1D
    assert dense.weight.shape == src.weight.shape == (6, 4)
    assert dense.nf == 4
    x = inputs(6)
    assert torch.allclose(dense(x), layer(x), rtol=0, atol=1e-12)
    if rank == 4:
        assert torch.allclose(dense(x), src(x), rtol=0, atol=1e-12)
        assert torch.allclose(dense.weight, src.weight, rtol=0, atol=1e-12)


def test_to_dense_conv1d_without_bias_has_zero_bias() -> None:
    layer = DroneLinear(6, 4, 2, bias=False, source="conv1d", dtype=f64)
    dense = layer.to_dense()
    assert type(dense) is Conv1D
    assert torch.equal(dense.bias, torch.zeros(4, dtype=f64))
    x = inputs(6)
    assert torch.allclose(dense(x), layer(x), rtol=0, atol=1e-12)


def test_to_dense_keeps_training_mode_and_is_independent() -> None:
    src = make_linear(4, 4)
    layer = DroneLinear.from_factors(src, *svd_factors(src.weight, 2)).eval()
    dense = layer.to_dense()
    assert not dense.training
    assert layer.train().to_dense().training
    with torch.no_grad():
        dense.weight.add_(1.0)
        dense.bias.add_(1.0)
    x = inputs(4)
    assert not torch.allclose(dense(x), layer(x))
    assert torch.allclose(layer(x), x @ layer.merged_weight().T + src.bias, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weight_property_has_source_layout_and_is_a_copy(kind: str) -> None:
    src = make_linear(6, 4) if kind == "linear" else make_conv1d(6, 4)
    layer = DroneLinear.from_factors(src, *svd_factors(dense_weight_of(src), 4))
    w = layer.weight
    assert w.shape == src.weight.shape
    assert torch.allclose(w, src.weight, rtol=0, atol=1e-12)
    assert w.dtype == src.weight.dtype and not w.requires_grad
    x = inputs(6)
    before = layer(x).detach().clone()
    with torch.no_grad():
        w.mul_(0.0).add_(123.0)  # writing into it changes nothing
    assert torch.equal(layer(x), before)
    assert torch.allclose(layer.weight, src.weight, rtol=0, atol=1e-12)
    assert "weight" not in dict(layer.named_parameters())


def test_merged_weight_is_up_times_down_and_widened_for_low_precision() -> None:
    layer = DroneLinear(6, 4, 3, dtype=torch.bfloat16)
    m = layer.merged_weight()
    assert m.dtype == torch.bfloat16 and m.shape == (4, 6)
    exact = layer.up.weight.float() @ layer.down.weight.float()
    assert torch.equal(m, exact.to(torch.bfloat16))
    layer64 = DroneLinear(6, 4, 3, dtype=f64)
    assert torch.equal(layer64.merged_weight(), layer64.up.weight @ layer64.down.weight)


# --------------------------------------------------------------------------------------------------
# validation, repr, counts, meta
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -2, 5, 100, True, 2.0, "2", None])
def test_invalid_rank_raises(rank) -> None:
    with pytest.raises(ValueError, match=r"rank=.*\[1, 4\]"):
        DroneLinear(4, 9, rank)


def test_rank_bounds_are_inclusive() -> None:
    assert DroneLinear(4, 9, 1).rank == 1
    assert DroneLinear(4, 9, 4).rank == 4
    assert DroneLinear(9, 4, 4).rank == 4


def test_invalid_source_raises() -> None:
    with pytest.raises(ValueError, match="source='conv2d'"):
        DroneLinear(4, 4, 2, source="conv2d")


def test_repr_shows_drone_linear_and_fields() -> None:
    layer = DroneLinear(8, 6, 3, relative_error=0.123456)
    text = repr(layer)
    assert text.startswith("drone.Linear(")
    assert "in_features=8, out_features=6, rank=3, bias=True, relative_error=0.1235" in text
    assert "relative_error" not in repr(DroneLinear(8, 6, 3, bias=False))
    assert "bias=False" in repr(DroneLinear(8, 6, 3, bias=False))
    model = nn.Sequential(layer)
    assert "drone.Linear(" in str(model)


@pytest.mark.parametrize("in_f, out_f, rank", [(8, 6, 3), (16, 4, 1), (5, 5, 5)])
def test_parameter_counts(in_f: int, out_f: int, rank: int) -> None:
    layer = DroneLinear(in_f, out_f, rank)
    assert layer.dense_parameters == in_f * out_f
    assert layer.factored_parameters == rank * (in_f + out_f)
    weights = layer.down.weight.numel() + layer.up.weight.numel()
    assert weights == layer.factored_parameters
    assert sum(p.numel() for p in layer.parameters()) == layer.factored_parameters + out_f


def test_meta_device_skeleton_allocates_nothing() -> None:
    layer = DroneLinear(64, 32, 8, device="meta", dtype=torch.float16)
    assert layer.up.weight.is_meta and layer.down.weight.is_meta
    assert layer.up.weight.dtype == torch.float16
    assert layer.weight.shape == (32, 64)


def test_deepcopy_and_state_dict_keys() -> None:
    src = make_linear(6, 4)
    layer = DroneLinear.from_factors(src, *svd_factors(src.weight, 3), relative_error=0.5)
    assert set(layer.state_dict()) == {"down.weight", "up.weight", "up.bias"}
    clone = copy.deepcopy(layer)
    x = inputs(6)
    assert torch.equal(clone(x), layer(x))
    assert clone.relative_error == 0.5 and clone.source == "linear"
    fresh = DroneLinear(6, 4, 3, dtype=f64)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
