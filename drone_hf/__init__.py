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

__all__ = [
    "DEFAULT_DAMP",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CompressionReport",
    "DroneConfig",
    "DroneHfQuantizer",
    "DroneLinear",
    "LayerRow",
    "__version__",
    "allocate_ranks",
    "compress",
    "hub",
    "push_to_hub",
    "report",
    "set_verbosity",
]
