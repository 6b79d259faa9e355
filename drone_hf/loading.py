"""The ``drone_config=`` keyword of ``from_pretrained``, and the registration with transformers.

transformers forwards unknown ``from_pretrained`` keywords to the model's ``__init__``, which
raises ``TypeError``. Wrapping ``PreTrainedModel.from_pretrained`` once at import translates
``drone_config`` into ``quantization_config`` for every Auto class and concrete class alike.
Both steps are idempotent: re-importing or reloading drone_hf never registers twice.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from transformers import PreTrainedConfig, PreTrainedModel
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import QUANT_METHOD, DroneConfig
from .quantizer import DroneHfQuantizer

_PATCH_FLAG = "_drone_hf_patched"


def register() -> None:
    """Register ``"drone"`` with transformers' quantizer and config mappings (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not DroneConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(DroneConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not DroneHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(DroneHfQuantizer)


def _as_drone_config(value: Any) -> DroneConfig:
    if isinstance(value, DroneConfig):
        return value
    if isinstance(value, dict):
        return DroneConfig.from_dict(value)
    raise TypeError(f"drone_config must be a DroneConfig or a dict of its fields, got {type(value).__name__}.")


#: ``from_pretrained`` keywords that locate a config (passed on to read it the same way).
_LOCATING_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _refuse_recompressing(source: Any, kwargs: dict[str, Any]) -> None:
    """A new DRONE config for a checkpoint that is already DRONE-compressed would be dropped by
    transformers, which keeps a checkpoint's own quantization_config (with only a generic warning):
    the user's new budget would silently not apply. Refused, as ``compress`` refuses it."""
    if not isinstance(source, (str, os.PathLike)):
        return
    from .hub.checkpoint import is_drone_config_dict

    try:
        raw, _ = PreTrainedConfig.get_config_dict(source, **{k: kwargs[k] for k in _LOCATING_KWARGS if k in kwargs})
    except (OSError, ValueError):
        return  # transformers' own loading reports a missing or broken config
    if is_drone_config_dict(raw):
        raise ValueError(
            f"{os.fspath(source)!r} is already a DRONE checkpoint, so a new drone_config would be ignored "
            "(transformers keeps a checkpoint's own quantization_config). Load it without drone_config to use "
            "it as saved, or compress the dense model it came from with the new settings (or load it, call "
            "model.dequantize(), and drone_hf.compress the result)."
        )


def patch_from_pretrained() -> None:
    """Teach ``PreTrainedModel.from_pretrained`` the ``drone_config=`` keyword (idempotent)."""
    current = PreTrainedModel.__dict__["from_pretrained"].__func__
    if getattr(current, _PATCH_FLAG, False):
        return

    @functools.wraps(current)
    def from_pretrained(cls, *args: Any, drone_config: Any = None, **kwargs: Any):
        if drone_config is not None:
            if kwargs.get("quantization_config") is not None:
                raise ValueError(
                    "Pass either drone_config= or quantization_config=, not both: they name the same setting "
                    "(drone_config=cfg is shorthand for quantization_config=cfg)."
                )
            kwargs["quantization_config"] = _as_drone_config(drone_config)
        if isinstance(kwargs.get("quantization_config"), DroneConfig) and args:
            _refuse_recompressing(args[0], kwargs)
        return current(cls, *args, **kwargs)

    setattr(from_pretrained, _PATCH_FLAG, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
