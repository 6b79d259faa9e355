"""Rotary-embedding models (Llama, Qwen, Mistral, ...): query-key compression is refused.

With rotary position embeddings, queries and keys are rotated by position-dependent angles
*between* the projection and the product: ``s_ij = (R_i W_Q x_i)ᵀ (R_j W_K x_j) = x_iᵀ W_Qᵀ R_{j-i} W_K x_j``.
The product ``W_Qᵀ W_K`` that DRONE approximates no longer exists on its own (it changes with the
distance ``j - i``), so a rank-k query-key form fitted to it would be wrong at every position but
one. These models still compress well with ordinary low-rank linear layers (q/k/v/o projections
and the MLP), which is what drone-hf does for them.
"""

from __future__ import annotations

from torch import nn

#: ``config.model_type`` values known to use rotary embeddings (any module whose class name contains
#: "Rotary" is detected too).
ROTARY_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
        "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "gpt_neox", "gptj",
        "falcon", "smollm3", "deepseek_v3",
    }
)


def uses_rotary(model: nn.Module) -> bool:
    """Whether ``model`` applies rotary position embeddings (by model type or by its modules)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ROTARY_MODEL_TYPES:
        return True
    return any("Rotary" in type(m).__name__ for m in model.modules())


def rotary_refusal(model: nn.Module) -> ValueError:
    """The error telling the user why QK compression cannot apply, and what still can."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return ValueError(
        f"compress_attention=True is not supported for {model_type!r}: it uses rotary position embeddings, which "
        "rotate queries and keys by position between the two projections, so the query-key product that DRONE "
        "compresses depends on the distance between tokens and has no single low-rank form. Its q/k/v/o "
        "projections are still compressible as ordinary linear layers: drop compress_attention (and "
        "attention_rank) and use param_ratio / target_modules as usual."
    )
