"""What the training helpers need to know about a (possibly wrapped) DRONE model and its optimizer.

Everything here selects by structure, never by name substring: factored layers are
``isinstance(m, DroneLinear)``, heads are what lies outside the base model (or under a head
component such as ``pooler``, exactly as compression excludes them), and parameters are matched
to optimizer groups by identity.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modules.low_rank_linear import DroneLinear
from ..modules.targets import HEAD_COMPONENTS, _base_prefix, canonical_name


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (checked without importing peft when it is not loaded)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / ``torch.compile`` / DDP wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if is_peft_model(model):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        ):
            model = model.module
    return model


def factored_layers(model: nn.Module) -> dict[str, DroneLinear]:
    """Full module name -> every :class:`DroneLinear` of ``model`` (structural selection)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DroneLinear)}


def require_factored(model: nn.Module, what: str) -> dict[str, DroneLinear]:
    """The factored layers of ``model``; a ``ValueError`` naming the fix when there are none."""
    layers = factored_layers(model)
    if not layers:
        raise ValueError(
            f"{what} needs a DRONE-compressed model, but {type(model).__name__} has no factored layer. Compress it "
            "first (drone_hf.compress(model, DroneConfig(...)) or from_pretrained(..., drone_config=...)), or put "
            "CompressOnTrainBeginCallback before this one in the Trainer's callbacks."
        )
    return layers


