"""Compressing a model loaded with accelerate offload (``device_map`` with ``"cpu"``/``"disk"`` entries).

``from_pretrained(..., device_map=...)`` dispatches offloaded layers with accelerate
``AlignDevicesHook``\\ s (``offload=True``): the layer's parameters sit on the meta device and the
hook's ``weights_map`` (CPU memory, or safetensors files in ``offload_folder``) supplies them to the
execution device for each forward pass. Calibration runs through these hooks unchanged. Solving and
factoring need the dense weight itself, so a target layer is *materialised* first: its weights are
read from the ``weights_map`` onto the execution device and the hook is removed, making it an
ordinary layer that the factored replacement then takes over. The factors are therefore ordinary
in-memory tensors on the execution device (written back factored, nothing left on meta); layers
that are not targets (norms, embeddings) stay offloaded as they were.

When: ``sequential=True`` materialises one block's targets right before that block is calibrated,
so at most one dense block is in memory besides the factors. One-shot mode materialises every
offloaded target before its single calibration pass (all dense targets at once: use
``sequential=True`` for models that do not fit).

Not honoured (clear error): a target on the meta device without an offload hook (e.g. a model built
under ``init_empty_weights`` and never loaded), or with a hook drone-hf does not know.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_offloaded(layer: nn.Module) -> bool:
    """Whether ``layer``'s weights are supplied by an accelerate offload hook."""
    hook = getattr(layer, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def check_materialisable(layers: dict[str, nn.Module]) -> None:
    """Refuse target layers whose weights are on the meta device with nothing to load them from.

    Raises:
        ValueError: names the first such layer and the fix.
    """
    bad = [
        name for name, layer in layers.items()
        if any(t.device.type == "meta" for t in layer.parameters(recurse=False)) and not is_offloaded(layer)
    ]
    if bad:
        raise ValueError(
            f"{len(bad)} target layer(s) have weights on the meta device and no accelerate offload hook to load them "
            f"from (e.g. {bad[0]!r}); drone-hf cannot honour this placement. Load the model's weights "
            "(from_pretrained with device_map entries 'cpu', 'disk' + offload_folder, or a device), not an empty "
            "skeleton."
        )


def materialise(layers: Iterable[nn.Module]) -> None:
    """Load offloaded ``layers``' weights onto their execution device and drop their offload hooks.

    Layers that are not offloaded are left as they are.
    """
    from accelerate.hooks import AlignDevicesHook, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for layer in layers:
        if not is_offloaded(layer):
            continue
        hook = layer._hf_hook
        if not isinstance(hook, AlignDevicesHook):
            raise ValueError(
                f"{type(layer).__name__} is offloaded through {type(hook).__name__}, a hook drone-hf does not know how "
                "to materialise; load it with a plain device_map ('cpu'/'disk' entries) instead."
            )
        device = hook.execution_device if hook.execution_device is not None else torch.device("cpu")
        params = dict(layer.named_parameters(recurse=False))
        names = list(params) + [n for n, _ in layer.named_buffers(recurse=False)]
        values = {n: hook.weights_map[n] for n in names if n in hook.weights_map}
        missing = [n for n, t in params.items() if n not in values and t.device.type == "meta"]
        if missing:
            raise ValueError(
                f"The offload store of {type(layer).__name__} has no {missing[0]!r}; drone-hf cannot materialise it."
            )
        remove_hook_from_module(layer)
        for name, value in values.items():
            set_module_tensor_to_device(layer, name, device, value=value)
