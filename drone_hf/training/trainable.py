"""Which parameters train after compression: ``set_trainable`` (the rule) for any training loop.

DRONE-retrain (the paper's recovery step) fine-tunes the factored model; how much of it should move
is a choice between recovery and forgetting: the factors only, everything, or one side of each
factored pair. The task head stays trainable unless frozen explicitly, because a head that cannot
adapt to the compressed features is the first thing that limits recovery.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._model import count, factored_layers, head_parameter_ids, is_peft_model, require_factored

#: ``set_trainable`` modes: what trains besides the heads.
TRAIN_MODES = ("factors", "all", "up", "down")


@dataclass(frozen=True)
class TrainableSummary:
    """What :func:`set_trainable` left trainable.

    Attributes:
        mode: the mode applied.
        freeze_heads: whether heads were frozen.
        trainable_params, total_params: element counts (shared parameters counted once).
        factored_layers: number of :class:`~drone_hf.DroneLinear` layers in the model.
        head_params: elements of the head parameters (trainable or not).
    """

    mode: str
    freeze_heads: bool
    trainable_params: int
    total_params: int
    factored_layers: int
    head_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def to_logs(self) -> dict[str, float]:
        """Numeric entries for ``Trainer`` logs (TensorBoard/W&B accept numbers only)."""
        return {
            "drone/trainable_params": float(self.trainable_params),
            "drone/trainable_fraction": self.trainable_fraction,
        }

    def __str__(self) -> str:
        heads = "heads frozen" if self.freeze_heads else "heads trainable"
        return (
            f"training {self.mode!r} ({heads}): {self.trainable_params:,} of {self.total_params:,} parameters "
            f"({self.trainable_fraction:.1%}), {self.factored_layers} factored layers"
        )


def check_mode(mode: str) -> None:
    if mode not in TRAIN_MODES:
        raise ValueError(
            f"train={mode!r} is not a training mode: use one of {list(TRAIN_MODES)} ('factors': both factors of every "
            "factored layer, 'all': every parameter, 'up'/'down': one side of each factored pair)."
        )


def set_trainable(model: nn.Module, train: str = "factors", freeze_heads: bool = False) -> TrainableSummary:
    """Set ``requires_grad`` on a DRONE-compressed model for fine-tuning after compression.

    Args:
        model: a compressed transformers model (not a PEFT model: PEFT chooses its own trainable set).
        train: ``"factors"``: the ``down`` and ``up`` factors of every factored layer (with the bias
            ``up`` carries) and the narrowed query/key projections of query-key compressed attention
            (``compress_attention=True``), everything else frozen; ``"all"``: every parameter; ``"up"`` / ``"down"``:
            that side of each factored pair only (``up`` includes the bias). Layers kept dense,
            embeddings and norms train only with ``"all"``.
        freeze_heads: freeze the heads too (``classifier``, ``pooler``, ``lm_head``...; a head tied to
            the input embeddings counts as the embeddings). Default ``False``: heads always train,
            because a head that cannot adapt to the compressed features limits recovery.

    Returns:
        A :class:`TrainableSummary` (also what the callback logs).

    Raises:
        ValueError: unknown ``train``, a PEFT model, or a model without factored layers.
    """
    check_mode(train)
    if is_peft_model(model):
        raise ValueError(
            "set_trainable got a PEFT model: PEFT already chose what trains (the adapters and modules_to_save). "
            "Drop the trainable-set callback, or call set_trainable on the compressed model before get_peft_model."
        )
    from ..modules.attention import DroneAttention

    attention = [m for m in model.modules() if isinstance(m, DroneAttention)]
    layers = factored_layers(model) if attention else require_factored(model, "set_trainable")
    chosen: set[int] = set()
    for layer in layers.values():
        if train in ("factors", "down"):
            chosen.add(id(layer.down.weight))
        if train in ("factors", "up"):
            chosen.update(id(p) for p in layer.up.parameters())
    if train == "factors":  # the narrowed query/key projections are what query-key compression changed
        for module in attention:
            chosen.update(id(p) for proj in (module.query_proj, module.key_proj) for p in proj.parameters())
    heads = head_parameter_ids(model)
    params = list(model.parameters())  # shared (tied) parameters appear once
    for p in params:
        if id(p) in heads:
            p.requires_grad_(not freeze_heads)
        else:
            p.requires_grad_(train == "all" or id(p) in chosen)
    return TrainableSummary(
        mode=train,
        freeze_heads=freeze_heads,
        trainable_params=count(p for p in params if p.requires_grad),
        total_params=count(params),
        factored_layers=len(layers),
        head_params=count(p for p in params if id(p) in heads),
    )
