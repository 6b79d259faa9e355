"""Load-time validation: a DRONE checkpoint's weights must match what its config.json records.

transformers would notice a shape mismatch too, but only as a load report followed by a generic
error, and a missing factor would be initialised at random. This check reads the safetensors
headers only (no tensor data) before any weight is used, and names the layer, the recorded rank
and both shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .modules.low_rank_linear import DroneLinear
from .modules.targets import canonical_name


def _checkpoint_shapes(files: Sequence[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 - any header failure means an unreadable file
            raise ValueError(
                f"Cannot read the checkpoint file {Path(file).name} ({type(e).__name__}: {e}); it is truncated or "
                "corrupt. Download or save it again; nothing was loaded."
            ) from e
    return shapes


def _strip_prefix(key: str, prefixes: Sequence[str]) -> str:
    for p in prefixes:
        if p and key.startswith(p + "."):
            return key[len(p) + 1 :]
    return key


def validate_factored_checkpoint(model: nn.Module, checkpoint_files: Sequence[str] | None) -> None:
    """Check every skeleton ``DroneLinear`` against the checkpoint's tensor shapes.

    Raises:
        ValueError: a factor tensor is missing, or its shape disagrees with the recorded rank.
    """
    if not checkpoint_files:
        return
    shapes = _checkpoint_shapes(checkpoint_files)
    if not shapes:
        return  # not safetensors (e.g. a .bin checkpoint): transformers' own checks apply
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_canonical = {_strip_prefix(k, [prefix]): v for k, v in shapes.items()}
    for name, module in model.named_modules():
        if not isinstance(module, DroneLinear):
            continue
        c = canonical_name(model, name)
        expected = {
            "down": (module.rank, module.in_features),
            "up": (module.out_features, module.rank),
        }
        for part, shape in expected.items():
            got = by_canonical.get(f"{c}.{part}.weight")
            if got is None:
                raise ValueError(
                    f"The checkpoint's config.json records {c!r} as factored (rank {module.rank}) but the weights "
                    f"have no '{c}.{part}.weight' tensor. The checkpoint is incomplete or its config.json belongs "
                    "to another checkpoint: download or save it again, keeping config.json and the weights together; "
                    "nothing was loaded."
                )
            if tuple(got) != shape:
                raise ValueError(
                    f"The checkpoint's config.json and its weights disagree on {c!r}: the config records rank "
                    f"{module.rank} ({part} {list(shape)}) but the weights hold {part} {list(got)}. Fix "
                    "quantization_config.ranks in config.json or re-save the model; nothing was loaded."
                )


def validate_narrowed_checkpoint(model: nn.Module, narrowed: Sequence[str],
                                 checkpoint_files: Sequence[str] | None) -> None:
    """Check every narrowed MLP layer (full names, built by ``narrow_skeleton``) against the
    checkpoint's tensor shapes, before any weight is used.

    Raises:
        ValueError: a layer's weight is missing, or its width disagrees with ``mlp_widths``.
    """
    if not checkpoint_files or not narrowed:
        return
    shapes = _checkpoint_shapes(checkpoint_files)
    if not shapes:
        return
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_canonical = {_strip_prefix(k, [prefix]): v for k, v in shapes.items()}
    for full in narrowed:
        c = canonical_name(model, full)
        expected = tuple(model.get_submodule(full).weight.shape)
        got = by_canonical.get(f"{c}.weight")
        if got is None or tuple(got) != expected:
            held = "no such tensor" if got is None else f"{list(got)}"
            raise ValueError(
                f"The checkpoint's config.json records {c!r} as a pruned MLP layer of weight shape {list(expected)} "
                f"(quantization_config.mlp_widths) but the weights hold {held}. The config.json belongs to another "
                "checkpoint or was edited: download or save it again, keeping config.json and the weights together; "
                "nothing was loaded."
            )
