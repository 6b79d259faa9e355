"""Measuring a compressed model against its dense original: output fidelity and latency.

Fidelity is measured on held-out text against the dense model's own outputs, over real tokens only.
Latency interleaves the models run by run (so drift in machine load hits both alike) and reports
medians of repeats; callers report ratios from one run, never absolute times from different runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model reproduces the dense one on the same inputs.

    Attributes:
        relative_error: ``||H_c - H_d||_F / ||H_d||_F`` of the last hidden states over real tokens.
        cosine: mean cosine similarity of mask-aware mean-pooled sentence embeddings.
        num_tokens: real tokens compared.
    """

    relative_error: float
    cosine: float
    num_tokens: int


def _hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
    return out.hidden_states[-1].float().cpu()


@torch.no_grad()
def output_fidelity(dense: nn.Module, compressed: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> Fidelity:
    """Compare last hidden states and mean-pooled embeddings of two models on ``batches``.

    Args:
        dense, compressed: models taking ``input_ids``/``attention_mask`` and returning hidden states.
        batches: dicts with ``input_ids`` and ``attention_mask`` (e.g. from
            :func:`drone_hf.calibration.tokenize_batches` on held-out text).
    """
    err2 = ref2 = 0.0
    cosines: list[torch.Tensor] = []
    tokens = 0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        hd, hc = _hidden(dense, batch), _hidden(compressed, batch)
        err2 += float(((hc - hd)[mask] ** 2).sum())
        ref2 += float((hd[mask] ** 2).sum())
        m = mask.unsqueeze(-1).float()
        ed, ec = (hd * m).sum(1) / m.sum(1), (hc * m).sum(1) / m.sum(1)
        cosines.append(torch.nn.functional.cosine_similarity(ed, ec, dim=-1))
        tokens += int(mask.sum())
    return Fidelity(
        relative_error=(err2 / ref2) ** 0.5 if ref2 else 0.0,
        cosine=float(torch.cat(cosines).mean()),
        num_tokens=tokens,
    )


def _cuda_devices(models: dict[str, nn.Module]) -> list[torch.device]:
    """The CUDA devices the models' parameters sit on (none on CPU)."""
    found = {p.device for model in models.values() for p in model.parameters() if p.device.type == "cuda"}
    return sorted(found, key=str)


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int = 15, warmup: int = 3
) -> dict[str, float]:
    """Median forward time in seconds of each model on ``inputs``, runs interleaved across models.

    CUDA launches return before the kernels finish, so on a GPU each run waits for the device before
    its clock starts (nothing queued by the previous run is counted) and before it stops (all of its
    own work is); without that the timer reads the launch overhead, not the model.
    """
    cuda = _cuda_devices(models)

    def wait() -> None:
        for device in cuda:
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            wait()
            start = time.perf_counter()
            model(**inputs)
            wait()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}
