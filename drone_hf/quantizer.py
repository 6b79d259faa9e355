"""``DroneHfQuantizer``: the transformers lifecycle adapter. Surgery and math live elsewhere.

* First load (``from_pretrained(dense, quantization_config=DroneConfig(...))``): the dense weights
  load as usual; after loading, :func:`~drone_hf.compress.compress_in_place` calibrates and factors.
* Reload (``from_pretrained(drone_checkpoint)``): before the weights load, every layer recorded in
  ``quantization_config.ranks`` becomes an empty :class:`~drone_hf.modules.DroneLinear`, so the
  checkpoint's ``down``/``up`` keys match one to one, and every MLP block in ``mlp_widths`` gets
  empty layers of its pruned width. Attention layers recorded in
  ``quantization_config.attention_ranks`` (query-key compression) are rebuilt first, the same way.

Tested against transformers 5.x (the ``HfQuantizer`` hooks changed between 4.x and 5.x).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .config import DroneConfig
from .modules.low_rank_linear import DroneLinear
from .modules.mlp_blocks import narrow_skeleton, restore_widths
from .modules.targets import build_skeleton, canonical_name, replace_modules
from .utils.logging import get_logger
from .validation import validate_factored_checkpoint, validate_narrowed_checkpoint

logger = get_logger(__name__)


class DroneHfQuantizer(HfQuantizer):
    """Loads, compresses and dequantizes DRONE models inside ``PreTrainedModel.from_pretrained``."""

    requires_calibration = False  # True would mean "can only load pre-compressed checkpoints"
    quantization_config: DroneConfig

    def __init__(self, quantization_config: DroneConfig, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = DroneConfig.from_dict(quantization_config)
        # Our own copy: compression fills in ranks, and the user's object must not change under them.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """Refuse a ``device_map`` naming a device this machine does not have, before anything loads.

        CPU and disk offload are honoured (see :mod:`drone_hf.calibration.offload`): offloaded target
        layers are materialised for their solve and replaced by in-memory factors.
        """
        if self.pre_quantized or not isinstance(device_map, dict):
            return
        for module, place in device_map.items():
            problem = _unavailable(place)
            if problem:
                raise ValueError(
                    f"device_map places {module or 'the model'!r} on {place!r}, but {problem}; drone-hf cannot "
                    "calibrate there. Use devices this machine has, 'cpu', or 'disk' (with offload_folder=)."
                )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            return
        ranks = self.quantization_config.ranks
        attention_ranks = self.quantization_config.attention_ranks
        widths = self.quantization_config.mlp_widths
        if not ranks and not attention_ranks and not widths:
            raise ValueError(
                "This checkpoint's quantization_config says 'drone' but records no ranks, so its factored layers "
                "cannot be rebuilt. It was not written by drone-hf's save_pretrained, or config.json was edited."
            )
        if attention_ranks:  # first: GPT-2's split value only exists in the rebuilt attention module
            from .architectures import rebuild_attention

            gone = rebuild_attention(model, attention_ranks, self.quantization_config.attention_errors)
            if gone:
                logger.warning(
                    f"{len(gone)} compressed attention layer(s) recorded in the checkpoint are not part of "
                    f"{type(model).__name__} (e.g. {gone[0]!r}); they are skipped."
                )
                self._forget(gone, "attention_ranks", "attention_errors")
        narrowed: list[str] = []
        if widths:  # pruned MLP blocks: narrowed dense layers, recorded by block
            before = {n: m for n, m in model.named_modules()}
            gone = narrow_skeleton(model, widths)
            if gone:
                logger.warning(
                    f"{len(gone)} pruned MLP block(s) recorded in the checkpoint are not part of "
                    f"{type(model).__name__} (e.g. {gone[0]!r}); they are skipped."
                )
                self._forget(gone, "mlp_widths")
            narrowed = [n for n, m in model.named_modules() if n in before and before[n] is not m]
        missing = build_skeleton(model, ranks or {})
        if missing:
            logger.warning(
                f"{len(missing)} factored layer(s) recorded in the checkpoint are not part of "
                f"{type(model).__name__} (e.g. {missing[0]!r}); they are skipped. This is expected when a task "
                "checkpoint is loaded as its base model."
            )
            self._forget(missing, "ranks", "relative_errors")
        validate_factored_checkpoint(model, kwargs.get("checkpoint_files"))
        validate_narrowed_checkpoint(model, narrowed, kwargs.get("checkpoint_files"))
        errors = self.quantization_config.relative_errors or {}
        for name, module in model.named_modules():
            if isinstance(module, DroneLinear):
                module.relative_error = errors.get(canonical_name(model, name))

    def _forget(self, names: list[str], *records: str) -> None:
        """Drop skipped layers from the loaded record: it describes this model from now on, and a
        save would otherwise write ranks with no tensors behind them (a checkpoint that neither
        reloads as the task model nor passes ``drone-hf inspect``)."""
        for key in records:
            record = getattr(self.quantization_config, key, None)
            if isinstance(record, dict):
                setattr(self.quantization_config, key, {k: v for k, v in record.items() if k not in names})

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            from .compress import compress_in_place

            with torch.no_grad():
                compress_in_place(model, self.quantization_config)
            model.config.quantization_config = self.quantization_config
        return model

    def dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge the factors back into dense layers; ``dtype=None`` keeps each layer's own dtype.

        transformers' default casts the merged layers to ``model.config.dtype``, the dtype the model
        was loaded in, which ``model.to(torch.bfloat16)`` does not update: float32 merged layers next
        to bfloat16 ones then fail at the first matmul. The merge is computed in the factors' dtype,
        so leaving it there is exact; an explicit ``dtype`` casts the whole model, restored attention
        modules included, as ``model.to(dtype)`` would."""
        model = self._dequantize(model, dtype=None)
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        self.remove_quantization_config(model)
        from .hub.checkpoint import CHECKPOINT_KEY

        if hasattr(model.config, CHECKPOINT_KEY):  # a dense model now: no DRONE provenance record to save
            delattr(model.config, CHECKPOINT_KEY)
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge every ``up @ down`` back into a dense layer of the original kind."""
        dense = {name: m.to_dense() for name, m in model.named_modules() if isinstance(m, DroneLinear)}
        if isinstance(dtype, torch.dtype):
            for layer in dense.values():
                layer.to(dtype)
        replace_modules(model, dense)
        from .architectures import restore_attention

        restore_attention(model)  # after the merge: restored modules take dense value layers
        widths = self.quantization_config.mlp_widths
        if widths:  # pruned MLPs back to the architecture's width (zero neurons: the same function)
            restore_widths(model, widths)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # The factors are ordinary nn.Linear weights: full fine-tuning in Trainer is fine.
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _unavailable(place: Any) -> str | None:
    """Why ``place`` (a device_map value) cannot be used on this machine, or ``None`` when it can."""
    if place in ("cpu", "disk"):
        return None
    if place == "meta":
        return "the meta device holds no weights to calibrate"
    try:  # an integer is an accelerator index (accelerate's convention)
        accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        device = torch.device(accel.type if accel else "cuda", place) if isinstance(place, int) else torch.device(place)
    except (RuntimeError, TypeError):
        return "that is not a device name"
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)
    count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else 0
    if device.index is None and count > 0 or (device.index is not None and device.index < count):
        return None
    return f"torch sees {count} {device.type} device(s)"
