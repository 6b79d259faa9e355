"""Factored layers and the surgery that puts them into a model."""

from .low_rank_linear import SOURCE_KINDS, DroneLinear, dense_weight_of, source_kind
from .targets import build_skeleton, canonical_name, replace_modules, resolve_targets, supported_layers

__all__ = [
    "SOURCE_KINDS",
    "DroneLinear",
    "build_skeleton",
    "canonical_name",
    "dense_weight_of",
    "replace_modules",
    "resolve_targets",
    "source_kind",
    "supported_layers",
]
