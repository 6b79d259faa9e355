"""Names that may be written into a checkpoint, its card and the Hub: never a local path.

A local path means nothing on another machine and reveals the user's directory layout once a
checkpoint is pushed. Hub ids and the built-in corpus names are kept; a local path is written as
``<local path: NAME>``, its last component only, so a reader still sees which file it was.
"""

from __future__ import annotations

import os
from typing import Any

from ..calibration.data import BUILTIN_CORPORA


def hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub id (``org/name`` or ``name``) and is not a local path, else ``None``."""
    if not name or os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")):
        return None
    parts = name.split("/")
    return name if 1 <= len(parts) <= 2 and all(parts) else None


def public_name(value: Any) -> Any:
    """``value`` as a checkpoint may record it: built-in corpus names and Hub ids unchanged, a local
    path reduced to ``<local path: NAME>``; anything that is not a string is returned as it is."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or value in BUILTIN_CORPORA or value.startswith("builtin:"):
        return value
    if hub_id(value) is not None:
        return value
    return f"<local path: {os.path.basename(os.path.normpath(value)) or value}>"
