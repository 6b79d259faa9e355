"""``DroneLinear``: a linear layer stored as two thin factors, ``x -> up(down(x)) + b``.

A rank-k pair costs ``k·(in + out)`` multiply-adds per token instead of ``in·out``. Both factors are
plain ``nn.Linear`` modules with the stable names ``down`` and ``up``, so PEFT, optimizers,
``torch.compile`` and checkpoint tooling see ordinary linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..solver.numerics import cast_factors

try:  # GPT-2 family layers store the weight transposed ([in, out])
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None  # type: ignore[assignment,misc]

#: Source layer kinds a ``DroneLinear`` can replace (and turn back into with :meth:`DroneLinear.to_dense`).
SOURCE_KINDS = ("linear", "conv1d")


def source_kind(module: nn.Module) -> str | None:
    """``"linear"`` / ``"conv1d"`` for layers DRONE can factor, ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    return None


def output_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` that indexes outputs: 0 for ``nn.Linear`` ([out, in]), 1 for ``Conv1D``.

    Gradient statistics are taken on the stored weight, so they need this axis rather than the
    ``[out, in]`` view :func:`dense_weight_of` gives.
    """
    return 0 if source_kind(module) == "linear" else 1


def dense_layer(kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new ``nn.Linear`` (``kind="linear"``) or ``Conv1D`` (``"conv1d"``) holding ``weight``
    (``[out, in]``) and ``bias``, on ``weight``'s device and dtype (a ``Conv1D`` without a bias gets zeros:
    it always has one)."""
    out_f, in_f = weight.shape
    if kind == "conv1d":
        layer = Conv1D(out_f, in_f)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.T)
            if bias is not None:
                layer.bias.copy_(bias)
            else:
                layer.bias.zero_()
        return layer
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a supported layer as ``[out, in]`` (``Conv1D`` stores ``[in, out]``)."""
    kind = source_kind(module)
    if kind == "linear":
        return module.weight
    if kind == "conv1d":
        return module.weight.T
    raise TypeError(
        f"{type(module).__name__} is not a layer DRONE can factor: supported are torch.nn.Linear and "
        "transformers.pytorch_utils.Conv1D."
    )


class DroneLinear(nn.Module):
    """A factored linear layer ``y = up(down(x))`` with ``down: in -> rank`` and ``up: rank -> out``.

    Args:
        in_features: input width of the layer it replaces.
        out_features: output width.
        rank: inner width ``k``; must satisfy ``1 <= k <= min(in, out)``.
        bias: whether ``up`` carries the original bias.
        source: ``"linear"`` or ``"conv1d"``: the kind of layer it replaced, so :meth:`to_dense`
            restores the same kind (a GPT-2 checkpoint stores ``Conv1D`` weights transposed).
        relative_error: the relative calibration error it was built with
            (``||(W - W') X|| / ||W X||``), ``None`` when unknown (e.g. rebuilt from a checkpoint
            without that record).
        device, dtype: where to allocate the factors (``"meta"`` for a skeleton).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        source: str = "linear",
        relative_error: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank={rank!r} is not valid for a layer with {in_features} inputs and {out_features} outputs: "
                f"use an integer in [1, {min(in_features, out_features)}]."
            )
        if source not in SOURCE_KINDS:
            raise ValueError(f"source={source!r} must be one of {list(SOURCE_KINDS)}.")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.source = source
        self.relative_error = relative_error
        #: relative change of ``up @ down`` when the float64 solution was cast to this layer's dtype
        #: (``None`` until built by :meth:`from_factors`); about 1e-8 in float32, 1e-3 in float16/bfloat16.
        self.cast_error: float | None = None
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> torch.Tensor | None:
        """The original bias (carried by ``up``), so code that reads ``layer.bias`` keeps working."""
        return self.up.bias

    @property
    def weight(self) -> torch.Tensor:
        """A *read-only, computed* dense weight in the replaced layer's layout (``[out, in]``, or
        ``[in, out]`` for ``Conv1D``).

        Model code reads ``layer.weight`` for its dtype, device or shape, and transformers'
        weight-init pass touches it; both keep working. It is a fresh tensor: writing into it does
        not change the factors (train ``up``/``down`` instead).
        """
        merged = self.merged_weight().detach()
        merged = merged.T if self.source == "conv1d" else merged
        merged._is_hf_initialized = True  # transformers' guarded init leaves it alone
        return merged

    @classmethod
    def from_factors(
        cls,
        source_layer: nn.Module,
        up: torch.Tensor,
        down: torch.Tensor,
        relative_error: float | None = None,
    ) -> DroneLinear:
        """Build the factored replacement of ``source_layer`` from ``up`` [out, k] and ``down`` [k, in].

        The factors are cast to the source layer's dtype and device; the bias is copied unchanged.
        """
        kind = source_kind(source_layer)
        weight = dense_weight_of(source_layer)
        out_features, in_features = weight.shape
        if tuple(up.shape) != (out_features, down.shape[0]) or down.shape[1] != in_features:
            raise ValueError(
                f"factors of shapes up={tuple(up.shape)}, down={tuple(down.shape)} do not fit a "
                f"{out_features}x{in_features} layer: expected up [{out_features}, k], down [k, {in_features}]."
            )
        bias = getattr(source_layer, "bias", None)
        layer = cls(
            in_features,
            out_features,
            int(down.shape[0]),
            bias=bias is not None,
            source=kind,  # type: ignore[arg-type]
            relative_error=relative_error,
            device=weight.device,
            dtype=weight.dtype,
        )
        # the cast to the model's dtype is measured (cast_error) and an overflow refused, never silent
        up_c, down_c, layer.cast_error = cast_factors(
            up, down, weight.dtype, f"the factors of a {out_features}x{in_features} layer"
        )
        with torch.no_grad():
            layer.down.weight.copy_(down_c)
            layer.up.weight.copy_(up_c)
            if bias is not None:
                layer.up.bias.copy_(bias)
        layer.train(source_layer.training)
        return layer

    def merged_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight ``up.weight @ down.weight`` (computed in float32 or wider)."""
        up, down = self.up.weight, self.down.weight
        wide = torch.promote_types(up.dtype, torch.float32)
        return (up.to(wide) @ down.to(wide)).to(up.dtype)

    def to_dense(self) -> nn.Module:
        """The equivalent dense layer, of the kind this one replaced (``nn.Linear`` or ``Conv1D``)."""
        layer = dense_layer(self.source, self.merged_weight().detach(), self.up.bias)
        layer.train(self.training)
        return layer

    @property
    def dense_parameters(self) -> int:
        """Weight parameters of the layer it replaced (``in·out``, bias excluded)."""
        return self.in_features * self.out_features

    @property
    def factored_parameters(self) -> int:
        """Weight parameters of the two factors (``rank·(in + out)``, bias excluded)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        err = "" if self.relative_error is None else f", relative_error={self.relative_error:.4f}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}{err}"
        )

    def _get_name(self) -> str:  # shows as "drone.Linear" in print(model)
        return "drone.Linear"
