"""Logging for drone-hf, under transformers' verbosity controls.

drone-hf loggers live in the ``transformers`` hierarchy (``transformers.drone_hf.*``), so
``transformers.logging.set_verbosity_info()`` and ``TRANSFORMERS_VERBOSITY`` reach them too.
:func:`set_verbosity` sets the level of drone-hf's loggers alone.
"""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging

_ROOT = "transformers.drone_hf"


def get_logger(name: str) -> logging.Logger:
    """A logger for module ``name`` (``drone_hf.compress`` -> ``transformers.drone_hf.compress``)."""
    hf_logging.get_logger()  # make sure transformers' root handler is configured
    return logging.getLogger(f"{_ROOT}.{name.removeprefix('drone_hf.')}")


def set_verbosity(level: int) -> None:
    """Set the level of every drone-hf logger, e.g. ``set_verbosity(logging.INFO)``."""
    logging.getLogger(_ROOT).setLevel(level)
