"""``TrainerCallback``s for fine-tuning after DRONE compression with the stock ``transformers.Trainer``.

* :class:`SelectTrainableCallback`: what trains (``"factors"``, ``"all"``, ``"up"``, ``"down"``; heads
  trainable unless frozen), applied at train begin and logged.
* :class:`CompressionStatsCallback`: parameters, ranks and the measured speedup in the Trainer logs,
  so they reach TensorBoard/W&B through ``report_to``.
* :class:`CompressOnTrainBeginCallback`: calibrate on the training rows and compress at train begin,
  then fine-tune the compressed model in the same run.
* :class:`ProgressiveRankCallback`: lower the ranks in stages during training toward a final budget,
  re-solving from the current weights.

**The optimizer exists before ``on_train_begin``.** ``Trainer.train`` builds it in
``_prepare_for_training`` from the parameters that require grad at that moment, then hands the
callbacks ``model``, ``optimizer`` and ``train_dataloader`` and fires ``on_train_begin``. No event
fires between ``train()`` and the optimizer's creation, and ``on_init_end`` has no training data.
So a callback that swaps modules or unfreezes parameters at train begin re-points the optimizer it
is given (:func:`~drone_hf.training._model.sync_optimizer`): departed parameters are removed, new
trainable ones join the Trainer's own decayed / not-decayed group (the scheduler is untouched, no
step has run, so no state is lost). That is exact for the default optimizer on one device. Where
the model is already wrapped by something that captured its parameters (DDP/FSDP/DeepSpeed,
``torch.compile``) or the optimizer is custom, the callbacks refuse with a ``ValueError`` that says
to compress and choose the trainable set before creating the Trainer (``drone_hf.compress`` and
:func:`~drone_hf.training.set_trainable`), which always works.

**Logs.** Callbacks cannot call ``Trainer.log``; they add their ``drone/...`` entries to the next
``logs`` dict in ``on_log`` (and to ``state.log_history``). ``Trainer`` places the ``report_to``
integrations *before* callbacks passed in ``callbacks=[...]``, so to reach TensorBoard/W&B add them
with :func:`add_callbacks` (which puts them ahead of the integrations); passed the usual way their
entries still reach the console and ``trainer.state.log_history``.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

from torch import nn
from transformers import DefaultFlowCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..architectures import compressed_attention_in_checkpoint
from ..compress import already_compressed, compress, held_out_count
from ..config import DroneConfig
from ..modules.attention import DroneAttention
from ..modules.low_rank_linear import DroneLinear
from ..utils.logging import get_logger
from ._model import (
    inner_optimizer,
    is_peft_model,
    require_factored,
    sample_batches,
    sync_optimizer,
    unwrap,
)
from .progressive import final_ranks_for, follow_saved_ranks, lower_ranks, stage_ranks
from .stats import LOG_PREFIX, compression_stats
from .trainable import TrainableSummary, check_mode, set_trainable

logger = get_logger(__name__)


def add_callbacks(trainer: Any, *callbacks: TrainerCallback) -> Any:
    """Add ``callbacks`` to ``trainer`` ahead of its ``report_to`` integrations (right after
    ``DefaultFlowCallback``), so the ``drone/...`` entries they add to the logs reach them; returns
    the trainer. Order among ``callbacks`` is kept (put compression before the others).

    The Trainer fired ``on_init_end`` before they were added, so it is fired here for drone-hf's own
    callbacks: what they do there (arm the checkpoint-load hooks a resumed run needs, choose the
    trainable set before the optimizer exists) must not depend on how they were attached."""
    handler = trainer.callback_handler
    at = next((i + 1 for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    for cb in callbacks:
        if not isinstance(cb, TrainerCallback):
            raise ValueError(f"add_callbacks takes TrainerCallback instances, got {type(cb).__name__}.")
    for offset, cb in enumerate(callbacks):
        handler.callbacks.insert(at + offset, cb)
    for cb in callbacks:
        if isinstance(cb, _LoggingCallback):
            cb.on_init_end(
                trainer.args, trainer.state, trainer.control, model=trainer.model,
                processing_class=getattr(trainer, "processing_class", None), optimizer=trainer.optimizer,
                lr_scheduler=trainer.lr_scheduler,
            )
    return trainer


# --- before Trainer loads a checkpoint's weights -----------------------------------------------
#
# ``Trainer.train(resume_from_checkpoint=...)`` loads the checkpoint's weights into ``trainer.model``
# (``model.load_state_dict(state_dict, strict=False)``) as the very first thing it does, before any
# callback event of that call: the last event a callback sees before the load is ``on_init_end``.
# So a callback whose run changes the model's shapes (a progressive cut; compression at train begin)
# arms a ``load_state_dict`` pre-hook on the model there, which sees the checkpoint's tensors just
# before they are copied in, and disarms it at ``on_train_begin``. The handles live with the model,
# not the callback: with ``restore_callback_states_from_checkpoint=True`` Trainer replaces the
# callback by a new instance after the load, and that instance must still find and remove them.

_LOAD_HOOKS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _arm_load_hook(model: nn.Module, key: str, hook: Any) -> None:
    hooks = _LOAD_HOOKS.setdefault(model, {})
    if key in hooks:  # a second Trainer on the same model: one hook per kind
        hooks.pop(key).remove()
    hooks[key] = model.register_load_state_dict_pre_hook(hook)


def _disarm_load_hook(model: nn.Module, key: str) -> None:
    handle = _LOAD_HOOKS.get(model, {}).pop(key, None)
    if handle is not None:
        handle.remove()


def _follow_checkpoint_ranks(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Pre-hook: reshape the factors to the ranks of the checkpoint being loaded (progressive cuts)."""
    cut = follow_saved_ranks(module, state_dict, prefix)
    if cut:
        logger.info(f"drone-hf: resuming a progressive run: {len(cut)} layer(s) set to the checkpoint's ranks.")


