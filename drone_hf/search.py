"""Rank search that runs the model: evaluation loss, layer sensitivities, end-to-end latency, and the
paper's Algorithm 2.

Everything here swaps candidate layers in and out of the live model (:class:`Swapper`) and always
restores the dense layers it found; the engine decides what to keep.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from .modules.low_rank_linear import DroneLinear
from .modules.targets import replace_modules


class Swapper:
    """Put candidate layers into a model and take them out again, by full module name."""

    def __init__(self, model: nn.Module, dense: dict[str, nn.Module]) -> None:
        self.model = model
        self.dense = dense  # full name -> the original layer

    def set(self, layers: dict[str, nn.Module]) -> None:
        """Make exactly ``layers`` factored (full name -> module); every other target dense."""
        current = {n: m for n, m in ((n, self.model.get_submodule(n)) for n in self.dense)}
        changes = {n: layers.get(n, self.dense[n]) for n in self.dense if current[n] is not layers.get(n, self.dense[n])}
        replace_modules(self.model, changes)

    @contextmanager
    def trying(self, layers: dict[str, nn.Module]):
        """Temporarily factor ``layers`` (on top of nothing else); dense again afterwards."""
        self.set(layers)
        try:
            yield
        finally:
            self.set({})


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or getattr(getattr(model, "config", None), "is_decoder", False)


class LossEvaluator:
    """The evaluation loss on held-out calibration batches, as allocation budgets measure it.

    * causal LMs: mean next-token cross-entropy (nats/token) over real tokens;
    * other models: relative squared error of the last hidden states against the dense model's,
      ``Σ‖H − H_dense‖² / Σ‖H_dense‖²`` over real tokens (0 for the dense model);
    * a user ``loss_fn(model) -> float`` replaces both (e.g. ``1 - accuracy`` from ``evaluate``).

    Budgets are on the *increase* over the dense model's value (:attr:`dense_loss`). The first two
    add up across layers to first order, which is what greedy allocation assumes.
    """

    def __init__(
        self, model: nn.Module, batches: list[dict[str, torch.Tensor]], loss_fn: Callable[[nn.Module], float] | None
    ) -> None:
        self.batches = batches
        self.loss_fn = loss_fn
        self.kind = "callable" if loss_fn is not None else ("lm" if _is_causal_lm(model) else "distortion")
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.reference: list[torch.Tensor] = []
        if self.kind == "distortion":
            self.reference = [self._hidden(model, b) for b in batches]
        self.dense_loss = self.evaluate(model)

    def _hidden(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**{k: v.to(self.device) for k, v in batch.items()}, output_hidden_states=True)
        return out.hidden_states[-1].float()

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
            err = ref = 0.0
            for b, href in zip(self.batches, self.reference):
                mask = b["attention_mask"].to(self.device).bool()
                h = self._hidden(model, b)
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
                for name, g in zip(names, grads):
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
