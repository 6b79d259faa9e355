"""Calibration: from user data to each layer's input Gram (torch + transformers only; no solver)."""

from .data import BUILTIN_CORPORA, DEFAULT_CORPUS, CalibrationBatches, load_builtin_corpus, load_texts, tokenize_batches
from .observer import GramObserver
from .pipeline import collect_grams

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_CORPUS",
    "CalibrationBatches",
    "GramObserver",
    "collect_grams",
    "load_builtin_corpus",
    "load_texts",
    "tokenize_batches",
]