def _factored_in_checkpoint(module: nn.Module, state_dict: dict, prefix: str) -> list[str]:
    """Names of ``module``'s layers that ``state_dict`` holds factored (``DroneLinear``): a layer of
    the model whose ``weight`` is replaced by the ``down``/``up`` factors in the checkpoint."""
    names = {n for n, _ in module.named_modules()}
    found = []
    for key in state_dict:
        if key.startswith(prefix) and key.endswith(".down.weight"):
            layer = key[len(prefix) : -len(".down.weight")]
            if layer in names and f"{prefix}{layer}.weight" not in state_dict:
                found.append(layer)
    return found


def _refuse_drone_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Pre-hook on a dense model: a DRONE checkpoint cannot load into it (CompressOnTrainBeginCallback resume).

    Every kind of DRONE checkpoint is recognised from its saved tensors, the only record of the
    checkpoint this hook is given (Trainer hands ``load_state_dict`` the weights file alone; its
    ``config.json`` and the path are out of reach here): factored linear layers (``down``/``up``
    in place of ``weight``) and compressed attention (query/key narrowed to ``k``-wide heads, or
    GPT-2's fused ``c_attn`` split), alone or together. Attention-only checkpoints used to pass
    this check and then fail in torch's ``load_state_dict`` on query/key size mismatches (after
    copying the tensors that did fit into the dense model) or, for GPT-2 (whose split keys go
    unmatched under ``strict=False``), in the optimizer load."""
    factored = _factored_in_checkpoint(module, state_dict, prefix)
    attention = [] if factored else compressed_attention_in_checkpoint(module, state_dict, prefix)
    if factored or attention:
        what = f"{factored[0]!r} is factored" if factored else f"{attention[0]!r} has compressed query/key heads"
        raise ValueError(
            f"Trainer is resuming from a DRONE-compressed checkpoint (e.g. {what}) into the "
            "dense model CompressOnTrainBeginCallback would compress at train begin; the checkpoint's "
            "weights and optimizer state belong to the compressed model. Load the checkpoint with "
            "from_pretrained(checkpoint), and resume from it without CompressOnTrainBeginCallback (keep "
            "the other drone-hf callbacks)."
        )


class _LoggingCallback(TrainerCallback):
    """A callback that queues numeric entries and adds them to the next Trainer log (and its
    ``log_history`` row), so they reach ``report_to`` integrations that run after it."""

    _pending: dict[str, float]

    def _queue(self, entries: dict[str, float]) -> None:
        self._pending = getattr(self, "_pending", {}) | entries

    def _flush(self, state: TrainerState, logs: dict | None) -> None:
        pending = getattr(self, "_pending", {})
        if not pending or logs is None:
            return
        logs.update(pending)
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(pending)
        self._pending = {}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self._flush(state, logs)


def _check_plain_run(args: TrainingArguments, state: TrainerState, what: str, resuming_ok: bool = False) -> None:
    """Refuse setups where parameters were captured by a wrapper before train begin."""
    wrapped = []
    if getattr(args, "world_size", 1) > 1:
        wrapped.append(f"distributed training (world_size={args.world_size})")
    if getattr(args, "deepspeed", None):
        wrapped.append("DeepSpeed")
    if getattr(args, "fsdp", None):
        wrapped.append("FSDP")
    if getattr(args, "torch_compile", False):
        wrapped.append("torch_compile=True")
    if wrapped:
        raise ValueError(
            f"{what} changes the model's parameters at train begin, but {', '.join(wrapped)} captured them when the "
            "Trainer prepared the model. Compress (drone_hf.compress) and set the trainable parameters "
            "(drone_hf.training.set_trainable) before creating the Trainer instead."
        )
    if state.global_step > 0 and not resuming_ok:
        raise ValueError(
            f"{what} runs at the start of a fresh training run, but this run resumes at step {state.global_step}. "
            "Load the compressed checkpoint (from_pretrained) and resume without this callback."
        )


class SelectTrainableCallback(_LoggingCallback):
    """Choose what trains after compression; applied at train begin, logged as ``drone/trainable_*``.

    Args:
        train: ``"factors"`` (both factors of every factored layer), ``"all"``, ``"up"`` or ``"down"``;
            see :func:`~drone_hf.training.set_trainable`.
        freeze_heads: also freeze the heads (default: heads train).

    Parameters it unfreezes that the Trainer's optimizer does not hold (they were frozen when the
    optimizer was built) are added to it; parameters it freezes stop receiving gradients, which
    torch optimizers skip. Put it after :class:`CompressOnTrainBeginCallback` when both are used.
    """

    def __init__(self, train: str = "factors", freeze_heads: bool = False) -> None:
        check_mode(train)
        self.train = train
        self.freeze_heads = freeze_heads
        self.summary: TrainableSummary | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kwargs: Any) -> None:
        """Choose the trainable set before the Trainer builds its optimizer, when the model is already
        compressed: the optimizer (and one loaded from a checkpoint when resuming, which happens
        before ``on_train_begin``) then holds exactly these parameters. A model compressed at train
        begin (:class:`CompressOnTrainBeginCallback`) is handled there."""
        if model is not None and any(isinstance(m, (DroneLinear, DroneAttention)) for m in model.modules()):
            set_trainable(model, self.train, self.freeze_heads)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        before = {p: p.requires_grad for p in model.parameters()}
        summary = set_trainable(model, self.train, self.freeze_heads)
        if optimizer is not None:
            held = {id(p) for g in inner_optimizer(optimizer).param_groups for p in g["params"]}
            unheld = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
            try:
                if unheld:  # parameters frozen when the optimizer was built: it must learn about them
                    _check_plain_run(args, state, "SelectTrainableCallback (unfreezing parameters)", resuming_ok=True)
                sync_optimizer(optimizer, model, args.weight_decay)
            except ValueError:
                for p, flag in before.items():  # leave the model as it came
                    p.requires_grad_(flag)
                raise
        self.summary = summary
        logger.info(f"drone-hf: {summary}")
        self._queue(self.summary.to_logs())


class CompressionStatsCallback(_LoggingCallback):
    """Compression statistics in the Trainer logs: ``drone/params``, ``drone/model_param_ratio``,
    ``drone/targeted_param_ratio``, ``drone/rank_mean|min|max``, ``drone/factored_layers``,
    ``drone/trainable_params`` and ``drone/measured_speedup`` when the compression measured one.

    Args:
        per_layer_ranks: also log ``drone/rank/<layer>`` for every factored layer.
        every_log: add the entries to every log; by default only to the first log of each
            ``train()`` call and to the first log after they change (a progressive schedule), which
            keeps console logs readable while TensorBoard/W&B still get a point at every change.

    **Resuming.** A run resumed from a checkpoint (``train(resume_from_checkpoint=...)``) logs the
    stats again at its first log, although the checkpoint's ``log_history`` already holds them
    unchanged. That is deliberate, not a duplicate to suppress: the resumed run is usually a new
    process whose sinks start empty (its console, a new W&B run unless the user resumes that run,
    a new TensorBoard event file), and the stats describe the model it trains, so each run shows
    them once; where the old sinks continue, the cost is one repeated point of equal value, while
    skipping it would leave a fresh sink with no stats at all. The same holds for a resume on the
    same Trainer in the same process: each ``train()`` call starts over (:meth:`on_train_begin`).

    To reach ``report_to`` integrations add it with :func:`add_callbacks` (see the module docstring).
    """

    def __init__(self, per_layer_ranks: bool = False, every_log: bool = False) -> None:
        self.per_layer_ranks = per_layer_ranks
        self.every_log = every_log
        self.last: dict[str, float] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Forget what an earlier ``train()`` call logged, so this one logs the stats at its first log
        whether it runs in a new process or on the same Trainer (see **Resuming** above): which
        process runs a resume must not decide whether its logs show the stats."""
        self.last = {}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or logs is None:
            return
        stats = compression_stats(model, self.per_layer_ranks)
        if stats and (self.every_log or stats != self.last):
            self._queue(stats)
            self.last = stats
        self._flush(state, logs)


