"""The per-layer latency model and its on-disk cache: what is measured, when, and what is trusted.

The cache outlives every run on a machine, so one run disturbed by other load must not decide every
later allocation: a contended run once left ranks 16/64/128 of three MiniLM shapes 10-40x slower than
their neighbours, and a loss budget then found no rank faster than dense. ``_measure`` is replaced
by a fake with exact times here, so each test knows what a measurement returns.
"""

from __future__ import annotations

import json
import logging

import pytest

import drone_hf.latency as latency_mod
from drone_hf.latency import IMPLAUSIBLE_FACTOR, LatencyModel, implausible, rank_grid

OUT, IN = 96, 64


def work_time(out_f: int, in_f: int, k: int | None) -> float:
    """Seconds proportional to multiply-adds, plus a launch cost per matmul: a plausible device."""
    return 1e-6 + out_f * in_f * 1e-9 if k is None else 2e-6 + k * (out_f + in_f) * 1e-9


class FakeDevice:
    """Stands in for ``LatencyModel._measure``: records each call, returns work-proportional times
    scaled by ``disturb[rank]`` (``"dense"`` for the dense layer) for the next ``disturbed_runs`` calls."""

    def __init__(self, disturb: dict | None = None, disturbed_runs: int = 0):
        self.calls: list[tuple[int, int, list[int]]] = []
        self.disturb = disturb or {}
        self.disturbed_runs = disturbed_runs

    def __call__(self, model, out_f, in_f, ranks):
        self.calls.append((out_f, in_f, list(ranks)))
        scale = self.disturb if len(self.calls) <= self.disturbed_runs else {}
        times = {"dense": work_time(out_f, in_f, None) * scale.get("dense", 1.0)}
        times.update({str(k): work_time(out_f, in_f, k) * scale.get(k, 1.0) for k in ranks})
        return times


@pytest.fixture
def device(monkeypatch):
    fake = FakeDevice()
    monkeypatch.setattr(LatencyModel, "_measure", lambda self, o, i, r: fake(self, o, i, r))
    return fake


def write_cache(tmp_path, model: LatencyModel, table: dict[str, float]) -> None:
    (tmp_path / "latency.json").write_text(json.dumps({model._key: table}))


def plausible_table(ranks, **overrides) -> dict[str, float]:
    table = {f"{OUT}x{IN}@dense": work_time(OUT, IN, None)}
    table.update({f"{OUT}x{IN}@{k}": work_time(OUT, IN, k) for k in ranks})
    table.update({f"{OUT}x{IN}@{k}": t for k, t in overrides.items()})
    return table


def test_rank_grid_stops_below_the_parameter_break_even():
    assert rank_grid(96, 64) == [8, 16, 24, 32]  # break-even 96*64/160 = 38.4
    assert rank_grid(64, 64) == [8, 16, 24]  # 32 is the break-even itself: no saving
    assert rank_grid(96, 64, limit=20) == [8, 16]
    assert rank_grid(4, 4) == [1]  # smaller than one step: still one candidate


def test_plausible_times_pass_and_each_kind_of_disturbance_is_named():
    ranks = [8, 16, 24, 32]
    times = {k: work_time(OUT, IN, k) for k in ranks}
    dense = work_time(OUT, IN, None)
    assert implausible(dense, times, OUT, IN) is None
    slow_small_rank = {**times, 16: times[24] * (IMPLAUSIBLE_FACTOR + 0.5)}
    assert implausible(dense, slow_small_rank, OUT, IN) == (
        f"rank 16 took {slow_small_rank[16]:.3g} s, a larger rank {times[24]:.3g} s")
    # slower than the next rank, but within the factor: noise, not disturbance
    assert implausible(dense, {**times, 16: times[24] * 1.5}, OUT, IN) is None
    # a dense layer 40x slower than rank 8, which does ~1/5 of its work
    reason = implausible(times[8] * 40, times, OUT, IN)
    assert reason is not None and reason.startswith("dense took") and "rank 8" in reason
    assert implausible(dense, {}, OUT, IN) is None  # nothing to compare against


def test_a_second_model_reads_the_cache_and_measures_nothing(tmp_path, device):
    first = LatencyModel(128, cache_dir=tmp_path).layer_times(OUT, IN, [8, 16])
    assert len(device.calls) == 1
    second = LatencyModel(128, cache_dir=tmp_path).layer_times(OUT, IN, [8, 16])
    assert second == first and len(device.calls) == 1
    other_tokens = LatencyModel(256, cache_dir=tmp_path)  # another key: measured on its own
    other_tokens.layer_times(OUT, IN, [8])
    assert len(device.calls) == 2
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert set(saved) == {LatencyModel(128, cache_dir=False)._key, other_tokens._key}


