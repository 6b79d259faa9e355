"""Rank search that runs the model: evaluation loss, layer sensitivities, end-to-end latency, and the
paper's Algorithm 2.

Everything here swaps candidate layers in and out of the live model (:class:`Swapper`) and always
restores the dense layers it found; the engine decides what to keep.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .calibration.choices import refuse_choice_losses
from .modules.low_rank_linear import DroneLinear
from .modules.targets import replace_modules
from .utils.model_kinds import is_causal_lm


class Swapper:
    """Put candidate layers into a model and take them out again, by full module name."""

    def __init__(self, model: nn.Module, dense: dict[str, nn.Module]) -> None:
        self.model = model
        self.dense = dense  # full name -> the original layer

    def set(self, layers: dict[str, nn.Module]) -> None:
        """Make exactly ``layers`` factored (full name -> module); every other target dense."""
        current = {n: m for n, m in ((n, self.model.get_submodule(n)) for n in self.dense)}
        wanted = {n: layers.get(n, self.dense[n]) for n in self.dense}
        changes = {n: m for n, m in wanted.items() if current[n] is not m}
        replace_modules(self.model, changes)

    @contextmanager
    def trying(self, layers: dict[str, nn.Module]):
        """Temporarily factor ``layers`` (on top of nothing else); dense again afterwards."""
        self.set(layers)
        try:
            yield
        finally:
            self.set({})


#: Evaluation losses :class:`LossEvaluator` knows (``DroneConfig.eval_loss``).
EVAL_LOSSES = ("auto", "lm", "logit_kl", "distortion")

#: Model classes whose output distribution is the task, so ``"auto"`` measures harm on it.
_TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification")


def resolve_eval_loss(model: nn.Module, requested: str = "auto") -> str:
    """The evaluation loss a model gets: ``requested``, or for ``"auto"`` the one that matches its head.

    ``"auto"``: next-token cross-entropy for causal LMs; the KL divergence of the output distribution
    for sequence/token classifiers (what their users measure is the head's answer, and the last
    hidden states weigh every token while a sequence classifier reads one); output distortion for
    everything else (bare encoders, embedding models).
    """
    if requested not in EVAL_LOSSES:
        raise ValueError(f"eval_loss={requested!r} is not supported: use one of {list(EVAL_LOSSES)}.")
    refuse_choice_losses(model, "drone", requested)  # a multiple-choice model's logit KL is constant on text
    name = type(model).__name__
    if requested == "auto":
        if is_causal_lm(model):
            return "lm"
        return "logit_kl" if name.endswith(_TASK_HEADS) else "distortion"
    if requested == "lm" and not is_causal_lm(model):
        raise ValueError(
            f"eval_loss='lm' is next-token cross-entropy and needs a causal LM (…ForCausalLM); {name} is not one. "
            "Use eval_loss='auto', 'logit_kl' (models with logits) or 'distortion'."
        )
    return requested


#: Held-out texts when ``DroneConfig.eval_samples`` is None. A sequence classifier's logit KL has one
#: value per text, where token-level losses have one per token, so it gets four times the texts: on
#: the MPNet sentiment classifier greedy allocation with the KL on 32 texts lost to the hidden-state
#: distortion at ``param_ratio=0.3`` and won with 128 (``docs/allocation.md``).
DEFAULT_EVAL_SAMPLES = 32
DEFAULT_EVAL_SAMPLES_PER_SEQUENCE = 128


def default_eval_samples(model: nn.Module, eval_loss: str = "auto", loss_fn: Callable | None = None) -> int:
    """How many held-out texts the evaluation loss gets when the config leaves ``eval_samples`` unset."""
    per_sequence = type(model).__name__.endswith("ForSequenceClassification")
    if loss_fn is None and per_sequence and resolve_eval_loss(model, eval_loss) == "logit_kl":
        return DEFAULT_EVAL_SAMPLES_PER_SEQUENCE
    return DEFAULT_EVAL_SAMPLES


def logit_divergence(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                     problem_type: str | None = None) -> tuple[float, int]:
    """Summed divergence of ``logits`` from the dense model's ``reference``, and how many items it covers.

    An item is a sequence (logits ``batch x labels``) or a real token (``batch x seq x labels``, ``mask``
    selects the real ones). Per item: ``KL(softmax(reference) || softmax(logits))`` in nats; for
    ``problem_type="multi_label_classification"`` the summed KL of each label's Bernoulli (sigmoid)
    distribution; for one output (regression) the squared difference, in the target's units squared.
    """
    # float64: a layer probe moves the logits by ~1e-3, and the KL (~1e-6) would drown in float32 rounding
    logits, reference = logits.double(), reference.double()
    if logits.dim() == 3:
        keep = mask.bool()
        logits, reference = logits[keep], reference[keep]
    if logits.shape[-1] == 1 or problem_type == "regression":
        per_item = ((logits - reference) ** 2).sum(-1)
    elif problem_type == "multi_label_classification":
        lp, lq = F.logsigmoid(reference), F.logsigmoid(logits)
        lp0, lq0 = F.logsigmoid(-reference), F.logsigmoid(-logits)
        per_item = (lp.exp() * (lp - lq) + lp0.exp() * (lp0 - lq0)).sum(-1)
    else:
        lp, lq = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
        per_item = (lp.exp() * (lp - lq)).sum(-1)
    return float(per_item.sum()), int(per_item.numel())


class LossEvaluator:
    """The evaluation loss on held-out calibration batches, as allocation budgets measure it.

    * ``"lm"`` (causal LMs): mean next-token cross-entropy (nats/token) over real tokens;
    * ``"logit_kl"`` (sequence/token classifiers; any model with ``logits``): mean divergence of the
      output distribution from the dense model's (:func:`logit_divergence`: KL in nats per sequence,
      or per real token for per-token logits; 0 for the dense model);
    * ``"distortion"`` (other models): relative squared error of the last hidden states against the
      dense model's, ``Σ‖H − H_dense‖² / Σ‖H_dense‖²`` over real tokens (0 for the dense model);
    * a user ``loss_fn(model) -> float`` replaces them all (e.g. ``1 - accuracy`` from ``evaluate``).

    ``kind`` picks one of the first three (:func:`resolve_eval_loss`; ``"auto"`` by the model's head).
    Budgets are on the *increase* over the dense model's value (:attr:`dense_loss`). The built-in
    losses add up across layers to first (non-zero) order, which is what greedy allocation assumes.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[dict[str, torch.Tensor]],
        loss_fn: Callable[[nn.Module], float] | None,
        kind: str = "auto",
    ) -> None:
        self.batches = batches
        self.loss_fn = loss_fn
        self.kind = "callable" if loss_fn is not None else resolve_eval_loss(model, kind)
        self.problem_type = getattr(getattr(model, "config", None), "problem_type", None)
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.reference: list[torch.Tensor] = []
        if self.kind in ("distortion", "logit_kl"):
            with torch.no_grad():
                was_training = model.training
                model.eval()
                try:
                    self.reference = [self._output(model, b) for b in batches]
                finally:
                    model.train(was_training)
        self.dense_loss = self.evaluate(model)
        if not all(bool(torch.isfinite(r).all()) for r in self.reference) or not math.isfinite(self.dense_loss):
            raise ValueError(
                f"The dense model's outputs on the held-out calibration texts are not finite (NaN/inf), so the "
                f"{self.kind} evaluation loss cannot be measured. Load the model in float32 (half precision can "
                "overflow) or check the calibration texts."
            )

    def _output(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss compares: the last hidden states, or the logits."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if self.kind == "distortion":
            return model(**inputs, output_hidden_states=True).hidden_states[-1].float()
        logits = getattr(model(**inputs), "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(
                f"eval_loss='logit_kl' compares output logits, and {type(model).__name__} returns none. Use "
                "eval_loss='distortion' (last hidden states) or pass loss_fn=."
            )
        return logits.detach()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            if self.kind == "callable":
                try:
                    value = self.loss_fn(model)  # type: ignore[misc]
                except Exception as e:  # noqa: BLE001 - re-raised with context; the model stays dense
                    raise ValueError(
                        f"loss_fn raised {type(e).__name__}: {e}. It is called as loss_fn(model) -> float on the "
                        "model being compressed; fix it and run again (the model was not changed)."
                    ) from e
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = float(value)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                    raise ValueError(f"loss_fn returned {value!r}; it must return a finite float (lower is better).")
                return float(value)
            if self.kind == "lm":
                total = count = 0.0
                for b in self.batches:
                    ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
                    labels = ids.masked_fill(mask == 0, -100)
                    n = int((labels[:, 1:] != -100).sum())
                    if n:
                        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
                        count += n
                return total / max(count, 1)
            if self.kind == "logit_kl":
                total, items = 0.0, 0
                for b, ref in zip(self.batches, self.reference, strict=True):
                    mask = b["attention_mask"].to(self.device)
                    value, n = logit_divergence(self._output(model, b), ref, mask, self.problem_type)
                    total, items = total + value, items + n
                return total / max(items, 1)
            err = ref = 0.0
            for b, href in zip(self.batches, self.reference, strict=True):
                mask = b["attention_mask"].to(self.device).bool()
                h = self._output(model, b)
                err += float(((h - href)[mask] ** 2).sum())
                ref += float((href[mask] ** 2).sum())
            return err / ref if ref else 0.0
        finally:
            model.train(was_training)

    def increase(self, model: nn.Module) -> float:
        """Loss of ``model`` minus the dense model's."""
        return self.evaluate(model) - self.dense_loss


def probe_sensitivities(
    swapper: Swapper,
    evaluator: LossEvaluator,
    probes: dict[str, tuple[DroneLinear, float]],
    progress: Iterable | None = None,
) -> dict[str, float]:
    """Loss increase per unit of relative squared calibration error, one layer at a time.

    Args:
        probes: full name -> (the layer factored at a probe rank, its relative squared error).

    A layer's measured increase can be slightly negative (noise); it is floored at a tiny positive
    value so every layer keeps a meaningful ordering by its own error.
    """
    weights = {}
    for name in progress if progress is not None else probes:
        layer, err = probes[name]
        with swapper.trying({name: layer}):
            delta = evaluator.increase(swapper.model)
        weights[name] = max(delta, 1e-12) / max(err, 1e-12)
    return weights


@torch.inference_mode()
def end_to_end_times(
    swapper: Swapper,
    variants: dict[str, dict[str, nn.Module]],
    inputs: dict[str, torch.Tensor],
    repeats: int = 9,
    warmup: int = 2,
) -> dict[str, float]:
    """Median forward time of the model under each variant (name -> factored layers), interleaved."""
    model = swapper.model
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for i in range(warmup + repeats):
            for name, layers in variants.items():
                swapper.set(layers)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        swapper.set({})
        model.train(was_training)
    return {name: statistics.median(ts) for name, ts in times.items()}


def drone_search(
    swapper: Swapper,
    evaluator: LossEvaluator,
    candidates: dict[str, list[tuple[int, DroneLinear]]],
    shares: dict[str, float],
    progress: Iterable | None = None,
    base: dict[str, nn.Module] | None = None,
) -> dict[str, int]:
    """The paper's Algorithm 2: forward order, loss shares, smallest passing grid rank, else dense.

    Args:
        candidates: full name -> [(rank, factored layer)] in ascending rank, only ranks at which the
            layer is faster than dense; in forward (module) order.
        shares: full name -> its share of the allowed loss increase (e.g. proportional to its share
            of the dense latency). Shares accumulate: loss a layer leaves unused passes on.
        base: layers factored before the search starts (ranks the user fixed).

    Each layer is tried with every earlier decision already applied; the smallest rank whose total
    loss increase stays within the shares so far is found by bisection over the grid (loss falls as
    rank grows). Returns full name -> rank for the layers factored.
    """
    chosen: dict[str, nn.Module] = dict(base or {})
    ranks: dict[str, int] = {}
    allowed = 0.0
    for name in progress if progress is not None else candidates:
        allowed += shares[name]
        options = candidates[name]
        lo, hi, best = 0, len(options) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            rank, layer = options[mid]
            swapper.set(chosen | {name: layer})
            if evaluator.increase(swapper.model) <= allowed:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            chosen[name] = options[best][1]
            ranks[name] = options[best][0]
    swapper.set({})
    return ranks


def fisher_sensitivities(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    probes: dict[str, tuple[DroneLinear, float]],
) -> dict[str, float]:
    """Loss increase per unit of relative squared error for causal LMs, from one backward pass.

    :func:`probe_sensitivities` runs the whole model once per layer (a 135M-parameter LM with 210
    targeted projections needs 210 evaluations: the bulk of a greedy allocation). For the LM loss
    the same quantity has a cheap second-order estimate: the loss is a mean over sequences ``s`` of
    their mean next-token cross-entropy ``l_s``, and replacing a layer's output ``Y`` by ``Y + ΔY``
    raises it by about ``½ · mean_s (Σ_t ∂l_s/∂Y_t · ΔY_t)²`` (empirical Fisher, as in Fisher-weighted
    SVD). One forward and one backward over the evaluation batches give every layer's ``∂l_s/∂Y``;
    ``ΔY`` is the probe layer's output minus the dense one on the same inputs. Upstream layers stay
    dense, as in the measured probes. Args and result as :func:`probe_sensitivities`.
    """
    modules = {name: model.get_submodule(name) for name in probes}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def run(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:  # frozen weights: make the output a leaf we can differentiate to
                out = out.detach().requires_grad_()
            inputs[name], outputs[name] = args[0].detach(), out
            return out

        return run

    fisher = dict.fromkeys(probes, 0.0)
    sequences = 0
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 up, fp64 kept
                target, real = ids[:, 1:], mask[:, 1:].bool()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                per_seq = (nll * real).sum(1) / real.sum(1).clamp(min=1)
                keep = real.any(1)
                names = list(outputs)
                grads = torch.autograd.grad(per_seq[keep].sum(), [outputs[n] for n in names], allow_unused=True)
            with torch.no_grad():
                for name, g in zip(names, grads, strict=True):
                    if g is None:
                        continue
                    layer = probes[name][0]
                    delta = layer(inputs[name]).to(g.dtype) - outputs[name].detach()
                    dots = (g * delta).flatten(1).sum(1)[keep]
                    fisher[name] += float((dots**2).sum())
            sequences += int(keep.sum())
            inputs.clear()
            outputs.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: max(0.5 * fisher[name] / max(sequences, 1), 1e-12) / max(probes[name][1], 1e-12) for name in probes}
