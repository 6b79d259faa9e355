"""Feed calibration batches through a model and collect each target layer's input Gram.

The pipeline knows no solver: it returns one :class:`GramObserver` per layer. Forward hooks see
each layer's input; the batch's attention mask selects the real tokens, so padding never counts.
Layers that read the very same tensor (query/key/value, gate/up) share one product per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import CalibrationBatches
from .distributed import all_reduce_observers
from .observer import GramObserver
from .resumable import resumable_batches

if TYPE_CHECKING:
    from .cache import CalibrationCache


def _input_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _gram_snapshot(observers: dict[str, GramObserver], leader_of: dict) -> dict:
    """The Gram pass's entry payload: every accumulating observer, and which layers follow which."""
    from .cache import observer_state

    return {
        "leader_of": dict(leader_of),
        "observers": {n: observer_state(o) for n, o in observers.items() if n not in leader_of},
    }


def _gram_restore(snap: dict, observers: dict[str, GramObserver], leader_of: dict, device: torch.device) -> bool:
    """Put a Gram entry back into ``observers``; ``False`` (nothing changed) for another layer set."""
    if set(snap["observers"]) | set(snap["leader_of"]) != set(observers):
        return False
    from .cache import restore_observer

    for name, st in snap["observers"].items():
        restore_observer(observers[name], st, device)
    leader_of.update(snap["leader_of"])
    return True


@contextmanager
def _eval_mode(model: nn.Module):
    """Calibrate with dropout and the KV cache off, then give the model back as it came in."""
    modes = {m: m.training for m in model.modules()}
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache:  # a KV cache only costs memory here (and would grow when blocks are replayed)
        cfg.use_cache = False
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        if use_cache:
            cfg.use_cache = use_cache



