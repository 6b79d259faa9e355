"""``DroneConfig``: every knob of a DRONE compression, and the record a checkpoint needs to reload.

It is a transformers ``QuantizationConfigMixin`` so it rides through ``from_pretrained`` as
``quantization_config=`` (or ``drone_config=``) and lands in ``config.json`` under
``quantization_config``. Runtime objects (a dataset, a tokenizer) are accepted but never serialised:
``to_dict()`` writes only JSON-native settings, the resolved per-module ``ranks`` and a calibration
summary, so a reload can build the factored skeleton without any data.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import re
from typing import Any

import numpy as np
from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration.fisher import DEFAULT_KFAC_FISHER, FISHER_LABELS
from .solver import DEFAULT_KFAC_DAMP, METHODS
from .solver.kfac import check_kfac_damp

#: The ``quant_method`` string drone-hf registers with transformers.
QUANT_METHOD = "drone"

#: Version of the checkpoint format written under ``quantization_config``. Loading a newer one fails
#: loudly instead of guessing.
FORMAT_VERSION = 1

#: Default ridge ``damp`` (relative to the mean Gram diagonal). Chosen on held-out text by
#: ``benchmarks/fidelity.py`` (``benchmarks/results/damp_sweep.md``): on the real MiniLM at 50% and 30%
#: of the weights, damp 0 had the best held-out hidden-state error and embedding cosine, 1e-4..1e-3
#: were indistinguishable and 0.01 upwards drifted toward plain SVD.
DEFAULT_DAMP = 0.0
#: ``sequential`` values beside ``True``/``False`` (see the docstring).
SEQUENTIAL_MODES = ("compensated",)
#: Solvers with a compensated form (``min ||W X - W' X̂||``, output-weighted for drone-kfac).
COMPENSATED_METHODS = ("drone", "drone-kfac")

_SETTINGS = (
    "param_ratio",
    "dataset",
    "tokenizer",
    "num_samples",
    "max_length",
    "batch_size",
    "target_modules",
    "modules_to_not_convert",
    "damp",
    "method",
    "asvd_alpha",
    "kfac_damp",
    "kfac_fisher",
    "seed",
    "ranks",
    "target_speedup",
    "max_loss",
    "loss_fn",
    "eval_loss",
    "allocation",
    "rank_grid",
    "latency_shape",
    "eval_samples",
    "compress_attention",
    "attention_rank",
    "sequential",
    "prune_mlp",
)
_RECORDS = (
    "relative_errors", "calibration", "allocation_result", "format_version", "attention_ranks", "attention_errors",
    "mlp_widths",
)
#: The budget when none is given: half the targeted layers' weights.
DEFAULT_PARAM_RATIO = 0.5
_RUNTIME = ("dataset", "tokenizer", "loss_fn")  # may hold live objects; serialised only as strings


#: Per-head query-key rank used when ``compress_attention=True`` and ``attention_rank`` is not given:
#: half the head width (16 of MiniLM's 32).
DEFAULT_ATTENTION_RANK = 0.5


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


#: Numeric fields, normalised to Python numbers before validation.
_NUMBER_FIELDS = ("param_ratio", "target_speedup", "max_loss", "damp", "asvd_alpha", "kfac_damp", "num_samples",
                  "max_length", "batch_size", "eval_samples", "seed", "attention_rank")


def _plain_number(x: Any) -> Any:
    """A NumPy scalar as the Python number it holds; anything else unchanged.

    Budgets often come out of NumPy (``np.linspace``, a sweep's array): ``np.float64`` is a ``float``
    but ``np.float32`` and ``np.int64`` are not, and they were refused as "not a number", and would
    not serialise to JSON in ``config.json`` either.
    """
    if isinstance(x, (bool, int, float)) or not isinstance(x, numbers.Number):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    return float(x) if isinstance(x, numbers.Real) else x


class DroneConfig(QuantizationConfigMixin):
    """Configuration of a DRONE compression (Chen et al., NeurIPS 2021).

    Args:
        param_ratio (`float`, *optional*, defaults to 0.5):
            Fraction of the targeted layers' weight parameters kept, in (0, 1]: the size budget.
            How it is spread over layers is ``allocation``'s choice (greedy by default; with
            ``"uniform"`` a layer of shape ``out x in`` gets rank ``floor(param_ratio · in·out /
            (in + out))``, at least 1). Biases, embeddings and untargeted layers are not counted.
            Ignored for layers whose rank is fixed by ``ranks``. Exactly one budget per run; with
            none, ``param_ratio=0.5``.
        target_speedup (`float`, *optional*):
            The speed budget: end-to-end forward time dense / compressed (> 1) on this device at
            ``latency_shape``, measured after compression; an unreachable one is refused with the
            best reachable value.
        max_loss (`float`, *optional*):
            The quality budget: allowed increase of the evaluation loss on ``eval_samples`` held-out
            texts (LM: next-token cross-entropy; encoders: relative squared output error; or ``loss_fn``).
        loss_fn (`Callable[[model], float]`, *optional*):
            Your own evaluation loss for ``max_loss`` and greedy sensitivities (e.g. ``1 - accuracy``
            on your own validation set); never serialised. Replaces ``eval_loss``.
        eval_loss (`str`, defaults to ``"auto"``):
            The built-in evaluation loss on the ``eval_samples`` held-out texts, which ``max_loss``
            budgets and greedy sensitivities measure, as an increase over the dense model.
            ``"lm"``: next-token cross-entropy in nats (causal LMs only). ``"logit_kl"``: KL divergence
            of the output distribution from the dense model's, in nats per sequence (per real token
            for per-token logits; Bernoulli per label for multi-label heads; squared difference for
            a one-output regression head). ``"distortion"``: relative squared error of the last hidden
            states. ``"auto"``: ``"lm"`` for causal LMs, ``"logit_kl"`` for sequence and token
            classifiers, ``"distortion"`` otherwise. On the MPNet sentiment classifier, greedy
            allocation with the logit KL kept more accuracy than with distortion
            (``docs/allocation.md``).
        allocation (`str`, defaults to ``"greedy"``):
            How the budget is spread over layers. ``"greedy"``: a global choice of ranks by predicted
            loss per parameter (or per measured second) saved, keeping layers dense where factoring
            does not pay; it holds out ``eval_samples`` texts to measure layer sensitivities. It won
            on held-out quality at every budget measured (``docs/allocation.md``: MiniLM fidelity,
            SmolLM2 perplexity 39 vs 119 at ``param_ratio=0.8``). ``"uniform"``: the same fraction in
            every layer (no held-out texts, faster to compress). ``"drone"``: the paper's Algorithm 2,
            for ``max_loss`` only.
        rank_grid (`list[int]`, *optional*):
            Candidate ranks for greedy/drone allocation and speed budgets (default: multiples of 8
            below each layer's break-even rank).
        latency_shape (`tuple[int, int]`, defaults to ``(8, 128)``):
            Batch x sequence length at which speed is measured (latency model and ``target_speedup``).
        eval_samples (`int`, *optional*):
            Texts held out of ``dataset`` (never used for statistics) for loss budgets and greedy
            sensitivities. Default: 128 for a sequence classifier measured by its logit KL (one
            value per text), 32 otherwise (one per token). ``num_samples + eval_samples`` texts are
            drawn; a dataset with fewer keeps ``num_samples`` for calibration and holds out what is
            left (at least a quarter of the texts, logged).
        dataset (*optional*):
            Calibration text: ``None`` (the packaged public-domain corpus ``"sotu"``), a built-in
            corpus name, a path to a ``.txt`` (one sample per line, or per paragraph when the file
            has blank lines) or ``.jsonl`` file (strings, or objects with a ``"text"`` field), a
            ``list[str]``, or a ``datasets.Dataset`` (its ``text`` column, or its only string
            column). Only a name or path is written to ``config.json``.
        tokenizer (*optional*):
            A tokenizer or a path/id for ``AutoTokenizer``; defaults to the model's own folder.
        num_samples (`int`, defaults to 128): texts drawn (seeded) from ``dataset``.
        max_length (`int`, defaults to 128): tokens per text (longer texts are truncated).
        batch_size (`int`, defaults to 8): texts per calibration forward pass.
        target_modules (`str` or `list[str]`, *optional*):
            Layers to factor. A list entry matches a layer whose name equals it or ends with
            ``"." + entry`` (``["query", "value"]``); a single string is a regular expression that
            must match the whole name. Default: every ``nn.Linear``/``Conv1D`` of the base model
            except heads (``pooler``, ``classifier``, ``lm_head``, tied output embeddings).
            Naming a head here targets it, except a head tied to the input embeddings (refused:
            factoring it would untie the pair and write a checkpoint transformers cannot reload).
        modules_to_not_convert (`list[str]`, *optional*):
            Layers to keep dense, matched like list entries of ``target_modules``; added to (never
            replacing) the default head exclusions.
        damp (`float`, defaults to ``DEFAULT_DAMP``):
            Ridge ``δ``: the solver minimises ``||(W-W')X||² + δ·mean(diag XXᵀ)·||W-W'||²``;
            ``0`` is the exact DRONE optimum, large values approach plain SVD. Must stay ``0`` with
            ``method="drone-kfac"``, which is damped by ``kfac_damp`` instead.
        method (`str`, defaults to ``"drone"``): the solver. ``"drone"`` (data-aware optimum of
            ``||(W-W')X||``); ``"svd"`` (plain truncated SVD of the weight: the data-free baseline);
            and the peer methods, for comparison (``docs/methods.md``): ``"asvd"`` (ASVD: SVD of the
            weight with input channels scaled by ``mean|x|^asvd_alpha``, one extra forward pass),
            ``"fwsvd"`` (Fisher-weighted SVD: rows weighted by summed squared gradients of the loss,
            one extra forward+backward pass; needs a model with logits), ``"svdllm"`` (SVD-LLM:
            Cholesky whitening, DRONE's optimum when the Gram is positive definite; a layer whose
            Gram is not fails with an error naming it); and ``"drone-kfac"`` (loss-aware DRONE: the
            same closed form with the output error weighted by the loss's output-gradient Gram, a
            Kronecker-factored Fisher; one extra forward+backward pass, needs a model with logits;
            greedy allocation then compares layers by predicted loss with no sensitivity probing).
        asvd_alpha (`float`, defaults to 0.5): ASVD's exponent on the mean absolute activations
            (the paper's value); ``0`` is plain SVD. Used only with ``method="asvd"``.
        kfac_damp (`float`, defaults to 0.1): relative damping ``δ > 0`` of the output-gradient Gram
            for ``method="drone-kfac"`` (``H + δ·mean(eig H)·I``); large values approach ``"drone"``.
        kfac_fisher (`str`, defaults to ``"true"``): the labels whose loss gradients form
            ``method="drone-kfac"``'s output-gradient Gram. ``"true"``: one label per loss term drawn
            from the model's own predictive distribution (seeded by ``seed``): an unbiased estimate of
            the true Fisher, the Gauss-Newton curvature behind the predicted loss increase.
            ``"empirical"``: the data's next tokens (causal LMs) or the model's argmax predictions
            (other heads, whose calibration text has no labels): the empirical Fisher. Same cost; the
            true Fisher compressed better in both A/Bs of ``docs/methods.md``, hence the default.
            ``"exact"``: the true Fisher's expectation over every class instead of one draw, no
            sampling noise, at one backward pass per class; only for models with one prediction per
            text (sequence classifiers; refused for LMs and token classifiers, whose tokens'
            gradients mix many loss terms). A checkpoint written before this option existed reads
            back as ``"empirical"``, what made it. Used only with ``method="drone-kfac"``.
        seed (`int`, defaults to 0): seed of the calibration subset.
        ranks (`dict[str, int]`, *optional*):
            Fixed ranks by layer name or regular expression (full match), taking precedence over
            ``param_ratio``. After compression it holds the real rank of every factored layer, by
            name relative to the base model; that record is what a reload rebuilds.
        sequential (`bool` or `str`, defaults to `False`):
            Layer-sequential calibration: factor one block at a time, each calibrated on the outputs of
            the blocks already compressed, so statistics match what the compressed model sees. Ranks
            that need a whole-model view (greedy, drone, speed and loss budgets) come from a one-shot
            plan first. ``True`` solves ``min ||(W - W') X̂||`` on those inputs ``X̂``;
            ``"compensated"`` solves ``min ||W X - W' X̂||`` (the dense model's outputs, ``X`` its
            inputs), so each layer also corrects the error of the layers before it (``method="drone"``,
            or ``"drone-kfac"`` with the output error weighted by the dense model's loss; a block is
            calibrated one execution group at a time, each group's passes stopping at it: 3-4.5x the
            time of ``True`` in the measurements). On held-out data it beat one-shot
            and ``True`` on MiniLM (embedding cosine 0.722 vs 0.679 at ``param_ratio=0.3``) and on
            SmolLM2 (perplexity 30.5 vs 32.2 with greedy ranks at 0.8). See ``drone_hf/sequential.py``
            and ``docs/calibration.md``.
        compress_attention (`bool`, defaults to `False`):
            Also compress each self-attention layer's query-key product (DRONE section 2): every head's
            query and key projections shrink to width ``attention_rank``, chosen data-aware on the
            scores, while values, output projection and the softmax scale stay as they were. The
            query/key linear layers are then not factored separately (target_modules that name only
            them compress attention alone). Absolute-position models only (BERT, RoBERTa, DistilBERT,
            MPNet, GPT-2); rotary models are refused. After compression ``attention_ranks`` (per-head
            rank by attention module) and ``attention_errors`` record the result.
        attention_rank (`int` or `float`, *optional*):
            Per-head query-key width ``k``: an integer in [1, head width], or a float in (0, 1] giving
            ``floor(ratio · head width)`` (at least 1). Default ``DEFAULT_ATTENTION_RANK`` (0.5).
            Only meaningful with ``compress_attention=True``.
        prune_mlp (`bool`, defaults to `False`):
            Also consider dropping intermediate neurons of each MLP block (gated ``gate_proj``/``up_proj``/
            ``down_proj``, BERT-style ``intermediate``/``output``, GPT-2 ``c_fc``/``c_proj``, ``fc1``/``fc2``,
            DistilBERT ``lin1``/``lin2``): a dropped neuron removes a row of the input projections and a
            column of the output one, which is least-squares compensated on the calibration activations.
            Neurons are chosen by Optimal Brain Surgeon on the same quadratic (loss-aware with
            ``method="drone-kfac"``), and the greedy allocation gives each block the better of a
            pruned width and factored projections, against every other layer's ranks (see
            ``drone_hf/width_stage.py``). Pruned layers stay dense ``nn.Linear``/``Conv1D`` modules
            (a narrower matmul, no factors); ``mlp_widths`` records each pruned block's width. Needs
            ``allocation="greedy"`` (any budget: ``param_ratio``; ``target_speedup`` and ``max_loss``
            time the narrowed layers with the latency model, like the ranks) and ``method="drone"``
            or ``"drone-kfac"``. With ``sequential`` the plan's neurons stay and each pruned output
            layer's compensation is re-solved on the compressed model's activations. On SmolLM2-135M
            at a 20% cut: perplexity 1.22x dense vs 1.43x with ranks alone
            (``benchmarks/results/lm_prune_mlp.md``).
        calibration_cache (`str` or `os.PathLike`, *optional*):
            A folder where calibration writes its statistics as they are finished (one-shot mode:
            the running accumulators of every layer, every ``SNAPSHOT_SECONDS`` and at the end;
            the ``drone-kfac`` / ``fwsvd`` / ``asvd`` gradient or activation pass likewise;
            ``sequential=True``: each block's statistics plus the latest block's outputs), so a run
            killed midway resumes where it stopped instead of starting over. The folder is bound to
            one run: a different model (weights or architecture), calibration data/tokenization or
            statistics-relevant setting is refused with an error naming what changed, never reused.
            Entries are written atomically and checksummed; a damaged entry is recomputed. A
            machine-local path, so it is not written to ``config.json``. See
            ``drone_hf/calibration/cache.py``.

    Names are relative to the base model (``encoder.layer.0.attention.self.query`` both for
    ``BertModel`` and ``BertForSequenceClassification``); full names with the base-model prefix
    are accepted too.
    """

    def __init__(
        self,
        param_ratio: float | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        max_length: int = 128,
        batch_size: int = 8,
        target_modules: str | list[str] | None = None,
        modules_to_not_convert: list[str] | None = None,
        damp: float = DEFAULT_DAMP,
        method: str = "drone",
        asvd_alpha: float = 0.5,
        kfac_damp: float = DEFAULT_KFAC_DAMP,
        kfac_fisher: str = DEFAULT_KFAC_FISHER,
        seed: int = 0,
        ranks: dict[str, int] | None = None,
        target_speedup: float | None = None,
        max_loss: float | None = None,
        loss_fn: Any = None,
        eval_loss: str = "auto",
        allocation: str = "greedy",
        rank_grid: list[int] | None = None,
        latency_shape: tuple[int, int] | list[int] = (8, 128),
        eval_samples: int | None = None,
        compress_attention: bool = False,
        attention_rank: int | float | None = None,
        sequential: bool | str = False,
        prune_mlp: bool = False,
        calibration_cache: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.param_ratio = param_ratio
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.max_length = max_length
        self.batch_size = batch_size
        self.target_modules = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        mtnc = modules_to_not_convert
        self.modules_to_not_convert = list(mtnc) if isinstance(mtnc, (list, tuple)) else mtnc
        self.damp = damp
        self.method = method
        self.asvd_alpha = asvd_alpha
        self.kfac_damp = kfac_damp
        self.kfac_fisher = kfac_fisher
        self.seed = seed
        self.ranks = dict(ranks) if ranks is not None else None
        self.target_speedup = target_speedup
        self.max_loss = max_loss
        self.loss_fn = loss_fn
        self.eval_loss = eval_loss
        self.allocation = allocation
        self.rank_grid = list(rank_grid) if isinstance(rank_grid, (list, tuple)) else rank_grid
        self.latency_shape = list(latency_shape) if isinstance(latency_shape, (list, tuple)) else latency_shape
        self.eval_samples = eval_samples
        self.compress_attention = compress_attention
        self.attention_rank = attention_rank
        self.sequential = sequential
        self.prune_mlp = prune_mlp
        self.calibration_cache = calibration_cache  # runtime only: never serialised (a local path)
        # Records written by compression (and read back from a checkpoint).
        self.relative_errors: dict[str, float] | None = kwargs.pop("relative_errors", None)
        self.calibration: dict[str, Any] | None = kwargs.pop("calibration", None)
        self.allocation_result: dict[str, Any] | None = kwargs.pop("allocation_result", None)
        self.format_version: int = kwargs.pop("format_version", FORMAT_VERSION)
        self.attention_ranks: dict[str, int] | None = kwargs.pop("attention_ranks", None)
        self.attention_errors: dict[str, float | None] | None = kwargs.pop("attention_errors", None)
        self.mlp_widths: dict[str, dict[str, int]] | None = kwargs.pop("mlp_widths", None)
        method_in = kwargs.pop("quant_method", QUANT_METHOD)
        if method_in != QUANT_METHOD:
            raise ValueError(
                f"DroneConfig got quant_method={method_in!r}; it only describes {QUANT_METHOD!r} models. Use that "
                "method's own config class (transformers.AutoQuantizationConfig), "
                f"or set quant_method={QUANT_METHOD!r}."
            )
        if kwargs:
            raise ValueError(
                f"Unknown DroneConfig field(s) {sorted(kwargs)}; known fields are {sorted(_SETTINGS)}. "
                "If this came from a checkpoint, it was written by a newer drone-hf: upgrade with "
                "`pip install -U drone-hf`."
            )
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; each error names the field, the bad value and the fix."""
        for name in _NUMBER_FIELDS:
            setattr(self, name, _plain_number(getattr(self, name)))
        for name in ("sequential", "compress_attention", "prune_mlp"):
            if isinstance(getattr(self, name), np.bool_):
                setattr(self, name, bool(getattr(self, name)))
        for name in ("rank_grid", "latency_shape"):
            value = getattr(self, name)
            value = value.tolist() if isinstance(value, np.ndarray) else value  # a 0-d array: a scalar, refused below
            if isinstance(value, (tuple, list)):
                value = [_plain_number(v) for v in value]
            setattr(self, name, value)
        if isinstance(getattr(self, "ranks", None), dict):
            self.ranks = {k: _plain_number(v) for k, v in self.ranks.items()}
        if not (isinstance(self.sequential, bool) or self.sequential in SEQUENTIAL_MODES):
            raise ValueError(
                f"sequential={self.sequential!r} must be False (one-shot), True (sequential) or "
                f"{SEQUENTIAL_MODES[0]!r} (sequential, error-compensated)."
            )
        if self.sequential == "compensated" and self.method not in COMPENSATED_METHODS:
            raise ValueError(
                f"sequential='compensated' solves the DRONE objective (plain or loss-aware); it does not combine "
                f"with method={self.method!r}. Use method='drone' or 'drone-kfac', or sequential=True for the "
                "peer methods."
            )
        if self.sequential and self.compress_attention:
            raise ValueError(
                f"sequential={self.sequential!r} with compress_attention=True is not supported yet: use one-shot "
                "calibration (sequential=False) for attention compression."
            )
        self._check_cache()
        budgets = [b for b in ("param_ratio", "target_speedup", "max_loss") if getattr(self, b) is not None]
        if len(budgets) > 1 and self.__dict__.get("_param_ratio_defaulted") and self.param_ratio == DEFAULT_PARAM_RATIO:
            # DroneConfig() filled in the default, then a budget was set (compress(..., max_loss=...) or
            # config.max_loss = ...): the budget the user named replaces the one they never gave
            self.param_ratio, self._param_ratio_defaulted = None, False
            budgets.remove("param_ratio")
        if len(budgets) > 1:
            raise ValueError(
                f"DroneConfig got {len(budgets)} budgets ({', '.join(budgets)}); give exactly one of param_ratio "
                "(size), target_speedup (speed) or max_loss (quality)."
            )
        if not budgets:
            self.param_ratio = DEFAULT_PARAM_RATIO
            self._param_ratio_defaulted = True  # never serialised: to_dict writes its listed keys only
        r = self.param_ratio
        if r is not None and (
            isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1
        ):
            raise ValueError(
                f"param_ratio={r!r} must be a number in (0, 1]: the fraction of the targeted layers' weights kept "
                "(e.g. 0.5 keeps half)."
            )
        t = self.target_speedup
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 1):
            raise ValueError(
                f"target_speedup={t!r} must be a number > 1: end-to-end dense time / compressed time (e.g. 2.0)."
            )
        ml = self.max_loss
        bad_number = isinstance(ml, bool) or not isinstance(ml, (int, float)) or not math.isfinite(ml)
        if ml is not None and (bad_number or ml <= 0):
            raise ValueError(
                f"max_loss={ml!r} must be a number > 0: the allowed increase of the evaluation loss on held-out "
                "calibration texts."
            )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"loss_fn must be a callable model -> float, got {type(self.loss_fn).__name__}.")
        from .search import EVAL_LOSSES

        if self.eval_loss not in EVAL_LOSSES:
            raise ValueError(f"eval_loss={self.eval_loss!r} is not supported: use one of {list(EVAL_LOSSES)}.")
        if self.loss_fn is not None and self.eval_loss != "auto":
            raise ValueError(
                f"loss_fn and eval_loss={self.eval_loss!r} both name the evaluation loss; give one (loss_fn "
                "replaces the built-in losses)."
            )
        from .allocation import ALLOCATIONS

        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r} is not supported: use one of {list(ALLOCATIONS)}.")
        if self.allocation == "drone" and self.max_loss is None:
            raise ValueError(
                "allocation='drone' is the paper's loss-budgeted search: give max_loss= (or use allocation='greedy' "
                "for param_ratio/target_speedup budgets)."
            )
        g = self.rank_grid
        if g is not None and (not isinstance(g, list) or not g or not all(_is_int(k) and k >= 1 for k in g)):
            raise ValueError(f"rank_grid={g!r} must be a non-empty list of positive integers (candidate ranks).")
        shape = self.latency_shape
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v >= 1 for v in shape)):
            raise ValueError(f"latency_shape={shape!r} must be (batch, sequence_length), two positive integers.")
        for name in ("num_samples", "max_length", "batch_size", "eval_samples"):
            v = getattr(self, name)
            if name == "eval_samples" and v is None:
                continue  # the default for the model's evaluation loss (compress.held_out_count)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer.")
        if not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer.")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"damp={d!r} must be a finite number >= 0 (0 is the exact DRONE optimum).")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported: use one of {list(METHODS)}.")
        check_kfac_damp(self.kfac_damp)
        if self.kfac_fisher not in FISHER_LABELS:
            raise ValueError(
                f"kfac_fisher={self.kfac_fisher!r} is not supported: use 'true' (gradients at labels drawn from the "
                "model's own distribution, the default), 'exact' (the same Fisher's expectation over every class; "
                "sequence classifiers) or 'empirical' (at the data's labels)."
            )
        if self.method == "drone-kfac" and d != 0:
            raise ValueError(
                f"damp={d!r} is DRONE's input ridge and method='drone-kfac' has no input ridge: set damp=0 and "
                "use kfac_damp (the damping of the output-gradient Gram) to move drone-kfac toward method='drone'."
            )
        if self.method == "drone-kfac" and self.compress_attention:
            raise ValueError(
                "method='drone-kfac' with compress_attention=True is not supported: the query-key stage has no "
                "loss-weighted form. Use method='drone' with compress_attention, or drone-kfac without it."
            )
        a = self.asvd_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise ValueError(
                f"asvd_alpha={a!r} must be a finite number >= 0 (ASVD's exponent: 0.5 in the paper, 0 = plain SVD)."
            )
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str):
                _check_regex(tm, "target_modules")
            elif not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(
                    f"target_modules={tm!r} must be a non-empty list of layer names, a regular expression string, "
                    "or None for the default (all linear layers of the base model except heads)."
                )
        mn = self.modules_to_not_convert
        if mn is not None and (not isinstance(mn, (list, tuple)) or not all(isinstance(t, str) and t for t in mn)):
            raise ValueError(f"modules_to_not_convert={mn!r} must be a list of layer names.")
        if self.ranks is not None:
            for key, value in self.ranks.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"ranks keys must be layer names or regular expressions, got {key!r}.")
                _check_regex(key, "ranks")
                if not _is_int(value) or value < 1:
                    raise ValueError(f"ranks[{key!r}]={value!r} must be a positive integer.")
        self._check_attention()
        self._check_width()
        if not _is_int(self.format_version) or self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses DRONE format version {self.format_version!r}, newer than this drone-hf "
                f"understands ({FORMAT_VERSION}). Upgrade with `pip install -U drone-hf`."
            )

    def _check_cache(self) -> None:
        """``calibration_cache``: ``None`` or a folder path (created when calibration starts)."""
        folder = self.__dict__.get("calibration_cache")
        if folder is None:
            return
        if isinstance(folder, bool) or not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
            raise ValueError(
                f"calibration_cache={folder!r} must be a folder path (str or os.PathLike) where calibration statistics "
                "are kept for resuming, or None to keep nothing."
            )
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(
                f"calibration_cache={os.fspath(folder)!r} exists and is not a folder; give a folder path (it is "
                "created if missing)."
            )

    def _check_attention(self) -> None:
        """Validate the query-key (attention) compression fields."""
        if not isinstance(self.compress_attention, bool):
            raise ValueError(f"compress_attention={self.compress_attention!r} must be True or False.")
        k = self.attention_rank
        if k is not None:
            if not self.compress_attention:
                raise ValueError(
                    f"attention_rank={k!r} is set but compress_attention is False: pass compress_attention=True to "
                    "compress the query-key product, or drop attention_rank."
                )
            is_ratio = isinstance(k, float) and math.isfinite(k) and 0 < k <= 1
            if not (is_ratio or (_is_int(k) and k >= 1)):
                raise ValueError(
                    f"attention_rank={k!r} must be a per-head width (an integer >= 1, at most the head width) or a "
                    "fraction of the head width (a float in (0, 1], e.g. 0.5)."
                )
        records = self.attention_ranks
        if records is not None and (
            not isinstance(records, dict)
            or not all(isinstance(n, str) and n and _is_int(v) and v >= 1 for n, v in records.items())
        ):
            raise ValueError(
                f"attention_ranks={records!r} must map attention module names to positive per-head ranks; "
                "the checkpoint's config.json was edited or damaged."
            )

    def _check_width(self) -> None:
        """Validate ``prune_mlp`` and the ``mlp_widths`` record."""
        if not isinstance(self.prune_mlp, bool):
            raise ValueError(f"prune_mlp={self.prune_mlp!r} must be True or False.")
        if self.prune_mlp:
            problem = None
            if self.method not in ("drone", "drone-kfac"):
                problem = f"method={self.method!r}: use method='drone' or 'drone-kfac'"
            elif self.allocation != "greedy":
                problem = f"allocation={self.allocation!r}: use allocation='greedy'"
            if problem:
                raise ValueError(
                    f"prune_mlp=True chooses widths and ranks together in one greedy allocation; it does not "
                    f"combine with {problem}, or drop prune_mlp."
                )
        records = self.mlp_widths
        if records is not None and (not isinstance(records, dict) or not all(
            isinstance(n, str) and n and isinstance(r, dict) and set(r) == {"width", "original"}
            and _is_int(r["width"]) and _is_int(r["original"]) and 1 <= r["width"] <= r["original"]
            for n, r in records.items()
        )):
            raise ValueError(
                f"mlp_widths={records!r} must map MLP block names to {{'width': kept, 'original': neurons}} with "
                "1 <= width <= original; the checkpoint's config.json was edited or damaged."
            )

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-native settings and records; live dataset/tokenizer objects become ``None``."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for key in _SETTINGS + _RECORDS:
            value = getattr(self, key)
            if key in _RUNTIME and isinstance(value, os.PathLike):
                value = os.fspath(value)  # a path is a name, written like a str path
            if key in _RUNTIME and value is not None and not isinstance(value, str):
                value = None
            out[key] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Like ``QuantizationConfigMixin.from_dict``, except that a compression record (a checkpoint's
        ``quantization_config``) without ``kfac_fisher`` reads back as ``"empirical"``: it was written
        before the option existed, when every run used the empirical Fisher, and the default has
        changed since. A fresh config without the key gets the default."""
        compressed = any(config_dict.get(k) is not None for k in ("relative_errors", "attention_ranks", "mlp_widths"))
        if compressed and "kfac_fisher" not in config_dict:
            config_dict = {**config_dict, "kfac_fisher": "empirical"}
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __deepcopy__(self, memo: dict) -> DroneConfig:
        # transformers deep-copies loading kwargs; a dataset or tokenizer is shared, not copied.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key in _RUNTIME else copy.deepcopy(value, memo)
        return new

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DroneConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    @property
    def is_compressed(self) -> bool:
        """True once compression recorded the real ranks (a checkpoint's config, or after ``compress``)."""
        return self.relative_errors is not None or self.attention_ranks is not None or self.mlp_widths is not None


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{field} entry {pattern!r} is not a valid regular expression ({e}). Escape special characters "
            "(re.escape) or pass a list of layer names instead."
        ) from e
