"""PEFT on DRONE models: LoRA on the factors, adapters that reload onto a reloaded DRONE model.

A :class:`~drone_hf.DroneLinear` holds two plain ``nn.Linear`` factors named ``down`` and ``up``,
so LoRA wraps them like any linear layer: ``target_modules`` naming ``...query.down`` puts a rank-r
update on the ``in -> k`` factor. ``merge_and_unload`` then folds each update into its factor,
which keeps its shape, so the merged model is still factored at the same ranks and saves as a DRONE
checkpoint.

Gradient checkpointing: ``PeftModel`` calls ``enable_input_require_grads()`` only for models that are
*not* quantized, and a DRONE model reports ``is_quantized``. With reentrant checkpointing and frozen
embeddings no checkpointed block then sees an input that requires grad, and the adapters inside
get no gradient. :func:`prepare_lora_model` enables input gradients itself.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..modules.targets import canonical_name
from ..utils.logging import get_logger
from ._model import factored_layers, is_peft_model, require_factored, unwrap

logger = get_logger(__name__)

#: The factor sublayers of a ``DroneLinear``: LoRA can wrap either or both.
FACTORS = ("down", "up")


def lora_target_modules(
    model: nn.Module,
    factors: Sequence[str] = FACTORS,
    layers: str | Callable[[str], bool] | None = None,
) -> list[str]:
    """Full module names of the factors of every factored layer, for ``LoraConfig(target_modules=...)``.

    Selection is structural (every :class:`~drone_hf.DroneLinear`), so dense layers that happen to
    share a name (``query`` left dense) are never caught.

    Args:
        model: the compressed model you will pass to ``get_peft_model``.
        factors: ``("down", "up")`` (default), ``("down",)`` or ``("up",)``.
        layers: restrict to factored layers whose name (relative to the base model, e.g.
            ``encoder.layer.0.attention.self.query``) fully matches this regular expression, or for
            which this callable returns True.

    Raises:
        ValueError: bad ``factors``, no factored layer, or ``layers`` selects none.
    """
    if isinstance(factors, str) or not factors or any(f not in FACTORS for f in factors):
        raise ValueError(f"factors={factors!r} must be a non-empty list drawn from {list(FACTORS)}.")
    found = require_factored(unwrap(model), "lora_target_modules")
    if is_peft_model(model):
        raise ValueError("lora_target_modules takes the compressed model before get_peft_model, not a PeftModel.")
    if isinstance(layers, str):
        pattern = re.compile(layers)
        keep: Callable[[str], bool] = lambda name: bool(pattern.fullmatch(name))  # noqa: E731
    elif callable(layers) or layers is None:
        keep = layers or (lambda name: True)
    else:
        raise ValueError(f"layers={layers!r} must be a regular expression, a callable name -> bool, or None.")
    names = [f"{full}.{f}" for full in found if keep(canonical_name(model, full)) for f in factors]
    if not names:
        raise ValueError(
            f"layers={layers!r} selects no factored layer; names look like "
            f"{[canonical_name(model, n) for n in list(found)[:3]]}."
        )
    return names


def enable_input_grads(model: nn.Module) -> None:
    """Make the embedding output require grad (what PEFT skips for quantized models), so adapters
    inside reentrant-checkpointed blocks receive gradients."""
    target = unwrap(model)
    if hasattr(target, "enable_input_require_grads"):
        target.enable_input_require_grads()
    else:

        def make_inputs_require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
            output.requires_grad_(True)

        target.get_input_embeddings().register_forward_hook(make_inputs_require_grad)


def _onto_factors(model: nn.Module, targets: Any) -> Any:
    """LoRA target names that match a whole factored layer (``["query", "value"]``, the usual BERT
    recipe) name their two factors instead: PEFT cannot wrap a ``DroneLinear`` itself ("Target
    module drone.Linear(...) is not supported"), and an adapter beside a factored layer belongs on
    its factors. Other names, and a regular expression, are passed on as given."""
    if isinstance(targets, str) or not isinstance(targets, (list, tuple, set)):
        return targets
    names = [n for n, _ in unwrap(model).named_modules()]
    factored = set(factored_layers(unwrap(model)))
    out: list[str] = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if hits and all(n in factored for n in hits):
            out += [f"{t}.{f}" for f in FACTORS]
            logger.info(f"drone-hf: LoRA target {t!r} names factored layers; adapters go on its factors {t}.down/.up.")
        else:
            out.append(t)
    return type(targets)(out) if isinstance(targets, (list, tuple)) else set(out)


def prepare_lora_model(
    model: nn.Module,
    lora_config: Any,
    *,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    adapter_name: str = "default",
) -> Any:
    """``get_peft_model`` for a DRONE model, with the factors as default targets and checkpointing fixed.

    Args:
        model: a compressed transformers model (``drone_hf.compress`` or a reloaded DRONE checkpoint).
        lora_config: a ``peft.LoraConfig``; when its ``target_modules`` is ``None`` it gets
            :func:`lora_target_modules` (both factors of every factored layer); names of factored
            layers (``["query", "value"]``) are mapped to their factors. Not modified.
        gradient_checkpointing: turn on activation checkpointing (``gradient_checkpointing_kwargs``
            are passed on, e.g. ``{"use_reentrant": True}``).
        adapter_name: the PEFT adapter name.

    Input gradients are enabled for every DRONE model (PEFT skips that for quantized models), so
    checkpointing also works when Trainer turns it on later (``TrainingArguments(gradient_checkpointing=True)``).
    """
    from peft import get_peft_model

    if is_peft_model(model):
        raise ValueError("prepare_lora_model got a PeftModel already; pass the compressed model itself.")
    require_factored(model, "prepare_lora_model")
    config = copy.deepcopy(lora_config)
    if getattr(config, "target_modules", None) is None:
        config.target_modules = lora_target_modules(model)
    else:
        config.target_modules = _onto_factors(model, config.target_modules)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        kwargs = {
            "activation_checkpointing_kwargs"
            if enable.__name__.startswith("activation")
            else "gradient_checkpointing_kwargs": gradient_checkpointing_kwargs
        }
        enable(**kwargs)
    enable_input_grads(model)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    reached = sum(
        1 for m in factored_layers(unwrap(peft_model)).values() for f in FACTORS if hasattr(getattr(m, f), "lora_A")
    )
    if not reached:
        logger.warning(
            "drone-hf: the LoRA target_modules reach no DRONE factor (down/up); adapters sit on dense layers only. "
            "Use drone_hf.training.lora_target_modules(model) to target the factors."
        )
    return peft_model


def load_lora_adapter(
    model: nn.Module, adapter_path: str, *, is_trainable: bool = False, adapter_name: str = "default"
) -> Any:
    """``PeftModel.from_pretrained`` onto a reloaded DRONE model (checked to be factored first, so
    adapters saved on ``...down``/``...up`` find their layers instead of failing obscurely)."""
    from peft import PeftModel

    require_factored(model, "load_lora_adapter")
    if is_trainable:
        enable_input_grads(model)
    return PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable, adapter_name=adapter_name)


def merge_lora(peft_model: Any) -> nn.Module:
    """``merge_and_unload`` that checks the result is still factored at the same ranks.

    Each LoRA update is folded into the factor it wraps (``down`` stays ``k x in``, ``up`` stays
    ``out x k``), so the merged model is the DRONE model it was, with new factor values; it saves as a
    DRONE checkpoint.
    """
    if not is_peft_model(peft_model):
        raise ValueError(f"merge_lora takes a PeftModel, got {type(peft_model).__name__}.")
    before = {n: m.rank for n, m in factored_layers(unwrap(peft_model)).items()}
    merged = peft_model.merge_and_unload()
    after = {n: m.rank for n, m in factored_layers(merged).items()}
    if after != before:
        raise RuntimeError(
            f"merge_and_unload changed the factored structure ({len(before)} -> {len(after)} factored layers); "
            "this is a drone-hf bug, please report it."
        )
    return merged
