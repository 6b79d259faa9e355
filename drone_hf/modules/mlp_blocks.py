"""MLP blocks a width can be pruned from, and the narrowed layers that replace their projections.

A block is the input layer(s) whose output features are intermediate neurons (``gate_proj`` and
``up_proj`` of a gated MLP, ``intermediate.dense`` of BERT) and the output layer that reads them
(``down_proj``, ``output.dense``), with only elementwise work between (activation, gating,
dropout): a neuron can go without touching any other. Blocks are found by name, one pattern per
family, under a common parent, and only when the shapes agree.

Narrowed layers are ordinary ``nn.Linear`` / ``Conv1D`` modules of the source kind with fewer
output rows (inputs) or input columns (output): the model keeps its classes and forward code, PEFT
and optimizers see plain layers, and a checkpoint stores ``weight``/``bias`` under the usual keys.
``quantization_config.mlp_widths`` records each pruned block's width so a reload can build
:func:`narrow_skeleton` before the weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .low_rank_linear import Conv1D, dense_layer, dense_weight_of, source_kind
from .targets import replace_modules, supported_layers

#: (input layers, output layer) relative to the block's parent, by family: gated MLPs (Llama,
#: Mistral, Qwen, Gemma), BERT/RoBERTa/MPNet (``encoder.layer.N``), DistilBERT (``ffn``), GPT-2
#: (``mlp``), OPT/Phi (``fc1``/``fc2``).
PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("intermediate.dense",), "output.dense"),
    (("lin1",), "lin2"),
    (("c_fc",), "c_proj"),
    (("fc1",), "fc2"),
)


@dataclass(frozen=True)
class MlpBlock:
    """One prunable MLP block, by canonical (base-model-relative) names."""

    name: str
    inputs: tuple[str, ...]
    output: str
    width: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a ``nn.Linear`` or ``Conv1D`` (whose weight is stored ``[in, out]``)."""
    out_f, in_f = dense_weight_of(layer).shape
    return int(out_f), int(in_f)


def recorded_mlp_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """The ``mlp_widths`` record of a compressed model's ``quantization_config`` (a ``DroneConfig`` or
    its dict form), empty when there is none."""
    record = getattr(getattr(model, "config", None), "quantization_config", None)
    widths = record.get("mlp_widths") if isinstance(record, dict) else getattr(record, "mlp_widths", None)
    return dict(widths or {})


def find_mlp_blocks(model: nn.Module, names: set[str] | None = None) -> list[MlpBlock]:
    """Every MLP block of ``model`` (in module order) whose layers are all in ``names`` (canonical
    names; default: every supported layer)."""
    layers = supported_layers(model)
    allowed = set(layers) if names is None else names
    blocks = []
    for canonical in layers:  # module order
        for inputs, output in PATTERNS:
            if not (canonical == output or canonical.endswith("." + output)):
                continue
            parent = canonical[: -len(output)].rstrip(".")
            prefix = parent + "." if parent else ""
            members = [prefix + i for i in inputs]
            out_name = prefix + output
            if not all(m in layers and m in allowed for m in members) or out_name not in allowed:
                continue
            width = layer_shape(layers[out_name][1])[1]
            if all(layer_shape(layers[m][1])[0] == width for m in members):
                blocks.append(MlpBlock(parent, tuple(members), out_name, width))
                break
    return blocks


def narrowed_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A layer of ``layer``'s kind holding ``weight`` (``[out, in]``) and ``bias``, on its device and dtype."""
    new = dense_layer(source_kind(layer) or "linear", weight, bias)
    new.train(layer.training)
    return new


