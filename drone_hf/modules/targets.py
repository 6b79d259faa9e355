"""Which layers to factor, under which names, and how to swap them.

Names are recorded relative to the base model (``encoder.layer.0.attention.self.query``) so a
checkpoint saved from ``BertForSequenceClassification`` (``bert.encoder...``) reloads as
``BertModel`` (``encoder...``) and the reverse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .low_rank_linear import DroneLinear, source_kind

#: Name components that mark a head or pooler: never targeted by default (name them in
#: ``target_modules`` to factor them anyway). Output embeddings and tied weights are excluded too.
HEAD_COMPONENTS = frozenset({"pooler", "classifier", "lm_head", "qa_outputs", "score", "cls"})


def _base_prefix(model: nn.Module) -> str | None:
    """The base-model attribute name of a task model (``"bert"``), ``None`` for a base model."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module) and getattr(model, prefix) is not model:
        return prefix
    return None


def canonical_name(model: nn.Module, name: str) -> str:
    """``name`` relative to the base model (the task-model prefix stripped)."""
    prefix = _base_prefix(model)
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def supported_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Canonical name -> (full name, layer) for every ``nn.Linear``/``Conv1D`` in the model."""
    out = {}
    for full, module in model.named_modules():
        if source_kind(module) is not None:
            out[canonical_name(model, full)] = (full, module)
    return out


def _excluded_by_default(model: nn.Module, canonical: str, full: str, module: nn.Module) -> bool:
    prefix = _base_prefix(model)
    if prefix is not None and not full.startswith(prefix + "."):
        return True  # task head outside the base model
    if HEAD_COMPONENTS.intersection(canonical.split(".")):
        return True
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None and module is out_emb:
        return True
    return _tied_to_input_embeddings(model, module)


def _tied_to_input_embeddings(model: nn.Module, module: nn.Module) -> bool:
    """``module``'s weight *is* the input embeddings' (a tied LM head or output projection)."""
    get_in = getattr(model, "get_input_embeddings", None)
    in_emb = get_in() if callable(get_in) else None
    weight = getattr(module, "weight", None)
    return in_emb is not None and weight is not None and weight is getattr(in_emb, "weight", None)


def _refuse_tied(model: nn.Module, chosen: dict[str, tuple[str, nn.Module]]) -> None:
    """A named target whose weight *is* the input embeddings' (a tied LM head) cannot be factored.

    Replacing it unties the pair in memory (the embedding matrix then stored twice, the model larger)
    and writes a checkpoint transformers cannot reload (its tied-weights list still names the head's
    ``weight``). The default targets leave such heads out; a list or pattern naming one is refused."""
    for canonical, (_, module) in chosen.items():
        if _tied_to_input_embeddings(model, module):
            raise ValueError(
                f"target_modules selects {canonical!r}, whose weight is tied to the input embeddings "
                "(tie_word_embeddings): factoring it would untie the two and write a checkpoint transformers "
                f"cannot reload. Leave {canonical!r} out of target_modules (the default targets already do), or "
                "load the model with tie_word_embeddings=False to compress an untied head."
            )


def name_matches(entry: str, canonical: str, full: str) -> bool:
    """List-entry matching: the name itself, or a dotted suffix of it (``"query"`` matches ``...self.query``)."""
    return any(n == entry or n.endswith("." + entry) for n in (canonical, full))


def _regex_matches(pattern: str, canonical: str, full: str) -> bool:
    return any(re.fullmatch(pattern, n) for n in (canonical, full))


def _examples(names: Iterable[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "")


def resolve_targets(
    model: nn.Module,
    target_modules: str | list[str] | None,
    modules_to_not_convert: list[str] | None,
) -> dict[str, tuple[str, nn.Module]]:
    """Canonical name -> (full name, layer) of every layer to factor, in forward (module) order.

    Raises:
        ValueError: an entry of ``target_modules`` or ``modules_to_not_convert`` matches no
            supported layer, or nothing is left to compress.
    """
    layers = supported_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no torch.nn.Linear or transformers Conv1D layer; "
            "DRONE has nothing to compress. "
            "If this is a part or a wrapper of a transformer, pass the transformer model itself."
        )
    if target_modules is None:
        chosen = {c: v for c, v in layers.items() if not _excluded_by_default(model, c, v[0], v[1])}
    elif isinstance(target_modules, str):
        chosen = {c: v for c, v in layers.items() if _regex_matches(target_modules, c, v[0])}
        if not chosen:
            raise ValueError(
                f"target_modules={target_modules!r} (a regular expression) matches no linear layer; "
                f"layer names look like {_examples(layers)}."
            )
    else:
        chosen = {}
        for entry in target_modules:
            hits = {c: v for c, v in layers.items() if name_matches(entry, c, v[0])}
            if not hits:
                other = next((m for n, m in model.named_modules() if n and name_matches(entry, n, n)), None)
                kind = f" (it names a {type(other).__name__}, which DRONE cannot factor)" if other is not None else ""
                raise ValueError(
                    f"target_modules entry {entry!r} matches no linear layer of {type(model).__name__}{kind}; "
                    f"layer names look like {_examples(layers)} (DRONE factors torch.nn.Linear and Conv1D layers)."
                )
            chosen.update(hits)
        chosen = {c: layers[c] for c in layers if c in chosen}  # keep module order
    if target_modules is not None:
        _refuse_tied(model, chosen)
    for entry in modules_to_not_convert or []:
        if not any(_within(entry, canonical_name(model, n), n) for n, _ in model.named_modules() if n):
            raise ValueError(
                f"modules_to_not_convert entry {entry!r} matches no module of {type(model).__name__}; "
                f"layer names look like {_examples(layers)}."
            )
        chosen = {c: v for c, v in chosen.items() if not _within(entry, c, v[0])}
    if not chosen:
        raise ValueError(
            "No layer is left to compress after applying target_modules and modules_to_not_convert: remove entries "
            "from modules_to_not_convert or widen target_modules."
        )
    return chosen


def _within(entry: str, canonical: str, full: str) -> bool:
    """Whether ``entry`` names this module or a container of it (``"layer.5"`` covers all of block 5)."""
    for name in (canonical, full):
        parts = name.split(".")
        if any(name_matches(entry, ".".join(parts[:i]), "") for i in range(1, len(parts) + 1)):
            return True
    return False


def rank_for(canonical: str, full: str, ranks: dict[str, int] | None) -> int | None:
    """The fixed rank of a layer from ``ranks`` (exact name first, then regex in dict order)."""
    if not ranks:
        return None
    for key in (canonical, full):
        if key in ranks:
            return ranks[key]
    for key, value in ranks.items():
        if _regex_matches(key, canonical, full):
            return value
    return None


def check_rank_keys(ranks: dict[str, int] | None, targets: dict[str, tuple[str, nn.Module]]) -> None:
    """Every ``ranks`` key must name (or match) at least one targeted layer."""
    for key in ranks or {}:
        if not any(key in (c, v[0]) or _regex_matches(key, c, v[0]) for c, v in targets.items()):
            raise ValueError(
                f"ranks key {key!r} matches no targeted layer; targeted layers look like {_examples(targets)}. "
                "Use names relative to the base model or a regular expression that matches whole names."
            )


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Swap modules by full name, keeping accelerate's dispatch hook (if any) on the new module."""
    for full, new in replacements.items():
        old = model.get_submodule(full)
        hook = getattr(old, "_hf_hook", None)
        if hook is not None:
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(new, hook)
        model.set_submodule(full, new)


