"""drone-hf: DRONE data-aware low-rank compression as a Hugging Face Transformers plugin.

Importing this package registers the ``"drone"`` quantization method with transformers and adds
the ``drone_config=`` keyword to ``from_pretrained``::

    >>> from transformers import AutoModel
    >>> import drone_hf
    >>> model = AutoModel.from_pretrained(path, drone_config=drone_hf.DroneConfig(param_ratio=0.5))
    >>> print(drone_hf.report(model))
    >>> model.save_pretrained("out")          # a DRONE checkpoint
    >>> AutoModel.from_pretrained("out")      # rebuilt factored (with drone_hf imported)

Paper: Chen, Yu, Dhillon, Hsieh, "DRONE: Data-aware Low-rank Compression for Large NLP Models",
NeurIPS 2021.
"""

from .allocation import allocate_ranks
from .compress import compress
from .config import DEFAULT_DAMP, FORMAT_VERSION, QUANT_METHOD, DroneConfig
from .loading import patch_from_pretrained, register
from .modules.low_rank_linear import DroneLinear
from .quantizer import DroneHfQuantizer
from .report import CompressionReport, LayerRow, report
from .utils.logging import set_verbosity

__version__ = "0.1.0"

register()
patch_from_pretrained()

# --- Sharing (drone_hf/hub): the self-describing checkpoint format and Hub pushes. Importing the
# subpackage after registration hooks it in: DRONE checkpoints are marked on save (so plain
# transformers refuses them instead of loading random weights) and unmarked on load.
from . import hub  # noqa: E402
from .hub import push_to_hub  # noqa: E402

hub.install()

# --- Fine-tuning after compression (drone_hf/training): Trainer callbacks, distillation, PEFT.
# Imported on first use: it loads transformers' Trainer machinery, which `import drone_hf` (the
# CLI, plain loading) should not pay for.
_TRAINING_EXPORTS = (
    "CompressOnTrainBeginCallback",
    "CompressionStatsCallback",
    "DistillationLoss",
    "ProgressiveRankCallback",
    "SelectTrainableCallback",
)


def __getattr__(name: str):
    if name == "training" or name in _TRAINING_EXPORTS:
        import importlib

        training = importlib.import_module(".training", __name__)
        return training if name == "training" else getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DAMP",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CompressOnTrainBeginCallback",
    "CompressionReport",
    "CompressionStatsCallback",
    "DistillationLoss",
    "DroneConfig",
    "DroneHfQuantizer",
    "DroneLinear",
    "LayerRow",
    "ProgressiveRankCallback",
    "SelectTrainableCallback",
    "__version__",
    "allocate_ranks",
    "compress",
    "hub",
    "push_to_hub",
    "report",
    "set_verbosity",
    "training",
]
