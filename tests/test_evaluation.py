"""drone_hf.evaluation.measure_latency: interleaved medians, and waiting for an asynchronous device."""

from __future__ import annotations

import torch
from torch import nn

from drone_hf import evaluation


class _Recorder(nn.Module):
    """Logs each forward call and advances a fake clock by its next scripted duration; its parameter is
    what the device lookup reads."""

    def __init__(self, name: str, log: list[str], clock: list[float] | None = None,
                 durations: list[float] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.name, self.log, self.clock, self.durations = name, log, clock, durations

    def forward(self, **inputs: torch.Tensor) -> None:
        self.log.append(f"forward {self.name}")
        if self.clock is not None:
            self.clock[0] += self.durations.pop(0)


def test_medians_of_interleaved_runs_after_warmup(monkeypatch):
    log: list[str] = []
    clock = [0.0]
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])
    models = {"a": _Recorder("a", log, clock, [9.0, 1.0, 5.0, 3.0]),
              "b": _Recorder("b", log, clock, [7.0, 2.0, 8.0, 4.0])}
    times = evaluation.measure_latency(models, {}, repeats=3, warmup=1)
    # the first (warm-up) run of each is dropped; medians of the other three
    assert times == {"a": 3.0, "b": 4.0}
    forwards = [e for e in log if e.startswith("forward")]
    assert forwards == ["forward a", "forward b"] * 4  # interleaved run by run


def test_cpu_models_never_touch_cuda(monkeypatch):
    def refuse(*_):
        raise AssertionError("synchronize called for CPU models")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    log: list[str] = []
    assert evaluation._cuda_devices({"a": _Recorder("a", log)}) == []
    times = evaluation.measure_latency({"a": _Recorder("a", log)}, {}, repeats=2, warmup=0)
    assert times["a"] >= 0


def test_cuda_runs_wait_for_the_device_before_and_after_each_forward(monkeypatch):
    """CUDA launches are asynchronous: a clock read right after the forward measures launches only,
    and one read before pending work finishes charges the previous model's kernels to this one. The
    clock must start and stop on an idle device, whichever way measure_latency is called."""
    log: list[str] = []
    device = torch.device("cuda:0")
    monkeypatch.setattr(evaluation, "_cuda_devices", lambda models: [device])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: log.append(f"sync {d}"))
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: log.append("clock") or float(len(log)))
    evaluation.measure_latency({"a": _Recorder("a", log), "b": _Recorder("b", log)}, {}, repeats=2, warmup=1)
    run = ["sync cuda:0", "clock", "forward {}", "sync cuda:0", "clock"]
    expected = [e.format(name) for _ in range(3) for name in ("a", "b") for e in run]
    assert log == expected