class CompressOnTrainBeginCallback(_LoggingCallback):
    """Compress the model at train begin, calibrated on the training rows, then fine-tune it.

    Args:
        config: the :class:`~drone_hf.DroneConfig` (budget, targets, method...). Its ``dataset`` is
            replaced by the training rows; ``num_samples`` rows are drawn with ``seed`` (plus
            ``eval_samples`` when the budget needs held-out text).
        tokenizer: turns training rows back into text for calibration; default: the Trainer's
            ``processing_class``, else ``config.tokenizer``.

    The rows are drawn from the training dataset directly (the sampler and its random state are
    untouched), decoded to text and handed to :func:`drone_hf.compress`, which re-tokenizes them:
    for WordPiece and byte-level BPE tokenizers the round trip gives back the training tokens (case
    and spacing normalisation aside). After compression the optimizer is re-pointed at the factors
    (see the module docstring); the model becomes a DRONE model, so ``trainer.save_model`` writes a
    factored checkpoint. Put it first among the drone-hf callbacks.

    **Resuming.** The run's checkpoints are compressed, so a resumed run starts from one:
    ``from_pretrained(checkpoint)``, then ``train(resume_from_checkpoint=checkpoint)`` without this
    callback (keep the others: a progressive schedule continues). Resumed with the dense model and
    this callback attached, the weight load is refused with that advice (:meth:`on_init_end`).
    """

    def __init__(self, config: DroneConfig | None = None, tokenizer: Any = None, seed: int | None = None) -> None:
        if config is not None and not isinstance(config, DroneConfig):
            raise ValueError(f"config must be a drone_hf.DroneConfig, got {type(config).__name__}.")
        self.config = config if config is not None else DroneConfig()
        self.tokenizer = tokenizer
        self.seed = self.config.seed if seed is None else seed
        self.compressed = False

    def _tokenizer(self, processing_class: Any) -> Any:
        for candidate in (self.tokenizer, processing_class, self.config.tokenizer):
            candidate = getattr(candidate, "tokenizer", candidate)  # a processor wraps its tokenizer
            if candidate is not None and callable(getattr(candidate, "decode", None)):
                return candidate
        raise ValueError(
            "CompressOnTrainBeginCallback needs a tokenizer to turn training rows into calibration text: pass "
            "Trainer(processing_class=tokenizer) or CompressOnTrainBeginCallback(config, tokenizer=tokenizer)."
        )

    def calibration_texts(self, train_dataloader: Any, tokenizer: Any, rows: int) -> list[str]:
        """``rows`` training rows (seeded) as text, real tokens only, special tokens dropped."""
        texts = []
        for batch in sample_batches(train_dataloader, rows, self.seed):
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            for i in range(ids.shape[0]):
                row = ids[i] if mask is None else ids[i][mask[i].bool()]
                text = tokenizer.decode(row.tolist(), skip_special_tokens=True).strip()
                if text:
                    texts.append(text)
        return texts

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kwargs: Any) -> None:
        """Arm the refusal of a compressed checkpoint: ``train(resume_from_checkpoint=...)`` loads the
        checkpoint's weights before any event of that call, and into the dense model they do not fit
        (most keys silently unmatched under Trainer's ``strict=False``; the run then failed in torch's
        optimizer load, on group sizes). The load now stops with what to do instead."""
        if model is not None and not already_compressed(unwrap(model)):
            _arm_load_hook(model, "compress", _refuse_drone_checkpoint)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is not None:
            _disarm_load_hook(model, "compress")
        if is_peft_model(model):
            raise ValueError(
                "CompressOnTrainBeginCallback got a PEFT model: compress first (drone_hf.compress), then attach "
                "adapters (drone_hf.training.prepare_lora_model)."
            )
        existing = already_compressed(unwrap(model))
        if existing:
            raise ValueError(
                f"The model is already DRONE-compressed ({existing}); CompressOnTrainBeginCallback compresses a "
                "dense model. Drop the callback to fine-tune the compressed model as it is."
            )
        _check_plain_run(args, state, "CompressOnTrainBeginCallback")
        tokenizer = self._tokenizer(processing_class)
        cfg = copy.deepcopy(self.config)
        draw = cfg.num_samples + held_out_count(unwrap(model), cfg)
        texts = self.calibration_texts(train_dataloader, tokenizer, draw)
        if not texts:
            raise ValueError("The sampled training rows decode to no text; check the dataset's input_ids.")
        cfg.dataset, cfg.tokenizer = texts, tokenizer
        compress(model, cfg, show_progress=not args.disable_tqdm)
        self.compressed = True
        if optimizer is not None:
            update = sync_optimizer(optimizer, model, args.weight_decay)
            logger.info(
                f"drone-hf: compressed at train begin on {len(texts)} training rows; optimizer re-pointed "
                f"({update.removed} dense tensors out, {update.added} factor tensors in)."
            )
        self._queue(compression_stats(model))


