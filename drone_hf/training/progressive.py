"""Lowering the ranks of factored layers in place, re-solved from their *current* weights.

A progressive schedule compresses gently: train at rank ``k0``, cut to ``k1 < k0`` and keep
training, ..., down to the final budget, so the network adapts between cuts. Each cut merges
``up @ down`` (the weights as training left them) and re-solves the rank-k optimum on the data the
layer sees now (DRONE with the input Gram of a few training batches), or takes the truncated SVD of
the product when no data is given.

The parameters keep their identity (their ``.data`` is replaced with the thinner factors), so the
optimizer keeps holding them; its per-parameter state (Adam moments, of the old shape) is dropped
for the cut layers, which therefore restart their moment estimates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..allocation import uniform_rank
from ..calibration import CalibrationBatches, collect_grams
from ..modules.low_rank_linear import DroneLinear
from ..modules.targets import canonical_name
from ..solver import decompose
from ._model import inner_optimizer, model_inputs
from .stats import quantization_records


def final_ranks_for(
    layers: dict[str, DroneLinear],
    model: nn.Module,
    final_param_ratio: float | None,
    final_ranks: dict[str, int] | None,
) -> dict[str, int]:
    """The rank each layer ends at: ``final_ranks`` (by name relative to the base model, or full
    name) where given, else the uniform rank of ``final_param_ratio``; never above the current rank.

    Raises:
        ValueError: neither or both budgets, a bad ratio, a rank < 1, or an unknown layer name.
    """
    if (final_param_ratio is None) == (final_ranks is None):
        raise ValueError(
            "Give exactly one final budget: final_param_ratio=r (uniform, like DroneConfig(param_ratio=r)) or "
            "final_ranks={layer name: rank}."
        )
    if final_param_ratio is not None:
        r = final_param_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
            raise ValueError(
                f"final_param_ratio={r!r} must be a number in (0, 1] (fraction of the dense weights kept)."
            )
        return {n: min(m.rank, uniform_rank(m.out_features, m.in_features, r)) for n, m in layers.items()}
    assert final_ranks is not None
    by_canonical = {canonical_name(model, n): n for n in layers}
    out = {n: m.rank for n, m in layers.items()}
    for key, k in final_ranks.items():
        full = key if key in layers else by_canonical.get(key)
        if full is None:
            raise ValueError(
                f"final_ranks names {key!r}, which is not a factored layer; factored layers look like "
                f"{sorted(by_canonical)[:3]}."
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"final_ranks[{key!r}]={k!r} must be a positive integer.")
        out[full] = min(out[full], k)
    return out


def stage_ranks(start: dict[str, int], final: dict[str, int], stage: int, num_stages: int) -> dict[str, int]:
    """Ranks after stage ``stage`` of ``num_stages`` (1-based): linear from ``start`` to ``final``,
    rounded, reaching ``final`` exactly at the last stage."""
    t = stage / num_stages
    return {n: max(final[n], round(start[n] + (final[n] - start[n]) * t)) for n in start}


@torch.no_grad()
def input_grams(
    model: nn.Module, layers: dict[str, DroneLinear], batches: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Input Gram ``Σ x xᵀ`` (float64, real tokens only) of each layer on ``batches``, one pass."""
    data = [model_inputs(b) for b in batches]
    calib = CalibrationBatches(
        batches=data,
        num_texts=sum(int(b["input_ids"].shape[0]) for b in data),
        num_tokens=sum(int(b["attention_mask"].sum()) for b in data),
    )
    observers = collect_grams(
        model, dict(layers), calib, {n: m.in_features for n, m in layers.items()}, show_progress=False
    )
    return {n: obs.gram for n, obs in observers.items()}


def _by_full_name(model: nn.Module, modules: dict[str, nn.Module], ranks: dict[str, int]) -> dict[str, int]:
    """``ranks`` keyed by full module names: base-relative names (the record's, ``final_ranks``') are
    translated; a name that is no factored layer either way is refused (a typo would cut nothing)."""
    factored = {n for n, m in modules.items() if isinstance(m, DroneLinear)}
    relative = {canonical_name(model, n): n for n in factored}
    out: dict[str, int] = {}
    for name, k in ranks.items():
        full = name if name in factored else relative.get(name)
        if full is None:
            examples = ", ".join(repr(n) for n in sorted(factored)[:3])
            raise ValueError(
                f"lower_ranks got {name!r}, which is not a factored layer of {type(model).__name__} (e.g. {examples}); "
                "name the layers by their full or base-relative module names."
            )
        out[full] = k
    return out


