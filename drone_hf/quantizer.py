"""``DroneHfQuantizer``: the transformers lifecycle adapter. Surgery and math live elsewhere.

* First load (``from_pretrained(dense, quantization_config=DroneConfig(...))``): the dense weights
  load as usual; after loading, :func:`~drone_hf.compress.compress_in_place` calibrates and factors.
* Reload (``from_pretrained(drone_checkpoint)``): before the weights load, every layer recorded in
  ``quantization_config.ranks`` becomes an empty :class:`~drone_hf.modules.DroneLinear`, so the
  checkpoint's ``down``/``up`` keys match one to one. Attention layers recorded in
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
from .modules.targets import build_skeleton, canonical_name, replace_modules
from .utils.logging import get_logger
from .validation import validate_factored_checkpoint

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
        if self.pre_quantized or not isinstance(device_map, dict):
            return
        offloaded = sorted({str(v) for v in device_map.values() if str(v) in ("cpu", "disk")})
        devices = {str(v) for v in device_map.values()}
        if offloaded and len(devices) > 1:
            raise ValueError(
                f"Compressing while offloading to {offloaded} is not supported yet: calibration needs every "
                "target weight materialised. Load without offload (e.g. device_map=None or a single device), "
                "compress, save, and reload the (smaller) DRONE checkpoint with offload."
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            return
        ranks = self.quantization_config.ranks
        attention_ranks = self.quantization_config.attention_ranks
        if not ranks and not attention_ranks:
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
        missing = build_skeleton(model, ranks or {})
        if missing:
            logger.warning(
                f"{len(missing)} factored layer(s) recorded in the checkpoint are not part of "
                f"{type(model).__name__} (e.g. {missing[0]!r}); they are skipped. This is expected when a task "
                "checkpoint is loaded as its base model."
            )
        validate_factored_checkpoint(model, kwargs.get("checkpoint_files"))
        errors = self.quantization_config.relative_errors or {}
        for name, module in model.named_modules():
            if isinstance(module, DroneLinear):
                module.relative_error = errors.get(canonical_name(model, name))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            from .compress import compress_in_place

            with torch.no_grad():
                compress_in_place(model, self.quantization_config)
            model.config.quantization_config = self.quantization_config
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
