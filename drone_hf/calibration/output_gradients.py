"""Output-gradient Gram of each target layer: the left Kronecker factor of the loss curvature.

Loss-aware DRONE (``method="drone-kfac"``, :mod:`drone_hf.solver.kfac`) weights a layer's output
error by ``H = Σ g gᵀ``, the Gram of the loss's gradients with respect to the layer's outputs
``y = W x + b`` over the real calibration tokens. One forward+backward pass per batch gives every
layer's ``g`` at once: the loss is the *summed* calibration loss of :mod:`~drone_hf.calibration.fisher`,
so ``g`` of a token is the gradient of the whole batch's loss with respect to that token's output.
With ``kfac_fisher="true"`` (the default) every term's label is drawn from the model's own
distribution: the true Fisher. ``"exact"`` computes that expectation over every class instead of
drawing one (sequence classifiers only, one backward pass per class:
:func:`~drone_hf.calibration.fisher.exact_fisher_losses`). ``"empirical"`` takes the data's next
tokens for causal LMs and the model's own argmax predictions otherwise (:func:`collect_output_grams`).

Only activation gradients are formed: the target weights are switched to ``requires_grad`` so a
graph exists, but ``torch.autograd.grad`` is asked for the layer outputs alone (no weight gradient
is computed or stored). Every parameter's ``requires_grad`` is restored afterwards. The products
are accumulated like the input Grams (:class:`~drone_hf.calibration.observer.GramObserver`: one
triangle, float32 strips flushed into float64). Under ``torch.distributed`` the sums are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import CalibrationBatches
from .distributed import all_reduce_sum, world
from .fisher import DEFAULT_KFAC_FISHER, _loss, exact_fisher_losses, gradients_only_for
from .observer import GramObserver
from .pipeline import _input_device
from .resumable import resumable_batches

if TYPE_CHECKING:
    from .cache import CalibrationCache


def _real_tokens(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, m] rows of ``grad`` for the real (unpadded) tokens; every row when shapes do not match."""
    if grad.dim() >= 2 and tuple(grad.shape[:2]) == tuple(mask.shape):
        return grad[mask.to(grad.device).bool()]
    return grad.reshape(-1, grad.shape[-1])


def _summed_losses(model: nn.Module, out, batch: dict, fisher: str, seed: int) -> tuple[list[torch.Tensor], int]:
    """The losses whose output gradients are accumulated for one batch, and its number of loss terms."""
    if fisher == "exact":
        return exact_fisher_losses(model, out)
    terms = _loss(model, out, batch, method="drone-kfac", reduction="none", labels=fisher, seed=seed)
    return [terms.sum()], terms.numel()


def _batch_seed(seed: int, index: int) -> int:
    """The label-draw seed of batch ``index`` (and process, under ``torch.distributed``): distinct
    streams for every batch and shard, the same on every run."""
    return (int(seed) * 1_000_003 + index) * 4_099 + world()[0]


@dataclass
class OutputGradientStats:
    """What :func:`collect_output_grams` gathers.

    Attributes:
        observers: name -> observer of ``Σ g gᵀ`` [out, out]; ``observer.gram`` is float64 and
            ``observer.num_tokens`` the number of token gradients in it.
        loss_terms: how many terms the summed loss had (predicted tokens of a causal LM, texts of a
            sequence classifier, real tokens of a token classifier), over all processes.
    """

    observers: dict[str, GramObserver]
    loss_terms: int

    def loss_scale(self, name: str) -> float:
        """The factor turning ``tr(ΔW G ΔWᵀ H)`` into a predicted increase of the *mean* loss.

        K-FAC with tokens as samples: ``F ≈ G ⊗ H / (S · T)`` for ``S`` loss terms and ``T`` tokens
        (the gradients are those of each term's own loss), and ``ΔL ≈ ½ vec(ΔW)ᵀ F vec(ΔW)``.
        """
        tokens = max(self.observers[name].num_tokens, 1)
        return 1.0 / (2.0 * max(self.loss_terms, 1) * tokens)


