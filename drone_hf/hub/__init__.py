"""Sharing DRONE models: the self-describing checkpoint format, Hub pushes and model cards.

* :mod:`.checkpoint`: how a DRONE checkpoint marks itself so that plain transformers refuses it
  instead of loading random weights, and how drone_hf reads it back.
* :mod:`.push`: :func:`push_to_hub` (also behind ``model.push_to_hub`` for DRONE models).
* :mod:`.card`: the model card (Jinja template in ``templates/``) and the rank-per-layer plot.
* :mod:`.measure`: fidelity, perplexity, accuracy and latency against the dense model.
* :mod:`.summary`: what a saved checkpoint holds, read from its files without loading the model.
"""

from .card import TEMPLATE_PATH, Measurements, describe_device, plot_ranks, render_model_card
from .checkpoint import (
    CHECKPOINT_KEY,
    MARKER_MODEL_TYPE,
    DroneCheckpointConfig,
    install,
    is_drone_config_dict,
    is_drone_model,
    mark_config_dict,
    set_base_model,
    unmark_config_dict,
)
from .measure import measure_accuracy, measure_fidelity, measure_perplexity, measure_speed, read_labelled
from .push import push_folder, push_to_hub
from .summary import CheckpointSummary, summarize_checkpoint

__all__ = [
    "CHECKPOINT_KEY",
    "MARKER_MODEL_TYPE",
    "TEMPLATE_PATH",
    "CheckpointSummary",
    "DroneCheckpointConfig",
    "Measurements",
    "describe_device",
    "install",
    "is_drone_config_dict",
    "is_drone_model",
    "mark_config_dict",
    "measure_accuracy",
    "measure_fidelity",
    "measure_perplexity",
    "measure_speed",
    "plot_ranks",
    "push_folder",
    "push_to_hub",
    "read_labelled",
    "render_model_card",
    "set_base_model",
    "summarize_checkpoint",
    "unmark_config_dict",
]
