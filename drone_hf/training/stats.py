"""Compression statistics as flat numeric log entries (what ``Trainer`` forwards to ``report_to``).

Computed from the model's structure, not from its record: after a progressive rank schedule or
with PEFT adapters attached, the modules are the truth. The speedup is only ever *measured*: it is
reported when the compression record holds a measured value (``target_speedup`` budgets measure
the whole model) and the ranks are still the ones it was measured at.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules.targets import canonical_name
from ._model import count, factored_layers, unwrap

#: Prefix of every log key drone-hf adds (one TensorBoard/W&B section).
LOG_PREFIX = "drone/"


def quantization_record(model: nn.Module) -> Any:
    """The model's ``DroneConfig`` record (``config.quantization_config``), or ``None``."""
    return getattr(getattr(unwrap(model), "config", None), "quantization_config", None)


def quantization_records(model: nn.Module) -> list[Any]:
    """Every distinct ``DroneConfig`` record a change of ranks must update: ``config.quantization_config``
    (what ``save_pretrained`` writes) and the quantizer's copy, when they are not the same object."""
    quantizer = getattr(model, "hf_quantizer", None)
    candidates = (quantization_record(model), getattr(quantizer, "quantization_config", None))
    return list({id(r): r for r in candidates if r is not None}.values())


def compression_stats(model: nn.Module, per_layer_ranks: bool = False) -> dict[str, float]:
    """Numeric statistics of a DRONE model's current state, keyed ``drone/...``.

    Keys: ``factored_layers``, ``params`` (all parameters now, shared ones once), ``params_dense``
    (before compression), ``model_param_ratio``, ``targeted_param_ratio`` (factored / dense weights
    of the factored layers), ``rank_mean``/``rank_min``/``rank_max``, ``trainable_params``, and
    ``measured_speedup`` when the record has one for these ranks; with ``per_layer_ranks``, one
    ``rank/<layer name>`` entry per factored layer (names relative to the base model).

    A PEFT-wrapped model counts its adapters in ``params`` and ``trainable_params``, not in the
    dense size (``params_dense``). Query-key compressed attention (``compress_attention=True``)
    counts its query/key projections at their dense width in ``params_dense`` and adds
    ``compressed_attention_layers``; the rank and targeted keys describe factored linear layers and
    are left out when there are none. Returns ``{}`` for a model DRONE did not change.
    """
    from ..modules.attention import DroneAttention
    from ..report import _attention_row

    base = unwrap(model)
    layers = factored_layers(base)
    attention = [_attention_row(n, m) for n, m in base.named_modules() if isinstance(m, DroneAttention)]
    if not layers and not attention:
        return {}
    ranks = [m.rank for m in layers.values()]
    dense_w = sum(m.dense_parameters for m in layers.values())
    factored_w = sum(m.factored_parameters for m in layers.values())
    params = list(model.parameters())
    adapters = count(q for q in params if id(q) in adapter_parameter_ids(model))
    total = count(params)
    # compressed query/key projections count at their dense width before compression
    dense_total = (total - adapters - factored_w + dense_w
                   - sum(r.compressed_params for r in attention) + sum(r.dense_params for r in attention))
    p = LOG_PREFIX
    out = {
        f"{p}factored_layers": float(len(layers)),
        f"{p}params": float(total),
        f"{p}params_dense": float(dense_total),
        f"{p}model_param_ratio": total / dense_total if dense_total else 1.0,
        f"{p}trainable_params": float(count(q for q in params if q.requires_grad)),
    }
    if layers:
        out |= {
            f"{p}targeted_param_ratio": factored_w / dense_w if dense_w else 1.0,
            f"{p}rank_mean": sum(ranks) / len(ranks),
            f"{p}rank_min": float(min(ranks)),
            f"{p}rank_max": float(max(ranks)),
        }
    if attention:
        out[f"{p}compressed_attention_layers"] = float(len(attention))
    speedup = measured_speedup(base)
    if speedup is not None:
        out[f"{p}measured_speedup"] = speedup
    if per_layer_ranks:
        for name, m in layers.items():
            out[f"{p}rank/{canonical_name(base, name)}"] = float(m.rank)
    return out


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every PEFT-added parameter (adapter weights, and the trainable copies of
    ``modules_to_save``), found through PEFT's own layer classes: they are not part of the
    compressed model's size before or after compression."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return set()
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            out |= {id(p) for p in module.parameters()} - {id(p) for p in base.parameters()}
        elif isinstance(module, ModulesToSaveWrapper):
            out |= {id(p) for p in module.parameters()} - {id(p) for p in module.original_module.parameters()}
    return out


def measured_speedup(model: nn.Module) -> float | None:
    """The end-to-end speedup measured at compression time, if recorded and still valid.

    Valid means the factored layers still have the ranks the record holds (a progressive schedule
    that lowered them drops the measurement rather than report a stale number).
    """
    record = quantization_record(model)
    result = getattr(record, "allocation_result", None) or {}
    value = result.get("measured_speedup") if isinstance(result, dict) else None
    if value is None:
        return None
    recorded = getattr(record, "ranks", None) or {}
    base = unwrap(model)
    for name, m in factored_layers(base).items():
        if recorded.get(canonical_name(base, name), m.rank) != m.rank:
            return None
    return float(value)