def build_skeleton(model: nn.Module, ranks: dict[str, int]) -> list[str]:
    """Replace each layer named in a checkpoint's ``ranks`` by an empty ``DroneLinear`` (meta-safe).

    Runs before weights load, so checkpoint keys (``...query.down.weight``) match one to one.
    Returns the recorded names this model does not have (e.g. a classifier when reloading a task
    checkpoint as the base model).
    """
    layers = supported_layers(model)
    replacements, missing = {}, []
    for name, rank in ranks.items():
        hit = layers.get(name)
        if hit is None:
            missing.append(name)
            continue
        full, layer = hit
        weight = layer.weight
        out_f, in_f = (weight.shape[1], weight.shape[0]) if source_kind(layer) == "conv1d" else tuple(weight.shape)
        if rank > min(in_f, out_f):
            raise ValueError(
                f"The checkpoint records rank {rank} for {name!r}, larger than its {out_f}x{in_f} shape allows; "
                "the checkpoint's config.json is inconsistent with its model."
            )
        with torch.device(weight.device):
            replacements[full] = DroneLinear(
                in_f, out_f, rank, bias=getattr(layer, "bias", None) is not None,
                source=source_kind(layer), dtype=weight.dtype,  # type: ignore[arg-type]
            )
    replace_modules(model, replacements)
    return missing
