"""Row Fisher information of each target layer, the weights of Fisher-weighted SVD (``method="fwsvd"``).

FWSVD (Hsu et al., 2022) weights row ``i`` of a weight ``W`` [out, in] by
``I_i = Σ_j Σ_batches (∂L/∂W_ij)²``: the empirical Fisher information of the weights, summed over
the row. Here the sum runs over the calibration batches (the squared gradient of each batch's mean
loss, a mini-batch estimate; per-token gradients would cost one backward pass per token).

The loss, decided by what the model outputs:

* causal language models (class name ending in ``ForCausalLM`` or ``LMHeadModel``): next-token
  cross-entropy on the real tokens (padding masked out);
* models with other logits (sequence or token classification, masked LM): the calibration texts
  carry no labels, so the model's own predictions (argmax of the logits, detached) serve as
  pseudo-labels: the Fisher of the model's predictive distribution at its mode, which needs no
  labelled data; token-level logits use only the real tokens;
* a model without logits (a bare encoder, ``AutoModel``): refused, there is no loss to take
  gradients of. Load the model with its head (``AutoModelForSequenceClassification``, ...).

It needs one backward pass per batch: gradients are enabled only for the target weights, every
other parameter's ``requires_grad`` is restored afterwards, and no ``.grad`` is left behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from ..utils.model_kinds import is_causal_lm
from .data import CalibrationBatches
from .distributed import all_reduce_sum
from .pipeline import _eval_mode, _input_device
from .resumable import resumable_batches

if TYPE_CHECKING:
    from .cache import CalibrationCache


#: ``DroneConfig.kfac_fisher``'s values that every model with logits supports (labels taken or drawn).
SAMPLED_FISHER_LABELS = ("empirical", "true")
#: ... and ``"exact"``, the true Fisher's expectation over every class (sequence classifiers only).
FISHER_LABELS = (*SAMPLED_FISHER_LABELS, "exact")
#: ``DroneConfig.kfac_fisher``'s default. ``"true"`` since it predicted better in both A/Bs of
#: ``docs/methods.md`` (SmolLM2 greedy one-shot 27.2 vs 28.3 perplexity; MPNet validation 1.94x at
#: -1.10 vs 1.81x at -1.50) at the same cost, and needs no labels in the calibration text.
#: FWSVD keeps the empirical Fisher of its paper.
DEFAULT_KFAC_FISHER = "true"


def _sampled(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """One label per row of ``logits`` [N, C], drawn from the model's own distribution ``softmax``
    with a generator seeded by ``seed`` on the logits' device (the same draw on every run)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    generator = torch.Generator(device=probs.device).manual_seed(seed)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _logits(model: nn.Module, out, method: str) -> torch.Tensor:
    """``out.logits``, or the error naming the head to load (a bare encoder has no loss)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        other = "'asvd'" if method == "fwsvd" else "'drone'"
        raise ValueError(
            f"method={method!r} needs a loss to take gradients of, but {type(model).__name__} returns no logits "
            "(a bare encoder). Load the model with its head (e.g. AutoModelForSequenceClassification or "
            f"AutoModelForCausalLM), or use method={other}, which needs no gradients."
        )
    return logits


def exact_fisher_losses(model: nn.Module, out) -> tuple[list[torch.Tensor], int]:
    """One summed loss per class whose output gradients give the *exact* true Fisher of a batch.

    For a model with one prediction per text (sequence classification, logits [N, C]) the true
    Fisher of text ``x`` is ``E_{y~p(x)}[g_y g_yᵀ] = Σ_c p_c(x) g_c g_cᵀ``, ``g_c`` the gradient of
    ``-log p_c(x)``. The loss of class ``c`` is ``Σ_x sqrt(p_c(x)) · (-log p_c(x))`` with the weight
    detached: every token's output belongs to one text, so its gradient is ``sqrt(p_c) g_c`` and the
    Gram of the ``C`` gradients summed over classes is that expectation, with no sampling noise
    (``kfac_fisher="exact"``, at ``C`` backward passes per batch instead of one). A model with
    several predictions per text (a causal or masked LM, a token classifier) is refused: its tokens'
    gradients mix the losses of many terms, whose cross products this weighting would not cancel
    (a sampled label's do, in expectation), and ``C`` is a vocabulary.

    Returns:
        the ``C`` losses and the number of loss terms (texts) they cover.
    """
    logits = _logits(model, out, "drone-kfac")
    if is_causal_lm(model) or logits.dim() != 2:
        raise ValueError(
            f"kfac_fisher='exact' needs one prediction per text (a sequence classifier, logits [batch, classes]); "
            f"{type(model).__name__} gives logits of shape {tuple(logits.shape)}, one per token. Use "
            "kfac_fisher='true' (labels drawn from the model: the same Fisher, estimated by sampling)."
        )
    log_p = torch.log_softmax(logits.float(), dim=-1)
    weight = log_p.detach().exp().sqrt()
    return [-(weight[:, c] * log_p[:, c]).sum() for c in range(log_p.shape[-1])], int(log_p.shape[0])


def _loss(
    model: nn.Module, out, batch: dict[str, torch.Tensor], method: str = "fwsvd", reduction: str = "mean",
    labels: str = "empirical", seed: int = 0,
) -> torch.Tensor:
    """The calibration loss of one batch (see the module docstring), averaged or summed over its terms.

    ``labels="empirical"`` takes the data's next tokens (causal LMs) or the model's argmax predictions
    (other heads); ``labels="true"`` draws every term's label from the model's predictive distribution
    (seeded by ``seed``), so the Gram of its gradients is an unbiased estimate of
    the true Fisher, the Gauss-Newton curvature of the loss, instead of the empirical Fisher.
    """
    if labels not in SAMPLED_FISHER_LABELS:  # "exact" has no labels to draw: see exact_fisher_losses
        raise ValueError(f"labels={labels!r} must be one of {list(SAMPLED_FISHER_LABELS)}.")
    logits = _logits(model, out, method)
    mask = batch["attention_mask"].to(logits.device).bool()
    logits = logits.float()
    if is_causal_lm(model):
        ids = batch["input_ids"].to(logits.device)
        pred, target = logits[:, :-1], ids[:, 1:]
        keep = mask[:, 1:] & mask[:, :-1]
        pred, target = pred[keep], target[keep]
        return F.cross_entropy(pred, _sampled(pred, seed) if labels == "true" else target, reduction=reduction)
    if logits.dim() in (2, 3):  # one prediction per text, or one per real token
        real = logits if logits.dim() == 2 else logits[mask]
        # no labels in calibration text: the model's own predictions (argmax, or drawn) serve instead
        target = _sampled(real, seed) if labels == "true" else real.detach().argmax(-1)
        return F.cross_entropy(real, target, reduction=reduction)
    raise ValueError(f"method={method!r} cannot form a loss from logits of shape {tuple(logits.shape)}.")


@contextmanager
def gradients_only_for(model: nn.Module, weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """Eval mode with autograd on, only ``weights`` requiring grad (so a graph exists through their
    layers); afterwards every parameter's ``requires_grad`` is restored and no ``.grad`` is left.

    Restored by name, not by tensor object: accelerate's offload hooks put a new placeholder tensor
    into an offloaded module at every forward pass (copying the flag of the one before), so the
    objects held at entry are no longer the module's at exit."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        with _eval_mode(model), torch.enable_grad():
            yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
            p.grad = None


def collect_row_fisher(
    model: nn.Module, layers: dict[str, nn.Module], data: CalibrationBatches,
    cache: CalibrationCache | None = None, show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """name -> [out] float64 row Fisher ``I_i`` of each layer's weight (rows = outputs, as ``[out, in]``).

    ``nn.Linear`` stores ``[out, in]`` and ``Conv1D`` ``[in, out]``; both give one value per output.
    Under ``torch.distributed`` the sums are all-reduced. ``cache``: the pass is resumable (entry
    ``row-fisher``, :mod:`~drone_hf.calibration.resumable`); ``show_progress``: a tqdm bar.
    """
    from ..modules.low_rank_linear import output_axis

    weights = {name: layer.weight for name, layer in layers.items()}
    out_dim = {name: output_axis(layer) for name, layer in layers.items()}
    fisher = {name: torch.zeros(w.shape[out_dim[name]], dtype=torch.float64) for name, w in weights.items()}
    device = _input_device(model)

    def restore(snap: dict) -> bool:
        if set(snap.get("fisher", {})) != set(fisher):
            return False
        fisher.update({name: f.to(torch.float64) for name, f in snap["fisher"].items()})
        return True

    steps = resumable_batches(len(data.batches), "Row Fisher", lambda: {"fisher": fisher}, restore, cache,
                              "row-fisher", show_progress)
    with gradients_only_for(model, weights.values()):
        for i in steps:
            batch = {k: v.to(device) for k, v in data.batches[i].items()}
            loss = _loss(model, model(**batch), batch)
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for name, g in zip(weights, grads, strict=True):
                if g is None:
                    continue
                sq = g.detach().to(torch.float64).pow(2)
                fisher[name] += sq.sum(dim=1 - out_dim[name]).cpu()
    for name in sorted(fisher):  # the same order in every process
        fisher[name] = all_reduce_sum(fisher[name])
    for name, f in fisher.items():
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"The Fisher information of layer {name!r} is not finite: load the model in float32.")
    return fisher
