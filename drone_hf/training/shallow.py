"""A shallower student for distillation: keep a subset of the teacher's transformer layers.

DRONE's largest reported speedups (over 12x) come from combining it with distillation into a
model with fewer layers: factoring removes work *inside* each layer, but attention scores, softmax,
norms and residual adds stay, so factoring alone saturates (on the MPNet classifier at 32x128 every
layer at its fastest rank measured 2.84-2.99x end to end; ``benchmarks/results/frontier_mpnet.md``).
Dropping layers removes all of a layer's work. :func:`shallow_student` builds such a student the way DistilBERT was
initialised: a copy of the teacher that keeps every ``L/n``-th layer (the last one included, so the
student's final hidden state corresponds to the teacher's), then
:class:`~drone_hf.training.DistillationLoss` trains it against the teacher, matching each kept
layer's output to the teacher layer it came from (the map is stored in the student's config), and
``drone_hf.compress`` factors it.

The kept layers are recorded as ``config.drone_teacher_layers`` (teacher indices, in order), so a
saved student says where it came from and the distillation loss can align hidden states without
being told. Layer counters the model uses at run time (``config.num_hidden_layers``,
``config.layer_types``, each attention module's ``layer_idx`` that indexes the KV cache) are
renumbered for the new depth.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from ._model import unwrap

#: Config attribute that records which teacher layers a student kept (teacher indices, in order).
TEACHER_LAYERS_KEY = "drone_teacher_layers"


def spread_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices, evenly spread and ending with the last layer.

    12 -> 6 keeps ``[1, 3, 5, 7, 9, 11]``; 12 -> 4 keeps ``[2, 5, 8, 11]``.
    """
    if not 1 <= keep <= total:
        raise ValueError(f"Cannot keep {keep} of {total} layers: choose between 1 and {total}.")
    return [(i + 1) * total // keep - 1 for i in range(keep)]


def layer_stack(model: nn.Module) -> tuple[str, str, nn.ModuleList]:
    """Where the model's chain of transformer layers is: the holding module's name, the attribute
    name, and the list (so a copy of the model finds its own chain by name).

    The chain is the one ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` and whose
    entries share one type (``encoder.layer`` in BERT/MPNet, ``transformer.h`` in GPT-2,
    ``model.layers`` in Llama). Encoder-decoder models have two chains and are refused.
    """
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    depth = getattr(cfg, "num_hidden_layers", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(base).__name__} is an encoder-decoder model with two layer chains; shallow_student supports "
            "encoder-only and decoder-only models."
        )
    if not isinstance(depth, int):
        raise ValueError(
            f"{type(base).__name__}'s config has no integer num_hidden_layers, so its layer chain cannot be found; "
            "shallow_student needs a transformers model with a single stack of layers."
        )
    found = []
    for parent_name, parent in base.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == depth and len({type(c) for c in child}) == 1:
                found.append((parent_name, attr, child))
    if len(found) != 1:
        where = ", ".join(f"{p + '.' if p else ''}{a}" for p, a, _ in found) or "none"
        raise ValueError(
            f"shallow_student needs exactly one list of {depth} identical layers in {type(base).__name__} "
            f"(found: {where}); this architecture is not supported."
        )
    return found[0]


