"""Per-channel mean absolute input activations, the statistic ASVD scales by.

ASVD (``method="asvd"``) weights input channel ``j`` of a layer by ``mean(|x_j|)^α`` over the real
calibration tokens. This module streams ``Σ |x_j|`` and the token count, masking padding exactly as
the Gram pipeline does (:mod:`drone_hf.calibration.pipeline`), in its own forward pass: it only runs
when the method needs it, and leaves the Gram pipeline untouched. ``O(n)`` memory per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import CalibrationBatches
from .distributed import all_reduce_sum
from .pipeline import _eval_mode, _input_device, real_tokens
from .resumable import resumable_batches

if TYPE_CHECKING:
    from .cache import CalibrationCache


class AbsMeanObserver:
    """Accumulates ``Σ |x|`` (float64) and the token count for one layer input of width ``features``."""

    def __init__(self, features: int, name: str = "") -> None:
        self.features = features
        self.name = name
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.num_tokens = 0

    def add(self, tokens: torch.Tensor) -> None:
        """Add [N, features] real tokens."""
        if tokens.shape[-1] != self.features:
            raise RuntimeError(f"Layer {self.name!r} got inputs of width {tokens.shape[-1]}, expected {self.features}.")
        total = tokens.detach().abs().to(torch.float64).sum(dim=0).cpu()
        if not bool(torch.isfinite(total).all()):
            raise ValueError(
                f"Non-finite activations (NaN/inf) reached layer {self.name!r}. Load the model in float32 "
                "(dtype=torch.float32) or check the calibration texts."
            )
        self.abs_sum += total
        self.num_tokens += int(tokens.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """[features] mean absolute value per channel (zeros before any token)."""
        return self.abs_sum / max(self.num_tokens, 1)


def collect_abs_means(
    model: nn.Module, layers: dict[str, nn.Module], data: CalibrationBatches,
    cache: CalibrationCache | None = None, show_progress: bool = False,
) -> dict[str, AbsMeanObserver]:
    """One forward pass over ``data``; name -> observer of the layer's input channel magnitudes.

    Under ``torch.distributed`` the sums and counts are all-reduced, so every process gets the
    statistics of the whole calibration set. ``cache``: the pass is resumable (entry ``abs-means``,
    :mod:`~drone_hf.calibration.resumable`); ``show_progress``: a tqdm bar.
    """
    observers = {name: AbsMeanObserver(layer.weight.shape[1] if isinstance(layer, nn.Linear)
                                       else layer.weight.shape[0], name) for name, layer in layers.items()}
    state: dict = {"mask": None, "rows": {}}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if args else None
            if not torch.is_tensor(x):
                raise RuntimeError(f"Layer {name!r} was called without a tensor input; it cannot be calibrated.")
            observers[name].add(real_tokens(x, state, name))

        return hook

    def snapshot() -> dict:
        return {"observers": {n: {"abs_sum": o.abs_sum, "num_tokens": o.num_tokens} for n, o in observers.items()}}

    def restore(snap: dict) -> bool:
        if set(snap.get("observers", {})) != set(observers):
            return False
        for n, st in snap["observers"].items():
            observers[n].abs_sum, observers[n].num_tokens = st["abs_sum"].to(torch.float64), int(st["num_tokens"])
        return True

    steps = resumable_batches(len(data.batches), "Mean |x|", snapshot, restore, cache, "abs-means", show_progress)
    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    device = _input_device(model)
    try:
        with _eval_mode(model), torch.inference_mode():
            for i in steps:
                batch = data.batches[i]
                state["mask"], state["rows"] = batch["attention_mask"].bool(), {}
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    for name in sorted(observers):  # the same order in every process
        obs = observers[name]
        packed = all_reduce_sum(torch.cat([obs.abs_sum, torch.tensor([float(obs.num_tokens)], dtype=torch.float64)]))
        obs.abs_sum, obs.num_tokens = packed[:-1], int(packed[-1])
    return observers
