"""What kind of model a module is, decided in one place.

Allocation (``eval_loss="auto"``), the Fisher statistics and distillation all branch on "is this a
causal language model". Three separate checks had drifted apart: one knew only the ``…ForCausalLM``
suffix, so GPT-2's ``GPT2LMHeadModel`` was allocated on hidden-state distortion instead of its
next-token loss, and ``eval_loss="lm"`` was refused for it.
"""

from __future__ import annotations

from torch import nn

#: Class-name endings of causal LM heads outside transformers' auto mapping (remote code, subclasses).
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """True for next-token language models: the classes ``AutoModelForCausalLM`` builds, and any
    class named like one. A bare decoder (``config.is_decoder`` without an LM head) is not: it has no
    logits to take a next-token loss on."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..training._model import unwrap  # PEFT / torch.compile / DDP wrappers

    base = unwrap(model)
    name = type(base).__name__
    if name.endswith("WithLMHeadModel"):  # XLM / Flaubert: one head for both objectives, causal only if set so
        return bool(getattr(getattr(base, "config", None), "causal", False))
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(_CAUSAL_LM_SUFFIXES)