def real_tokens(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """The rows of layer input ``x`` that are real tokens of the current batch, as [N, n].

    ``state["mask"]`` is the batch's attention mask; ``state["rows"]`` (emptied for each batch)
    keeps, per device, the resolved index of the real positions, so the mask is resolved once per
    batch and device rather than once per layer: ``None`` when the batch has no padding (the
    activations are used in place, no copy), else one ``index_select``. Layers that see one row per
    sequence (a pooler, a classifier on pooled features) get every row.
    """
    mask = state["mask"]
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == mask.shape[0] and mask.dim() == 2:
        return flat
    if mask.numel() != flat.shape[0]:
        raise RuntimeError(
            f"Layer {name!r} received {flat.shape[0]} token rows but the batch has {mask.numel()} "
            "positions; drone-hf cannot tell real tokens from padding there. Exclude it with "
            "modules_to_not_convert."
        )
    rows = state["rows"]
    if flat.device not in rows:
        positions = mask.reshape(-1)
        rows[flat.device] = None if bool(positions.all()) else positions.nonzero().squeeze(1).to(flat.device)
    index = rows[flat.device]
    return flat if index is None else flat.index_select(0, index)


def collect_grams(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: CalibrationBatches,
    in_features: dict[str, int],
    show_progress: bool = True,
    forward: Callable[[int, dict[str, torch.Tensor]], object] | None = None,
    observe_output: set[str] | frozenset[str] = frozenset(),
    cache: CalibrationCache | None = None,
    cache_entry: str = "oneshot",
    token_sums: bool = True,
) -> dict[str, GramObserver]:
    """Run ``model`` over ``data`` and return the input Gram of every layer in ``layers``.

    Args:
        model: the full model; called as ``model(input_ids=..., attention_mask=...)``.
        layers: name -> layer whose input to observe.
        data: token batches from :func:`~drone_hf.calibration.data.tokenize_batches`.
        in_features: name -> width of the observed statistic (the layer's input width, or its
            output width for ``observe_output`` layers).
        show_progress: a tqdm bar over batches (honours ``transformers`` progress-bar settings).
        forward: ``(batch index, batch) -> None`` that runs the forward pass instead of
            ``model(**batch)`` (layer-sequential mode replays one block on stored inputs).
        observe_output: layers whose *output* Gram ``Σ (W x)(W x)ᵀ`` (bias removed) is
            accumulated instead of the input Gram: the cheaper statistic for layers that narrow.
        cache: resumable calibration (:mod:`~drone_hf.calibration.cache`): the running statistics
            are written to entry ``cache_entry`` every ``SNAPSHOT_SECONDS`` and after the last
            batch, and a run that finds such an entry feeds only the batches it does not cover.
        token_sums: also keep each layer's token sum ``Σ x`` (``GramObserver.token_sum``). Only
            attention compression needs it (the Gram of ``[x; 1]``); skipping it saves a reduction
            and an accumulation per layer and batch.
    """
    observers = {name: GramObserver(in_features[name], name) for name in layers}
    state: dict = {"mask": None, "batch": -1, "last": None, "rows": {}}
    # Layers reading the very same tensor (query/key/value, gate/up) share one accumulator: the
    # first batch links each to the layer that computed the product, later batches skip them.
    leader_of: dict[str, str] = {}

    def make_hook(name: str):
        obs = observers[name]

        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if args else None
            if name in observe_output and torch.is_tensor(output):
                bias = getattr(module, "bias", None)
                x = output - bias if bias is not None else output  # y = W x: the bias is not in W's span
            if not torch.is_tensor(x):
                raise RuntimeError(f"Layer {name!r} was called without a tensor input; it cannot be calibrated.")
            last = state["last"]
            if last is not None and last[0] is x:
                if state["batch"] == 0 and name not in leader_of and last[1] != name:
                    leader_of[name] = last[1]  # last[1] accumulated this tensor, so it is a leader itself
                if name in leader_of:
                    if leader_of[name] != last[1]:
                        raise RuntimeError(f"Layer {name!r} shares its input inconsistently across batches.")
                    return  # a follower: it takes its leader's statistics at the end
            elif name in leader_of:
                raise RuntimeError(
                    f"Layer {name!r} read the same tensor as {leader_of[name]!r} in the first calibration batch but "
                    "not later; drone-hf cannot share their statistics. Calibrate them in separate runs."
                )
            # Σx too when asked: attention compression needs the Gram of [x; 1]
            obs.accumulate(real_tokens(x, state, name), state["batch"], token_sums=token_sums)
            state["last"] = (x, name)

        return hook

    device = _input_device(model)
    steps = resumable_batches(
        len(data.batches), "Calibrating", lambda: _gram_snapshot(observers, leader_of),
        lambda snap: _gram_restore(snap, observers, leader_of, device), cache, cache_entry, show_progress,
    )
    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        with _eval_mode(model), torch.inference_mode():
            for i in steps:
                batch = data.batches[i]
                state["batch"], state["mask"], state["last"] = i, batch["attention_mask"].bool(), None
                state["rows"] = {}
                if forward is not None:
                    forward(i, batch)
                else:
                    model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
    for name, leader in leader_of.items():  # shared inputs: the same statistics, one accumulator
        src, dst = observers[leader], observers[name]
        dst.share_from(src)
    all_reduce_observers(observers, shared=leader_of)  # multi-process: every process gets the whole set's statistics
    for name, obs in observers.items():
        if name not in leader_of and obs.gram is not None and not bool(torch.isfinite(obs.gram.sum())):
            raise ValueError(
                f"The input statistics of layer {name!r} overflowed (inf/NaN): its activations exceed float32 range. "
                "Load the model in float32 and check for extreme activations."
            )
    silent = [name for name, obs in observers.items() if obs.num_tokens == 0]
    if silent:
        raise RuntimeError(
            f"{len(silent)} target layer(s) never ran during calibration (e.g. {silent[0]!r}); they are not on "
            "the model's forward path for text input. Exclude them with modules_to_not_convert."
        )
    return observers
