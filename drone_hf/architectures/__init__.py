"""Per-architecture adapters for DRONE's query-key (attention) compression.

One small file per family registers an :class:`~drone_hf.architectures.base.AttentionAdapter`:
``bert.py`` (BERT, RoBERTa), ``distilbert.py``, ``mpnet.py``, ``gpt2.py``. ``rotary.py`` explains
why rotary-embedding models are refused. Adding a family is one file plus one line in
:data:`ADAPTERS`; the generic code below finds, rebuilds and restores the modules by name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules.attention import DroneAttention
from ..modules.targets import canonical_name, replace_modules
from .base import AttentionAdapter
from .bert import BertLikeAdapter
from .distilbert import DistilBertAdapter
from .gpt2 import GPT2Adapter
from .mpnet import MPNetAdapter
from .rotary import rotary_refusal, uses_rotary

#: family -> adapter, in the order they are tried.
ADAPTERS: dict[str, AttentionAdapter] = {
    a.family: a for a in (BertLikeAdapter(), DistilBertAdapter(), MPNetAdapter(), GPT2Adapter())
}


def register_adapter(adapter: AttentionAdapter) -> None:
    """Add (or replace) the adapter of ``adapter.family``."""
    ADAPTERS[adapter.family] = adapter


def adapter_by_family(family: str) -> AttentionAdapter:
    return ADAPTERS[family]


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS.values() for t in a.model_types})


def _adapter_of(module: nn.Module) -> AttentionAdapter | None:
    for adapter in ADAPTERS.values():
        if adapter.matches(module):
            return adapter
    return None


def find_attention_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module, AttentionAdapter]]:
    """Canonical name -> (full name, module, adapter) of every supported self-attention module.

    Raises:
        ValueError: the model uses rotary embeddings (with the reason), or has no supported
            self-attention module (naming the supported families).
    """
    if uses_rotary(model):
        raise rotary_refusal(model)
    found = {}
    for full, module in model.named_modules():
        adapter = _adapter_of(module)
        if adapter is not None:
            found[canonical_name(model, full)] = (full, module, adapter)
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ValueError(
            f"compress_attention=True found no supported self-attention module in {type(model).__name__} "
            f"(model type {model_type!r}). Supported model types: {', '.join(supported_model_types())}. Its linear "
            "layers are still compressible: drop compress_attention."
        )
    return found


def compressed_attention_in_checkpoint(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Full names of ``model``'s supported (dense) self-attention modules whose tensors in
    ``state_dict`` are those of a DRONE-compressed module, i.e. a checkpoint that does not load into
    them. Meant for a ``load_state_dict`` pre-hook (``prefix``: the module's key prefix there).

    The test reads what the compression changes in the saved state, per module, from its adapter's
    :attr:`~AttentionAdapter.absorbed` children (those query-key compression replaces): a
    ``DroneAttention`` saves its query/key as ``nn.Linear(n, H·k)``, so an absorbed child's
    ``weight`` is either saved with the same input width, fewer rows and a multiple of the head
    count (BERT, RoBERTa, DistilBERT, MPNet: ``[H·k, n]`` under the dense ``[H·d, n]`` key), or not
    saved at all while the module's keys hold tensors the dense module has no place for (GPT-2:
    its fused ``c_attn`` is saved as ``query``/``key``/``value``). A dense checkpoint of the same
    model matches on every key and shape; one of a model of another size differs in input widths
    too, so neither is taken for a compressed one. A rank equal to the head width saves the dense
    shapes and is not seen (it loads, and is exactly the dense attention)."""
    found = []
    for full, module in model.named_modules():
        adapter = _adapter_of(module)
        if adapter is None:
            continue
        base = f"{prefix}{full}." if full else prefix
        own = {f"{base}{n}": t.shape for n, t in module.state_dict(keep_vars=True).items()}
        heads = adapter.num_heads(module)
        for child in adapter.absorbed:
            key = f"{base}{child}.weight"
            dense = own.get(key)
            saved = state_dict.get(key)
            if dense is None:
                continue
            if saved is None:
                narrowed = any(k.startswith(base) and k not in own for k in state_dict)
            else:
                shape = tuple(saved.shape)
                narrowed = (
                    len(shape) == len(dense) == 2 and shape[1] == dense[1] and shape[0] < dense[0]
                    and shape[0] % heads == 0
                )
            if narrowed:
                found.append(full)
                break
    return found


def rebuild_attention(
    model: nn.Module, attention_ranks: dict[str, int], errors: dict[str, Any] | None = None
) -> list[str]:
    """Replace each attention module named in a checkpoint's ``attention_ranks`` by an empty
    compressed one (meta-safe), so the checkpoint's narrower ``query``/``key`` keys match.

    Runs before weights load. Returns the recorded names this model does not have.
    """
    layers = {canonical_name(model, full): (full, m) for full, m in model.named_modules()}
    replacements, missing = {}, []
    for name, rank in attention_ranks.items():
        hit = layers.get(name)
        adapter = _adapter_of(hit[1]) if hit is not None else None
        if hit is None or adapter is None:
            missing.append(name)
            continue
        full, module = hit
        head_dim = adapter.qk_weights(module)[0].shape[0] // adapter.num_heads(module)
        if not 1 <= rank <= head_dim:
            raise ValueError(
                f"The checkpoint records attention rank {rank} for {name!r}, outside [1, {head_dim}] for its heads; "
                "the checkpoint's config.json is inconsistent with its model."
            )
        new = adapter.new_module(module, rank, getattr(model, "config", None))
        new.relative_error = (errors or {}).get(name)
        replacements[full] = new
    replace_modules(model, replacements)
    return missing


def restore_attention(model: nn.Module) -> int:
    """Turn every compressed attention module back into its original class (zero-padded heads,
    identical outputs), e.g. for ``model.dequantize()``. Returns how many were restored."""
    restored = {}
    for full, module in model.named_modules():
        if isinstance(module, DroneAttention):
            restored[full] = adapter_by_family(module.family).restore(module)
    replace_modules(model, restored)
    return len(restored)


__all__ = [
    "ADAPTERS",
    "AttentionAdapter",
    "adapter_by_family",
    "compressed_attention_in_checkpoint",
    "find_attention_layers",
    "rebuild_attention",
    "register_adapter",
    "restore_attention",
    "rotary_refusal",
    "supported_model_types",
    "uses_rotary",
]