def collect_output_grams(
    model: nn.Module, layers: dict[str, nn.Module], data: CalibrationBatches, fisher: str = DEFAULT_KFAC_FISHER,
    seed: int = 0, cache: CalibrationCache | None = None, show_progress: bool = False,
) -> OutputGradientStats:
    """The output-gradient Gram ``Σ g gᵀ`` [out, out] of every layer over the real calibration tokens.

    ``fisher="empirical"`` takes gradients at the data's next tokens (causal LMs) or the model's
    argmax predictions; ``fisher="true"`` (the default) at labels drawn from the model's own distribution,
    one draw per loss term (batch ``i`` seeded by ``seed`` and ``i``), an unbiased estimate of the
    true Fisher ``E_y[g gᵀ]``, which for cross-entropy is the Gauss-Newton curvature that the
    predicted loss increase assumes; ``fisher="exact"`` that expectation itself, summed over every
    class (sequence classifiers; one backward pass per class). A layer the loss never reached
    (unused on these inputs) keeps a zero Gram.

    ``cache``: the pass is resumable (:mod:`~drone_hf.calibration.resumable`), in an entry named
    after the Fisher (and the seed of the true Fisher's draws), so another ``kfac_fisher`` or seed
    never reads it; ``show_progress``: a tqdm bar over the batches.
    """
    from ..modules.low_rank_linear import output_axis

    weights = {name: layer.weight for name, layer in layers.items()}
    width = {name: int(layer.weight.shape[output_axis(layer)]) for name, layer in layers.items()}
    observers = {name: GramObserver(width[name], name) for name in layers}
    outputs: dict[str, torch.Tensor] = {}

    def keep_output(name: str):
        def hook(module, args, output):
            outputs[name] = output

        return hook

    handles = [layer.register_forward_hook(keep_output(name)) for name, layer in layers.items()]
    device = _input_device(model)
    run = {"loss_terms": 0}

    def snapshot() -> dict:
        return {"loss_terms": run["loss_terms"], "observers": {n: o.state() for n, o in observers.items()}}

    def restore(snap: dict) -> bool:
        if set(snap.get("observers", {})) != set(observers):
            return False
        for n, st in snap["observers"].items():
            observers[n].load_state(st, device)
        run["loss_terms"] = int(snap["loss_terms"])
        return True

    entry = f"output-grams-{fisher}" + (f"-seed{seed}" if fisher == "true" else "")
    steps = resumable_batches(len(data.batches), "Output gradients", snapshot, restore, cache, entry, show_progress)
    try:
        # the target weights require grad so the forward pass builds a graph through every target layer
        with gradients_only_for(model, weights.values()):
            for index in steps:
                batch = {k: v.to(device) for k, v in data.batches[index].items()}
                outputs.clear()
                losses, terms = _summed_losses(model, model(**batch), batch, fisher, _batch_seed(seed, index))
                run["loss_terms"] += terms
                names = [n for n in layers if n in outputs and outputs[n].requires_grad]
                mask = batch["attention_mask"]
                for c, loss in enumerate(losses):  # one per class for the exact Fisher, else one
                    grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True,
                                                retain_graph=c < len(losses) - 1)
                    for name, g in zip(names, grads, strict=True):
                        if g is not None:
                            rows = _real_tokens(g.detach(), mask)
                            observers[name].accumulate(rows, index, count=None if c == 0 else 0)
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
    for name in sorted(observers):  # the same order in every process
        obs = observers[name]
        gram = obs.gram
        obs.gram = all_reduce_sum(gram if gram is not None else torch.zeros(width[name], width[name],
                                                                              dtype=torch.float64, device=device))
        obs.num_tokens = int(all_reduce_sum(torch.tensor(float(obs.num_tokens), dtype=torch.float64)).item())
    loss_terms = int(all_reduce_sum(torch.tensor(float(run["loss_terms"]), dtype=torch.float64)).item())
    return OutputGradientStats(observers, loss_terms)