def head_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter that belongs to a head: a module outside the base model of a task
    class (``classifier``, ``lm_head``, ``score``...) or one under a head component inside it
    (``pooler``), the same rule compression uses to leave heads dense.

    A head weight tied to the input embeddings (GPT-2's ``lm_head``) is *not* counted: it is the
    embedding matrix, and making "the head" trainable must not silently train all embeddings.
    """
    prefix = _base_prefix(model)
    body_params = set()
    head = set()
    for full, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        outside = prefix is not None and not (full == prefix or full.startswith(prefix + "."))
        component = bool(HEAD_COMPONENTS.intersection(canonical_name(model, full).split(".")))
        for p in own:
            (head if outside or component else body_params).add(id(p))
    return head - body_params


def named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


# --- the optimizer Trainer already built ---------------------------------------------------------


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    inner = optimizer
    while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters Trainer applies weight decay to (its own rule, so added parameters
    land in the group they would have been in had they existed when the optimizer was built)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # the method does not read ``self``


@dataclass
class OptimizerUpdate:
    """What :func:`sync_optimizer` changed: parameters dropped, added, and states discarded."""

    removed: int = 0
    added: int = 0
    states_dropped: int = 0


def sync_optimizer(optimizer: Any, model: nn.Module, weight_decay: float) -> OptimizerUpdate:
    """Make an already built optimizer train exactly the model's current trainable parameters.

    ``Trainer`` creates its optimizer before ``on_train_begin`` (``_prepare_for_training``), from
    the parameters that required grad then. A callback that swaps modules (compression) or unfreezes
    parameters afterwards must tell the optimizer, or the new parameters are never updated. This
    removes parameters that left the model, and appends trainable ones it does not hold to the
    existing group of their kind (decayed or not, by Trainer's rule), so the learning-rate scheduler,
    which keys on groups, is unaffected. The default pair of groups is then laid out as a fresh
    ``Trainer`` would build it for the model now (trainable parameters in model order, frozen ones
    dropped), so the optimizer state a checkpoint saves lines up with the optimizer of a resumed run.

    Raises:
        ValueError: the optimizer's groups are not Trainer's default decayed / not-decayed pair, so
            there is no safe group to add to.
    """
    inner = inner_optimizer(optimizer)
    live = {id(p): (n, p) for n, p in model.named_parameters()}
    update = OptimizerUpdate()
    held = set()
    for group in inner.param_groups:
        kept = []
        for p in group["params"]:
            if id(p) in live:
                kept.append(p)
                held.add(id(p))
            else:
                update.removed += 1
                if inner.state.pop(p, None) is not None:
                    update.states_dropped += 1
        group["params"] = kept
    missing = [(n, p) for i, (n, p) in live.items() if i not in held and p.requires_grad]
    if not missing:
        _in_trainer_order(inner, model, decay_parameter_names(model), update)
        return update
    groups = inner.param_groups
    decayed = [g for g in groups if g.get("weight_decay", 0.0) == weight_decay]
    plain = [g for g in groups if g.get("weight_decay", 0.0) == 0.0]
    if not groups or not decayed or not plain or len(groups) > 2:
        raise ValueError(
            f"The optimizer ({type(inner).__name__}, {len(groups)} parameter groups) is not the Trainer's default "
            f"decayed/not-decayed pair, so {len(missing)} newly trainable parameter(s) (e.g. {missing[0][0]!r}) have "
            "no safe group to join. Compress and choose the trainable set before creating the Trainer "
            "(drone_hf.compress(...) and drone_hf.training.set_trainable(...)), or let Trainer build its default "
            "optimizer."
        )
    decay = decay_parameter_names(model)
    for name, p in missing:
        (decayed[0] if name in decay else plain[-1])["params"].append(p)
        update.added += 1
    _in_trainer_order(inner, model, decay, update)
    return update


def _in_trainer_order(inner: Any, model: nn.Module, decay: set[str], update: OptimizerUpdate) -> None:
    """Lay the default decayed / not-decayed pair out as ``Trainer.create_optimizer`` would for the
    model as it is now: trainable parameters in ``named_parameters()`` order, frozen ones left out.

    ``torch.optim.Optimizer.load_state_dict`` matches saved states to parameters by position. With
    the new parameters appended at the end (and frozen ones still held), the optimizer a checkpoint
    saved did not line up with the one a resumed run builds: loading failed on group sizes, or put
    Adam moments on the wrong parameters where the shapes happened to agree. States stay keyed by
    parameter, so reordering loses nothing."""
    groups = inner.param_groups
    if len(groups) != 2:
        return
    held = {id(p) for g in groups for p in g["params"]}
    for p in [p for g in groups for p in g["params"] if not p.requires_grad]:  # a fresh optimizer skips them
        update.removed += 1
        if inner.state.pop(p, None) is not None:
            update.states_dropped += 1
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in held]
    groups[0]["params"] = [p for n, p in trainable if n in decay]
    groups[1]["params"] = [p for n, p in trainable if n not in decay]


# --- calibration rows from the Trainer's training data -------------------------------------------


def sample_batches(
    dataloader: Any, num_samples: int, seed: int, batch_size: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Up to ``num_samples`` training rows as collated CPU batches, without advancing training.

    A map-style dataset is indexed directly (seeded choice of rows, collated by the dataloader's
    own ``collate_fn``), so the Trainer's sampler and its random state are untouched. An iterable
    dataset is read from a fresh iterator of the dataloader.
    """
    if dataloader is None:
        raise ValueError(
            "No training dataloader is available at train begin; give the Trainer a train_dataset (calibration "
            "reads the training rows)."
        )
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    size = batch_size or getattr(dataloader, "batch_size", None) or 8
    batches: list[dict[str, torch.Tensor]] = []
    if dataset is not None and collate is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        if n == 0:
            raise ValueError("The training dataset is empty; calibration needs training rows.")
        rows = sorted(random.Random(seed).sample(range(n), min(num_samples, n)))
        for start in range(0, len(rows), size):
            batches.append(_to_cpu(collate([dataset[i] for i in rows[start : start + size]])))
    else:
        taken = 0
        for batch in dataloader:
            batches.append(_to_cpu(batch))
            taken += _rows(batches[-1])
            if taken >= num_samples:
                break
    if not batches:
        raise ValueError("The training dataloader produced no batch; calibration needs training rows.")
    return batches


def _to_cpu(batch: Any) -> dict[str, torch.Tensor]:
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ValueError(
            f"Training batches must be dicts of tensors (input_ids, attention_mask, ...), got {type(batch).__name__}."
        )
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in dict(batch).items()}


def _rows(batch: dict[str, torch.Tensor]) -> int:
    ids = batch.get("input_ids")
    return int(ids.shape[0]) if torch.is_tensor(ids) else 1


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A training batch as forward inputs for statistics: labels dropped (no loss needed) and an
    all-ones ``attention_mask`` added when the collator gave none (every position is real)."""
    out = {k: v for k, v in batch.items() if k not in ("labels", "label", "label_ids") and torch.is_tensor(v)}
    if "input_ids" not in out:
        raise ValueError(f"Training batches need input_ids for calibration; got keys {sorted(batch)}.")
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out