class ProgressiveRankCallback(_LoggingCallback, ExportableState):
    """Lower the ranks in ``num_stages`` steps during training toward a final budget.

    Stage ``i`` (of ``n``) runs at the optimizer step ``round(max_steps·(start + (end-start)·i/n))``
    and sets every factored layer to the rank ``k0 + (k_final - k0)·i/n`` (rounded), where ``k0`` is
    its rank at train begin; after ``end`` the model trains at the final ranks. Each cut re-solves
    from the current weights (see :mod:`drone_hf.training.progressive`): DRONE on the input Grams of
    ``calibration_samples`` training rows (fresh rows each stage), or the SVD of ``up @ down`` with
    ``method="svd"`` (no data, cheaper). Cut layers restart their optimizer moments.

    Args:
        final_param_ratio: final uniform budget, as ``DroneConfig(param_ratio=...)`` (per layer,
            never above its current rank); or
        final_ranks: final rank by layer name (relative to the base model, or full name).
        num_stages: number of cuts (>= 1).
        start, end: fractions of the training steps where the first and the last cut happen
            (``0 <= start < end <= 1``).
        calibration_samples: training rows per data-aware re-solve.
        method: ``"drone"`` (data-aware) or ``"svd"``.
        damp: ridge of the re-solve (as ``DroneConfig.damp``).
        seed: seed of the rows drawn (stage ``i`` uses ``seed + i``).

    Logs ``drone/progressive_stage`` and ``drone/progressive_rel_error`` (mean relative error of the
    cut against the weights just before it) at each stage; ``CompressionStatsCallback`` logs the
    new ranks. ``save_pretrained`` afterwards writes the final ranks. Each cut clears the Trainer's
    best-checkpoint record (``best_metric``, ``best_model_checkpoint``), so ``load_best_model_at_end``
    and early stopping compare only evaluations at the current ranks; with no evaluation after the
    last cut the run ends on the model as trained.

    **Resuming.** ``trainer.train(resume_from_checkpoint=...)`` with the same model (as compressed at
    the start of the run) and the same callback continues the schedule exactly: the checkpoint's
    ``trainer_state.json`` records the schedule's progress (:meth:`state`), the factors take the
    checkpoint's ranks as Trainer loads its weights (armed in :meth:`on_init_end`: pass the
    callback in ``Trainer(callbacks=[...])`` or with :func:`add_callbacks`, which fires it), and
    only the stages still to come run.
    ``from_pretrained(checkpoint)`` in place of the starting model works too. The schedule is the
    one fixed at the first train begin (a changed ``max_steps`` does not move it); resuming with
    other arguments, or from a checkpoint without a schedule, is refused.
    """

    def __init__(
        self,
        final_param_ratio: float | None = None,
        final_ranks: dict[str, int] | None = None,
        num_stages: int = 3,
        start: float = 0.1,
        end: float = 0.6,
        calibration_samples: int = 64,
        method: str = "drone",
        damp: float = 0.0,
        seed: int = 0,
    ) -> None:
        if (final_param_ratio is None) == (final_ranks is None):
            raise ValueError(
                "Give exactly one of final_param_ratio= or final_ranks= (the budget the schedule ends at)."
            )
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages={num_stages!r} must be a positive integer (number of rank cuts).")
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start < end <= 1):
            raise ValueError(
                f"start={start!r}, end={end!r} must satisfy 0 <= start < end <= 1 (fractions of training)."
            )
        if method not in ("drone", "svd"):
            raise ValueError(f"method={method!r} must be 'drone' (data-aware re-solve) or 'svd' (no data).")
        if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) or calibration_samples < 1:
            raise ValueError(f"calibration_samples={calibration_samples!r} must be a positive integer.")
        self.final_param_ratio, self.final_ranks = final_param_ratio, final_ranks
        self.num_stages, self.start, self.end = num_stages, float(start), float(end)
        self.calibration_samples, self.method, self.damp, self.seed = calibration_samples, method, damp, seed
        self.schedule: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self._start_ranks: dict[str, int] = {}
        self._final: dict[str, int] = {}

    def _settings(self) -> dict[str, Any]:
        return {
            "final_param_ratio": self.final_param_ratio,
            "final_ranks": self.final_ranks,
            "num_stages": self.num_stages,
            "start": self.start,
            "end": self.end,
            "calibration_samples": self.calibration_samples,
            "method": self.method,
            "damp": self.damp,
            "seed": self.seed,
        }

    def state(self) -> dict[str, Any]:
        """The schedule's progress, which Trainer writes into each checkpoint's ``trainer_state.json``
        (``stateful_callbacks``): a resumed run reads it back at train begin, because the ranks the
        schedule started from are no longer visible in a model that has been cut (``transformers``'
        ``ExportableState`` protocol; ``args`` rebuild the callback where Trainer restores it)."""
        return {
            "args": self._settings(),
            "attributes": {
                "progress": {
                    "start_ranks": dict(self._start_ranks),
                    "final_ranks": dict(self._final),
                    "schedule": {str(step): stage for step, stage in self.schedule.items()},  # JSON keys
                    "history": copy.deepcopy(self.history),
                }
            },
        }

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kwargs: Any) -> None:
        """Let a resumed run load a checkpoint saved after a cut. ``train(resume_from_checkpoint=...)``
        loads its weights into the model as built, at the starting ranks, before any event of that call
        fires (a size mismatch, before this callback could do anything). The hook armed here gives each
        factored layer the rank of the checkpoint's factors just before the load; Trainer then builds
        the optimizer on those shapes and loads its saved state, so the run continues exactly."""
        if model is not None and not is_peft_model(model):
            _arm_load_hook(model, "progressive", _follow_checkpoint_ranks)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if model is not None:
            _disarm_load_hook(model, "progressive")
        if is_peft_model(model):
            raise ValueError(
                "ProgressiveRankCallback changes factor shapes, which PEFT adapters on those factors cannot follow; "
                "run the schedule before attaching adapters."
            )
        _check_plain_run(args, state, "ProgressiveRankCallback", resuming_ok=True)
        layers = require_factored(model, "ProgressiveRankCallback")
        if state.global_step > 0:
            self._resume(state, layers)
            return
        self._start_ranks = {n: m.rank for n, m in layers.items()}
        self._final = final_ranks_for(layers, model, self.final_param_ratio, self.final_ranks)
        max_steps = max(int(state.max_steps), 1)
        self.schedule = {}
        for stage in range(1, self.num_stages + 1):
            frac = self.start + (self.end - self.start) * stage / self.num_stages
            self.schedule[min(max(1, round(max_steps * frac)), max_steps)] = stage  # later stages win ties
        logger.info(f"drone-hf: progressive rank schedule, stage by step: {self.schedule}")

    def _resume(self, state: TrainerState, layers: dict[str, DroneLinear]) -> None:
        """Take the schedule back from the checkpoint's ``trainer_state.json`` and check the model is
        where it left off: the ranks of the last stage done (the checkpoint's, which the load hook of
        :meth:`on_init_end` gave it, or which ``from_pretrained(checkpoint)`` built)."""
        step = state.global_step
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            raise ValueError(
                "The checkpoint records several ProgressiveRankCallbacks; a resumed run cannot tell their schedules "
                "apart. Use one ProgressiveRankCallback per Trainer."
            )
        progress = ((saved or {}).get("attributes") or {}).get("progress") or {}
        if not progress.get("start_ranks"):
            raise ValueError(
                f"This run resumes at step {step} from a checkpoint that holds no ProgressiveRankCallback schedule "
                "(saved by a run without this callback, or by drone-hf before schedules were saved), so the stages "
                "already done are unknown. Start a new run from that checkpoint's model instead: "
                "from_pretrained(checkpoint), train() without resume_from_checkpoint, with the callback attached."
            )
        settings = (saved or {}).get("args") or {}
        differ = sorted(k for k, v in self._settings().items() if k in settings and settings[k] != v)
        if differ:
            shown = ", ".join(f"{k}={settings[k]!r} (now {getattr(self, k)!r})" for k in differ)
            raise ValueError(
                f"The checkpoint's progressive schedule was made with {shown}; a resumed run continues that schedule. "
                "Resume with the same ProgressiveRankCallback arguments, or start a new run from the checkpoint's "
                "model (from_pretrained(checkpoint), no resume_from_checkpoint)."
            )
        self._start_ranks = {n: int(k) for n, k in progress["start_ranks"].items()}
        self._final = {n: int(k) for n, k in progress["final_ranks"].items()}
        self.schedule = {int(s): int(stage) for s, stage in progress["schedule"].items()}
        self.history = list(progress.get("history") or [])
        done = max((stage for s, stage in self.schedule.items() if s <= step), default=0)
        expected = stage_ranks(self._start_ranks, self._final, done, self.num_stages) if done else self._start_ranks
        current = {n: m.rank for n, m in layers.items()}
        if current != expected:
            wrong = sorted(n for n in set(current) | set(expected) if current.get(n) != expected.get(n))
            raise ValueError(
                f"At step {step} the progressive schedule has done {done} of {self.num_stages} stage(s), but the "
                f"model's ranks differ from that stage's (e.g. {wrong[0]!r}: {current.get(wrong[0])} instead of "
                f"{expected.get(wrong[0])}). Resume with the model the run started from (the same compression, "
                "same Trainer) or with from_pretrained(checkpoint)."
            )
        logger.info(
            f"drone-hf: progressive schedule resumed at step {step} after {done} of {self.num_stages} stage(s); "
            f"stage by step: {self.schedule}"
        )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> TrainerControl | None:
        stage = self.schedule.get(state.global_step)
        if stage is None:
            return None
        ranks = stage_ranks(self._start_ranks, self._final, stage, self.num_stages)
        batches = (
            sample_batches(train_dataloader, self.calibration_samples, self.seed + stage)
            if self.method == "drone"
            else None
        )
        errors = lower_ranks(model, ranks, batches, optimizer, self.method, self.damp)
        # Checkpoints saved before this cut hold larger factors: their scores do not describe the model at
        # the new ranks, and load_best_model_at_end could not load them into it (a size mismatch after the
        # whole run). From here only evaluations at the current ranks compete for "best".
        state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        known = [e for e in errors.values() if e is not None]
        entry = {
            f"{LOG_PREFIX}progressive_stage": float(stage),
            f"{LOG_PREFIX}progressive_rel_error": sum(known) / len(known) if known else float("nan"),
        }
        self.history.append({"step": state.global_step, "stage": stage, "ranks": ranks, "cut_layers": len(errors)})
        self._queue(entry)
        control.should_log = True  # a log at this step: the stats callback then shows the new ranks
        return control
