"""``AttentionAdapter``: what drone-hf needs to know about one family's self-attention module.

An adapter answers five questions about the module it supports: which modules are it, where its
query/key weights are (as ``[H·d, n]`` head-major matrices), which layer sees its input (for the
calibration hook), how to build the compressed replacement around its other children, and how to
turn a compressed module back into the original class (``dequantize``). Everything else (statistics,
math, records, reload) is generic, so supporting a family is one small file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..modules.attention import DroneAttention


class AttentionAdapter(ABC):
    """One architecture family's self-attention (see module docstring).

    Class attributes:
        family: short name (``"bert"``), also the registry key.
        model_types: ``config.model_type`` values it covers, for messages and lookups.
        absorbed: child names of the original module that QK compression replaces; they are not
            factored as linear layers (``("query", "key")``, GPT-2's fused ``("c_attn",)``).
        carried: child names moved unchanged into the replacement (values, output projection), so
            linear-layer compression of them (``DroneLinear``) survives the swap.
        extra: child names of dense linear layers the replacement introduces that linear compression
            never saw (GPT-2's ``value``, split from the fused ``c_attn``); see :meth:`extra_layers`.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    absorbed: tuple[str, ...] = ()
    carried: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    @abstractmethod
    def source_classes(self) -> tuple[type, ...]:
        """The transformers classes of the self-attention modules this adapter replaces."""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a self-attention module of this family (cross-attention is not)."""
        return type(module) in self.source_classes()

    @abstractmethod
    def num_heads(self, module: nn.Module) -> int:
        """Attention heads of ``module``."""

    @abstractmethod
    def qk_weights(
        self, module: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(W_Q, b_Q, W_K, b_K)``: [H·d, n] weights (out x in) and [H·d] biases, heads head-major."""

    @abstractmethod
    def input_layer(self, module: nn.Module) -> nn.Module:
        """A child whose forward input is the attention input (the Gram is observed there)."""

    @abstractmethod
    def new_module(self, original: nn.Module, qk_rank: int, model_config: Any) -> DroneAttention:
        """The replacement (empty projections, on ``original``'s device and dtype) with the
        :attr:`carried` children of ``original`` moved in."""

    @abstractmethod
    def restore(self, module: DroneAttention) -> nn.Module:
        """A module of the original class computing exactly the same attention (zero-padded heads)."""

    def extra_layers(self, original: nn.Module) -> dict[str, nn.Module]:
        """The :attr:`extra` children as exact dense ``nn.Linear`` copies built from ``original``
        (name -> layer); the attention stage factors them when their source was a linear target."""
        return {}

    def describe(self) -> str:
        return f"{self.family} ({', '.join(self.model_types)})"


def weight_of(module: nn.Module) -> torch.Tensor:
    """A parameter of ``module`` whose device and dtype new layers should follow."""
    for p in module.parameters():
        return p
    raise ValueError(f"{type(module).__name__} has no parameters to take a device and dtype from.")


def carry_children(adapter: AttentionAdapter, original: nn.Module, new: DroneAttention) -> DroneAttention:
    """Move ``adapter.carried`` children of ``original`` into ``new`` and copy its mode and class."""
    for name in adapter.carried:
        setattr(new, name, getattr(original, name))
    new.source_class = type(original)
    new.train(original.training)
    return new


def copy_padded_qk(module: DroneAttention, query: nn.Module, key: nn.Module) -> None:
    """Load ``module``'s zero-padded projections into the dense ``query``/``key`` ``nn.Linear`` layers."""
    with torch.no_grad():
        for which, layer in (("query", query), ("key", key)):
            w, b = module.padded_projection(which)
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.copy_(b)
