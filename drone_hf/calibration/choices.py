"""Calibrating multiple-choice models (``…ForMultipleChoice``) on plain text.

Such a model takes ``[batch, choices, seq]`` ids and flattens them to ``[batch * choices, seq]``
before its encoder; fed the ``[batch, seq]`` batches calibration tokenises, it would read ``seq`` as
the number of choices and fail in its head. Every calibration text is fed as a question with one
choice, ``[batch, 1, seq]``: the encoder sees exactly the tokens of the text (the statistics equal
those of the bare encoder on the same texts), its hidden states come back ``[batch, seq, hidden]``,
and the masks callers hold stay 2-D.

One choice has no rival, so the model's loss is constant on such text (a softmax over one logit):
the loss-aware solvers and the logit-KL evaluation loss would see zero gradients and zero harm, and
are refused (:func:`refuse_choice_losses`); DRONE, SVD, ASVD, SVD-LLM and the hidden-state
distortion need no answer and work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: The inputs a multiple-choice model reshapes from ``[batch, choices, seq]``.
_PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: Methods whose statistics are gradients of the model's loss.
LOSS_AWARE_METHODS = ("fwsvd", "drone-kfac")


def is_multiple_choice(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForMultipleChoice")


def _one_choice(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    def lift(value: Any, dims: int) -> Any:
        return value.unsqueeze(1) if isinstance(value, torch.Tensor) and value.dim() == dims else value

    args = tuple(lift(a, 2) if i == 0 else a for i, a in enumerate(args))  # input_ids given positionally
    kwargs = {k: lift(v, 2) if k in _PER_TOKEN_INPUTS else lift(v, 3) if k == "inputs_embeds" else v
              for k, v in kwargs.items()}
    return args, kwargs


@contextmanager
def one_choice_per_text(model: nn.Module) -> Iterator[None]:
    """While calibrating, feed a multiple-choice model each ``[batch, seq]`` text batch as
    ``[batch, 1, seq]``; any other model is left alone. The hook is removed on exit, error or not."""
    if not is_multiple_choice(model):
        yield
        return
    handle = model.register_forward_pre_hook(_one_choice, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def refuse_choice_losses(model: nn.Module, method: str, eval_loss: str | None = None) -> None:
    """Refuse, before any calibration, what a multiple-choice model's loss cannot drive on plain text."""
    if not is_multiple_choice(model):
        return
    name = type(model).__name__
    if method in LOSS_AWARE_METHODS:
        raise ValueError(
            f"method={method!r} weighs layers by gradients of the model's loss, and {name} scores answer choices, "
            "which calibration text does not have (each text is one choice: the loss is constant and every gradient "
            "zero). Use method='drone' (data-aware, no loss needed), 'svdllm', 'asvd' or 'svd'."
        )
    if eval_loss == "logit_kl":
        raise ValueError(
            f"eval_loss='logit_kl' compares the answer distribution of {name}, which is constant on calibration "
            "text (one choice per text), so every rank would look harmless. Use eval_loss='distortion' (the default "
            "'auto' picks it) or pass loss_fn= that scores your own multiple-choice examples."
        )