def narrow_block(layers: dict[str, tuple[str, nn.Module]], block: MlpBlock, keep: list[int],
                 output_weight: torch.Tensor) -> dict[str, nn.Module]:
    """The narrowed layers (full name -> module) of ``block`` keeping neurons ``keep``: the input
    layers' rows ``keep``, the output layer's weight ``output_weight`` (``[out, len(keep)]``, e.g.
    :func:`drone_hf.solver.width.compensated_weight`) and its own bias. ``layers``: canonical name
    -> (full name, dense layer), e.g. the run's targets."""
    out: dict[str, nn.Module] = {}
    index = torch.tensor(keep)
    for name in block.inputs:
        full, layer = layers[name]
        weight = dense_weight_of(layer).detach()
        bias = getattr(layer, "bias", None)
        out[full] = narrowed_layer(layer, weight[index.to(weight.device)],
                                   None if bias is None else bias.detach()[index.to(bias.device)])
    full, layer = layers[block.output]
    bias = getattr(layer, "bias", None)
    out[full] = narrowed_layer(layer, output_weight.to(dense_weight_of(layer).device),
                               None if bias is None else bias.detach())
    return out


def widened_layer(layer: nn.Module, width: int, axis: int) -> nn.Module:
    """``layer`` zero-padded to ``width`` along ``axis`` of its ``[out, in]`` weight (0: outputs,
    1: inputs). The padded neurons are exact no-ops: the output layer reads them with zero columns."""
    weight = dense_weight_of(layer).detach()
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.detach()
    shape = list(weight.shape)
    missing = width - shape[axis]
    if missing < 0:
        raise ValueError(f"cannot widen a layer of {shape[axis]} neurons to {width}.")
    shape[axis] = missing
    weight = torch.cat([weight, weight.new_zeros(shape)], dim=axis)
    if axis == 0 and bias is not None:
        bias = torch.cat([bias, bias.new_zeros(missing)])
    return narrowed_layer(layer, weight, bias)


def restore_widths(model: nn.Module, widths: dict[str, dict[str, int]]) -> None:
    """Zero-pad every pruned block recorded in ``widths`` back to its original width (``dequantize``):
    the same function, in the dense architecture's shapes, so the model saves and reloads as a plain
    transformers model."""
    by_name = {b.name: b for b in find_mlp_blocks(model)}
    layers = supported_layers(model)
    replacements = {}
    for name, record in widths.items():
        block = by_name.get(name)
        if block is None:
            continue
        original = int(record["original"])
        for member in block.inputs:
            replacements[layers[member][0]] = widened_layer(layers[member][1], original, axis=0)
        replacements[layers[block.output][0]] = widened_layer(layers[block.output][1], original, axis=1)
    replace_modules(model, replacements)


def narrow_skeleton(model: nn.Module, widths: dict[str, dict[str, int]]) -> list[str]:
    """Before a checkpoint's weights load: give every pruned block recorded in ``widths`` empty
    layers of the recorded width (meta-safe), so the checkpoint's tensors match one to one.

    Returns the recorded blocks this model does not have (e.g. a reload as another architecture).
    """
    by_name = {b.name: b for b in find_mlp_blocks(model)}
    layers = supported_layers(model)
    replacements, missing = {}, []
    for name, record in widths.items():
        block = by_name.get(name)
        if block is None:
            missing.append(name)
            continue
        width, original = int(record["width"]), int(record["original"])
        if original != block.width or not 1 <= width <= original:
            raise ValueError(
                f"The checkpoint records MLP block {name!r} as pruned to {width} of {original} neurons, but this "
                f"model's block has {block.width}: the checkpoint's config.json does not belong to this model."
            )
        for member in block.members:
            full, layer = layers[member]
            out_f, in_f = layer_shape(layer)
            out_f, in_f = (width, in_f) if member in block.inputs else (out_f, width)
            replacements[full] = _empty_layer(layer, out_f, in_f)
    replace_modules(model, replacements)
    return missing


def _empty_layer(layer: nn.Module, out_f: int, in_f: int) -> nn.Module:
    """An uninitialised layer of ``layer``'s kind, device (the meta device too) and dtype."""
    weight = layer.weight
    with torch.device(weight.device):
        if source_kind(layer) == "conv1d":
            new = Conv1D(out_f, in_f)
        else:
            new = nn.Linear(in_f, out_f, bias=getattr(layer, "bias", None) is not None)
    return new.to(dtype=weight.dtype)