@torch.no_grad()
def lower_ranks(
    model: nn.Module,
    ranks: dict[str, int],
    batches: list[dict[str, Any]] | None = None,
    optimizer: Any = None,
    method: str = "drone",
    damp: float = 0.0,
) -> dict[str, float | None]:
    """Cut the named factored layers (full module names) to the given lower ranks, in place.

    Args:
        model: the (unwrapped) transformers model holding the layers.
        ranks: module name (full, or relative to the base model as the DRONE record writes it) ->
            new rank; layers whose rank would not drop are skipped.
        batches: training batches (dicts with ``input_ids``, optionally ``attention_mask``) for the
            data-aware re-solve; ``None`` for the truncated SVD of the current product.
        optimizer: the optimizer holding the factors; the state of every cut parameter is dropped.
        method, damp: ``"drone"`` (needs ``batches``) or ``"svd"``; ridge as in ``DroneConfig``.

    Returns:
        Full name -> relative error of the cut against the layer's *current* weights on the batches
        (``None`` for SVD without data). The model's DRONE record (``quantization_config.ranks``)
        is updated, so ``save_pretrained`` writes, and a reload rebuilds, the new ranks.
    """
    modules = dict(model.named_modules())
    ranks = _by_full_name(model, modules, ranks)
    cut = {n: k for n, k in ranks.items() if k < modules[n].rank}
    if not cut:
        return {}
    layers = {n: modules[n] for n in cut}
    if method == "drone" and batches is None:
        raise ValueError("method='drone' re-solves on data: pass training batches, or use method='svd'.")
    grams = input_grams(model, layers, batches) if batches is not None else {}
    inner = inner_optimizer(optimizer) if optimizer is not None else None
    errors: dict[str, float | None] = {}
    for name, k in cut.items():
        layer = layers[name]
        weight = layer.merged_weight().detach()
        gram = grams.get(name)
        solved = decompose(weight, gram, method=method if gram is not None else "svd", damp=damp).factors(k)
        _install(layer, solved.up, solved.down, inner)
        errors[name] = solved.relative_error
    _record(model, {n: layers[n].rank for n in cut})
    return errors


@torch.no_grad()
def follow_saved_ranks(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, int]:
    """Give each factored layer of ``model`` the rank its factors have in ``state_dict``, so loading
    that state dict (a checkpoint saved after a progressive cut) finds factors of the right shape.

    Only the shapes change: the new factors are zeros until the load fills them, the parameter
    objects are kept (as in a cut), and the DRONE record is updated so ``save_pretrained`` writes the
    ranks the model now has. Layers whose saved factors are absent or already match are left alone.

    Returns:
        Full name -> new rank of every layer reshaped.

    Raises:
        ValueError: a saved factor does not fit the layer (other widths), or holds a *higher* rank
            than the model: a progressive schedule only lowers ranks, so that checkpoint was not
            written by a run that started from this model.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DroneLinear)}
    new: dict[str, int] = {}
    for name, layer in layers.items():
        down, up = state_dict.get(f"{prefix}{name}.down.weight"), state_dict.get(f"{prefix}{name}.up.weight")
        if down is None or up is None or int(down.shape[0]) == layer.rank:
            continue
        k = int(down.shape[0])
        if tuple(down.shape) != (k, layer.in_features) or tuple(up.shape) != (layer.out_features, k):
            raise ValueError(
                f"The checkpoint's factors of {name!r} have shapes {tuple(down.shape)} and {tuple(up.shape)}, which "
                f"do not fit a {layer.in_features} -> {layer.out_features} layer: it is not a checkpoint of this model."
            )
        if k > layer.rank:
            raise ValueError(
                f"The checkpoint holds {name!r} at rank {k}, above the model's rank {layer.rank}; a progressive "
                "schedule only lowers ranks. Resume with the model the run started from (compressed the same way)."
            )
        new[name] = k
    for name, k in new.items():
        layer = layers[name]
        like = layer.down.weight
        _install(
            layer,
            torch.zeros(layer.out_features, k, dtype=like.dtype, device=like.device),
            torch.zeros(k, layer.in_features, dtype=like.dtype, device=like.device),
            None,
        )
    if new:
        _record(model, new)
    return new


def _install(layer: DroneLinear, up: torch.Tensor, down: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Give ``layer`` new factors, keeping its ``nn.Parameter`` objects (the optimizer holds them)."""
    k = int(down.shape[0])
    for param, value in ((layer.down.weight, down), (layer.up.weight, up)):
        param.data = value.to(device=param.device, dtype=param.dtype).contiguous()
        param.grad = None
        if optimizer is not None:
            optimizer.state.pop(param, None)
    layer.down.out_features = k
    layer.up.in_features = k
    layer.rank = k
    layer.relative_error = None  # the calibration error of the original compression no longer applies


def _record(model: nn.Module, new_ranks: dict[str, int]) -> None:
    """Write the new ranks into the DRONE record that ``save_pretrained`` serialises."""
    for record in quantization_records(model):
        ranks = dict(getattr(record, "ranks", None) or {})
        errors = dict(getattr(record, "relative_errors", None) or {})
        for full, k in new_ranks.items():
            name = canonical_name(model, full)
            ranks[name] = k
            errors[name] = None
        record.ranks = ranks
        if getattr(record, "relative_errors", None) is not None:
            record.relative_errors = errors
        result = getattr(record, "allocation_result", None)
        if isinstance(result, dict):
            for key in ("measured_speedup", "predicted_speedup", "measured_loss_increase", "predicted_loss_increase"):
                result.pop(key, None)  # measured at the old ranks: not true any more
            layers = [m for m in model.modules() if isinstance(m, DroneLinear)]
            dense = sum(m.dense_parameters for m in layers)
            if dense and "targeted_param_ratio" in result:
                result["targeted_param_ratio"] = sum(m.factored_parameters for m in layers) / dense
            result["progressive"] = True