def shallow_student(
    teacher: nn.Module,
    num_layers: int | None = None,
    *,
    layers: Sequence[int] | None = None,
) -> nn.Module:
    """A copy of ``teacher`` with fewer transformer layers, initialised from the teacher's.

    Args:
        teacher: a transformers model (dense or DRONE-compressed); it is not modified.
        num_layers: how many layers the student keeps, spread evenly (:func:`spread_layers`).
        layers: or exactly which teacher layers to keep (strictly increasing indices).

    Returns:
        The student: same class, embeddings and head as the teacher, ``config.num_hidden_layers``
        equal to the kept count and ``config.drone_teacher_layers`` naming the kept layers.

    Raises:
        ValueError: neither or both of ``num_layers`` and ``layers`` given, indices out of range or
            not increasing, or an architecture without a single layer chain.
    """
    if (num_layers is None) == (layers is None):
        raise ValueError("Pass exactly one of num_layers (how many layers to keep) or layers (which ones).")
    base = unwrap(teacher)
    holder, attr, chain = layer_stack(base)
    total = len(chain)
    if layers is None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise ValueError(f"num_layers={num_layers!r} must be an integer between 1 and {total}.")
        keep = spread_layers(total, num_layers)
    else:
        if (
            isinstance(layers, (str, bytes))
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
        ):
            raise ValueError(f"layers={layers!r} must be a non-empty list of integer layer indices.")
        keep = list(layers)
        if any(not 0 <= i < total for i in keep) or keep != sorted(set(keep)):
            raise ValueError(
                f"layers={keep} must be strictly increasing indices in [0, {total - 1}] (the teacher has {total} "
                "layers)."
            )
    if getattr(getattr(base, "config", None), "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            f"{type(base).__name__} has scale_attn_by_inverse_layer_idx=True: each layer's attention is scaled by "
            "1/(layer index + 1), fixed when the layer is built, so a student's renumbered layers would compute "
            "differently once saved and reloaded. Distil into a student built with that option off, or keep all "
            "layers."
        )
    student = copy.deepcopy(base)
    parent = student.get_submodule(holder)
    setattr(parent, attr, nn.ModuleList([getattr(parent, attr)[i] for i in keep]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():  # KV-cache slots and per-layer schedules are indexed by depth
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        cfg.layer_types = [layer_types[i] for i in keep]
    # indices into the model it was cut from (the teacher its distillation runs against)
    setattr(cfg, TEACHER_LAYERS_KEY, keep)
    _renumber_records(student, f"{holder}.{attr}" if holder else attr, keep)
    return student


def _renumber_records(student: nn.Module, chain: str, keep: list[int]) -> None:
    """Key a DRONE-compressed student's records by its own layer numbers.

    ``ranks``/``relative_errors`` and ``attention_ranks``/``attention_errors`` name layers by path,
    with the teacher's indices (``encoder.layer.3.attention.self.query``); ``save_pretrained`` writes
    them next to the student's weights, whose layer 1 is that teacher layer 3. Left as they were, the
    reload rebuilds layer 1 at layer 1's recorded rank and refuses the mismatch. Entries of cut layers
    are dropped; entries outside the layer chain are kept."""
    from ..modules.targets import canonical_name
    from .stats import quantization_records

    prefix = canonical_name(student, chain) + "."
    new_index = {old: new for new, old in enumerate(keep)}

    def renamed(name: str) -> str | None:
        if not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix):].partition(".")
        if not index.isdigit() or int(index) not in new_index:
            return None  # a layer the student does not have
        return f"{prefix}{new_index[int(index)]}" + (f".{rest}" if rest else "")

    for record in quantization_records(student):
        for key in ("ranks", "relative_errors", "attention_ranks", "attention_errors"):
            table = getattr(record, key, None)
            if isinstance(table, dict):
                setattr(record, key, {new: v for name, v in table.items() if (new := renamed(name)) is not None})


def hidden_state_map(student: nn.Module) -> dict[int, int] | None:
    """Student ``hidden_states`` index -> teacher index for a :func:`shallow_student` (``None`` otherwise).

    ``hidden_states[0]`` is the embedding output in both models; the student's ``i + 1`` is the
    output of its layer ``i``, which started as teacher layer ``kept[i]`` (decoders: see
    :func:`final_norm` for the last one).
    """
    cfg = getattr(unwrap(student), "config", None)
    kept = getattr(cfg, TEACHER_LAYERS_KEY, None)
    if not isinstance(kept, list):
        return None
    return {0: 0} | {i + 1: int(t) + 1 for i, t in enumerate(kept)}


#: Names of a final norm applied to the last layer's output before it is returned as the last
#: hidden state (GPT-2 ``ln_f``, Llama/Qwen ``norm``, OPT/Falcon-style ``final_layer_norm``).
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a decoder applies to its last layer's output before returning it as the last hidden
    state, ``None`` where there is none (BERT-style encoders norm inside each layer).

    A shallow student's last hidden state is therefore normed while the teacher's state after the
    same kept layer is not: :class:`~drone_hf.training.DistillationLoss` passes that teacher state
    through the teacher's own final norm before comparing them (a student cut as the teacher's first
    layers then matches it exactly before training)."""
    try:
        holder, _, _ = layer_stack(model)
    except ValueError:
        return None
    parent = unwrap(model).get_submodule(holder)
    return next((m for name in _FINAL_NORMS if isinstance(m := getattr(parent, name, None), nn.Module)), None)
