"""How many tokens a model's position embeddings can take: the cap on calibration and timing lengths."""

from __future__ import annotations

from torch import nn

#: Config fields that count position-embedding rows, by model family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


def usable_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` can embed, or ``None`` where its config states no limit.

    The config counts rows of the position table, which is not always the longest sequence:
    RoBERTa-style embeddings (RoBERTa, XLM-R, CamemBERT, MPNet, ...) number positions from
    ``padding_idx + 1``, so roberta-base's 514 rows hold 512 tokens and a 513-token text indexes
    past the table (an ``IndexError`` deep inside the forward pass). Such tables are recognised by
    their structure, a ``position_embeddings`` ``nn.Embedding`` with a ``padding_idx``, rather than
    by a list of model names that would miss the next family built the same way.
    """
    cfg = getattr(model, "config", None)
    limit = next((v for k in POSITION_KEYS if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)
    if limit is None:
        return None
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, nn.Embedding) and table.padding_idx is not None:
            limit = min(limit, table.num_embeddings - table.padding_idx - 1)
    return limit