def test_a_rank_not_in_the_cache_re_measures_the_shape_with_every_rank_it_holds(tmp_path, device):
    model = LatencyModel(128, cache_dir=tmp_path)
    model.layer_times(OUT, IN, [8, 24])
    dense, times = model.layer_times(OUT, IN, [16])
    assert device.calls == [(OUT, IN, [8, 24]), (OUT, IN, [8, 16, 24])]  # one run for all three
    assert times == {16: work_time(OUT, IN, 16)} and dense == work_time(OUT, IN, None)
    model.layer_times(OUT, IN, [8, 16, 24])
    assert len(device.calls) == 2


@pytest.mark.parametrize("disturbed", [{16: 12.0}, {"dense": 30.0}], ids=["slow-rank", "slow-dense"])
def test_a_disturbed_cached_table_is_measured_again_and_replaced(tmp_path, device, disturbed, caplog):
    model = LatencyModel(128, cache_dir=tmp_path)
    table = plausible_table([8, 16, 24, 32])
    for key, scale in disturbed.items():
        table[f"{OUT}x{IN}@{key}"] *= scale
    write_cache(tmp_path, model, table)
    with caplog.at_level(logging.INFO, logger="transformers.drone_hf"):
        dense, times = LatencyModel(128, cache_dir=tmp_path).layer_times(OUT, IN, [16])
    assert device.calls == [(OUT, IN, [8, 16, 24, 32])]
    assert dense == work_time(OUT, IN, None) and times == {16: work_time(OUT, IN, 16)}
    assert f"Latency of {OUT}x{IN} at 128 tokens re-measured" in caplog.text
    saved = json.loads((tmp_path / "latency.json").read_text())[model._key]
    assert saved == plausible_table([8, 16, 24, 32])  # the disk copy is mended for the next run too


def test_a_table_disturbed_while_being_measured_is_measured_once_more(tmp_path, monkeypatch):
    fake = FakeDevice(disturb={8: 20.0}, disturbed_runs=1)
    monkeypatch.setattr(LatencyModel, "_measure", lambda self, o, i, r: fake(self, o, i, r))
    dense, times = LatencyModel(128, cache_dir=tmp_path).layer_times(OUT, IN, [8, 16])
    assert len(fake.calls) == 2 and times[8] == work_time(OUT, IN, 8)


def test_a_machine_that_stays_busy_is_warned_about_once_and_never_looped_on(tmp_path, monkeypatch, caplog):
    fake = FakeDevice(disturb={8: 20.0}, disturbed_runs=10**6)
    monkeypatch.setattr(LatencyModel, "_measure", lambda self, o, i, r: fake(self, o, i, r))
    model = LatencyModel(128, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            _, times = model.layer_times(OUT, IN, [8, 16])
    assert len(fake.calls) == 2  # the first measurement and one re-measurement, not one per call
    assert times[8] == 20.0 * work_time(OUT, IN, 8)  # the times are used as measured
    assert caplog.text.count("still implausible after re-measuring") == 1
    assert "Compress on a quiet machine" in caplog.text


def test_a_plausible_cached_table_is_checked_without_measuring(tmp_path, device):
    model = LatencyModel(128, cache_dir=tmp_path)
    write_cache(tmp_path, model, plausible_table([8, 16, 24]))
    LatencyModel(128, cache_dir=tmp_path).layer_times(OUT, IN, [16, 24])
    assert device.calls == []


@pytest.mark.parametrize("content", ["{not json", '{"other": 1'])
def test_a_damaged_cache_file_is_measured_over_not_trusted(tmp_path, device, content):
    (tmp_path / "latency.json").write_text(content)
    LatencyModel(128, cache_dir=tmp_path).layer_times(OUT, IN, [8])
    assert len(device.calls) == 1
    assert json.loads((tmp_path / "latency.json").read_text())  # rewritten as valid JSON


def test_an_unwritable_cache_does_not_stop_measuring(tmp_path, device):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    dense, times = LatencyModel(128, cache_dir=blocker).layer_times(OUT, IN, [8])
    assert dense == work_time(OUT, IN, None) and times == {8: work_time(OUT, IN, 8)}


def test_without_a_disk_cache_nothing_is_written(tmp_path, device, monkeypatch):
    monkeypatch.setenv("DRONE_HF_CACHE", str(tmp_path))
    LatencyModel(128, cache_dir=False).layer_times(OUT, IN, [8])
    assert not (tmp_path / "latency.json").exists()
    assert latency_mod.default_cache_dir() == tmp_path


def test_the_real_measurement_times_every_variant():
    dense, times = LatencyModel(64, repeats=2, warmup=1, cache_dir=False).layer_times(OUT, IN, [8, 16])
    assert dense > 0 and set(times) == {8, 16} and all(t > 0 for t in times.values())
