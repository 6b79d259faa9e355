"""Fine-tuning after DRONE compression with the stock ``transformers.Trainer``.

* Callbacks (:mod:`.callbacks`): :class:`SelectTrainableCallback`, :class:`CompressionStatsCallback`,
  :class:`CompressOnTrainBeginCallback`, :class:`ProgressiveRankCallback`; :func:`add_callbacks` puts
  them ahead of the ``report_to`` integrations so their ``drone/...`` log entries reach them.
* Distillation (:mod:`.distill`): :class:`DistillationLoss` for ``Trainer(compute_loss_func=...)``,
  :func:`distillation_trainer`.
* PEFT (:mod:`.peft_utils`): LoRA on the factors (:func:`lora_target_modules`,
  :func:`prepare_lora_model`, :func:`load_lora_adapter`, :func:`merge_lora`).
* A shallower student (:mod:`.shallow`): :func:`shallow_student` keeps a subset of the teacher's
  layers (distillation's depth cut, on top of which DRONE factors what remains).
* :func:`set_trainable` (the rule behind the trainable-set callback, for any training loop),
  :func:`compression_stats`, :func:`lower_ranks` (one progressive cut, by hand).
* The recipe (:mod:`.recipe`): compress -> distil -> evaluate -> save, behind
  ``examples/finetune_after_compression.py``.

Example::

    >>> import copy, drone_hf
    >>> from drone_hf.training import DistillationLoss, SelectTrainableCallback, add_callbacks
    >>> student = drone_hf.compress(copy.deepcopy(dense), drone_hf.DroneConfig(param_ratio=0.3, dataset=texts))
    >>> trainer = Trainer(model=student, args=args, train_dataset=train,
    ...                   compute_loss_func=DistillationLoss(dense, temperature=2.0, alpha=0.5).attach(student))
    >>> add_callbacks(trainer, SelectTrainableCallback("factors"), CompressionStatsCallback())
    >>> trainer.train(); trainer.save_model("out")   # a DRONE checkpoint
"""

from .callbacks import (
    CompressionStatsCallback,
    CompressOnTrainBeginCallback,
    ProgressiveRankCallback,
    SelectTrainableCallback,
    add_callbacks,
)
from .distill import DistillationLoss, distillation_trainer
from .peft_utils import load_lora_adapter, lora_target_modules, merge_lora, prepare_lora_model
from .progressive import lower_ranks
from .shallow import shallow_student, spread_layers
from .stats import compression_stats
from .trainable import TRAIN_MODES, TrainableSummary, set_trainable

__all__ = [
    "TRAIN_MODES",
    "CompressOnTrainBeginCallback",
    "CompressionStatsCallback",
    "DistillationLoss",
    "ProgressiveRankCallback",
    "SelectTrainableCallback",
    "TrainableSummary",
    "add_callbacks",
    "compression_stats",
    "distillation_trainer",
    "load_lora_adapter",
    "lora_target_modules",
    "lower_ranks",
    "merge_lora",
    "prepare_lora_model",
    "set_trainable",
    "shallow_student",
    "spread_layers",
]
