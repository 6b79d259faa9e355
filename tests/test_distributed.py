"""Two processes (gloo on CPU) calibrate on shards, all-reduce, and end with the 1-process factors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_compress import build
from tiny_models import CALIBRATION_TEXTS, tokenizer

import drone_hf
from drone_hf.calibration.distributed import shard_texts


def config(**kw):
    base = dict(dataset=CALIBRATION_TEXTS, num_samples=8, batch_size=3, tokenizer=tokenizer(), param_ratio=0.4)
    return drone_hf.DroneConfig(**(base | kw))


def _worker(rank: int, size: int, init_file: str, out_dir: str, sequential: bool | str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        model = drone_hf.compress(build("bert"), config(sequential=sequential), show_progress=False)
        torch.save(
            {"state": model.state_dict(), "calibration": model.config.quantization_config.calibration},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sequential",
    [False, pytest.param(True, marks=pytest.mark.slow), pytest.param("compensated", marks=pytest.mark.slow)],
)
def test_two_processes_give_the_single_process_factors(tmp_path, sequential):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), sequential), nprocs=2, join=True)
    single = drone_hf.compress(build("bert"), config(sequential=sequential), show_progress=False)
    ref = single.state_dict()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["calibration"]["num_texts"] == single.config.quantization_config.calibration["num_texts"]
        assert res["calibration"]["num_tokens"] == single.config.quantization_config.calibration["num_tokens"]
        for key, value in ref.items():
            # the same statistics summed in another order: equal up to float round-off
            torch.testing.assert_close(res["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key in ref:  # and the two processes agree with each other exactly
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key


def _too_few(rank: int, size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        shard_texts(["only one text"])
    except ValueError as e:
        with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
            f.write(str(e))
    finally:
        dist.destroy_process_group()


def test_fewer_texts_than_processes_is_refused(tmp_path):
    mp.spawn(_too_few, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert "1 calibration texts cannot be shared by 2 processes" in (tmp_path / f"err{r}.txt").read_text()


def _peer_model():
    from tiny_models import bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(num_labels=2)).double().eval()


def _peer_stats(texts: list[str]) -> tuple[dict, dict]:
    """ASVD's mean |x| and FWSVD's row Fisher of a tiny classifier on ``texts`` (this process's share)."""
    from drone_hf.calibration import tokenize_batches
    from drone_hf.calibration.activation_stats import collect_abs_means
    from drone_hf.calibration.fisher import collect_row_fisher
    from drone_hf.modules import resolve_targets

    model = _peer_model()
    layers = {c: layer for c, (_, layer) in resolve_targets(model, None, None).items()}
    data = tokenize_batches(texts, tokenizer(), 32, 3)
    means = {c: (o.abs_sum, o.num_tokens) for c, o in collect_abs_means(model, layers, data).items()}
    return means, collect_row_fisher(model, layers, data)


def _peer_worker(rank: int, size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.save(_peer_stats(shard_texts(CALIBRATION_TEXTS[:8])), os.path.join(out_dir, f"peer{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_the_peer_statistics(tmp_path):
    """ASVD's |x| sums and token counts and FWSVD's row Fisher are all-reduced. The |x| sums equal one
    process over all texts. The Fisher sums squared gradients of each *batch's* mean loss, so it
    depends on how texts are batched: each process must end with the sum of the two shards' Fishers
    (computed here one shard at a time), the same in both processes."""
    texts = CALIBRATION_TEXTS[:8]
    mp.spawn(_peer_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    means, _ = _peer_stats(texts)
    shard_fishers = [_peer_stats(texts[r::2])[1] for r in range(2)]
    results = [torch.load(tmp_path / f"peer{r}.pt") for r in range(2)]
    for got_means, got_fisher in results:
        assert set(got_means) == set(means) and set(got_fisher) == set(shard_fishers[0])
        for name, (total, count) in means.items():
            assert got_means[name][1] == count
            torch.testing.assert_close(got_means[name][0], total, rtol=1e-10, atol=1e-12)
        for name, f in got_fisher.items():
            torch.testing.assert_close(f, shard_fishers[0][name] + shard_fishers[1][name], rtol=1e-10, atol=1e-20)
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name])


#: Seconds two processes may take before the test calls it a hang: starting them alone takes 10-20 s on a
#: loaded machine, and gloo's own timeout, which would end a real hang, is 30 minutes.
HANG_AFTER = 180.0


def _spawn_or_fail(fn, args: tuple, nprocs: int = 2) -> None:
    """``mp.spawn(fn, args)``, but a run still going after ``HANG_AFTER`` seconds fails the test instead of
    blocking it: a process left alone in a collective waits ~30 minutes for gloo's own timeout."""
    import time

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + HANG_AFTER
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {HANG_AFTER:g}s: one waits in a collective")


def _record_outcome(rank: int, size: int, init_file: str, out_dir: str, run) -> None:
    """In a spawned process: join the group, ``run()``, and save what came out as ``outcome<rank>.pt``, its
    dict or the error it raised (``{"error": "Type: message"}``), for the test to compare across processes."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        try:
            outcome = run()
        except (ValueError, RuntimeError) as e:
            outcome = {"error": f"{type(e).__name__}: {e}"}
        torch.save(outcome, os.path.join(out_dir, f"outcome{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _time_per_process(slow: bool, target: float) -> None:
    """Fake this process's timings (no real timing: fast and deterministic). ``slow``: no rank of any layer
    beats its dense matmul and the fastest allocation runs at the dense speed, so ``target`` is out of
    reach; else every allocation is measured just above ``target``. Patched in a spawned process only."""
    from drone_hf.planner import RankPlanner

    def layer_times(self, c: str, ranks: list[int]) -> tuple[float, dict[int, float]]:
        out_f, in_f = self.shapes[c]
        return 1.0, {k: 2.0 if slow else k / min(out_f, in_f) for k in ranks}

    def end_to_end(self, variants: dict, inputs: dict) -> dict[str, float]:
        return {name: 1.0 if name == "dense" or slow else 1.0 / (target * 1.02) for name in variants}

    RankPlanner.layer_times, RankPlanner.end_to_end = layer_times, end_to_end


def _disagreeing_worker(rank: int, size: int, init_file: str, out_dir: str, slow_rank: int) -> None:
    """Compress for a speed budget that this process's (faked) timings reach unless it is ``slow_rank``;
    write what came out: the ranks, or the error."""
    def run() -> dict:
        _time_per_process(rank == slow_rank, target=1.5)
        model = drone_hf.compress(build("bert"), config(param_ratio=None, target_speedup=1.5, allocation="uniform"),
                                  show_progress=False)
        return {"ranks": model.config.quantization_config.ranks}

    _record_outcome(rank, size, init_file, out_dir, run)


@pytest.mark.parametrize("slow_rank", [0, 1])
def test_process_zero_decides_when_only_one_planner_raises(tmp_path, slow_rank):
    """Timings differ between processes, so a speed budget can be out of reach on one process only. Process
    0's outcome is every process's: its error raised everywhere (slow_rank=0), or its ranks taken by a
    process whose own planner raised (slow_rank=1). Never one process left waiting for the other."""
    _spawn_or_fail(_disagreeing_worker, (2, str(tmp_path / "init"), str(tmp_path), slow_rank))
    outcomes = [torch.load(tmp_path / f"outcome{r}.pt") for r in range(2)]
    assert outcomes[0] == outcomes[1]
    if slow_rank == 0:
        assert "target_speedup=1.5 is out of reach" in outcomes[0]["error"], outcomes[0]
        assert "the best reachable is about 1.00x" in outcomes[0]["error"]
    else:
        assert outcomes[0].get("ranks"), outcomes[0]


def _failing_loss_worker(rank: int, size: int, init_file: str, out_dir: str, failing_rank: int) -> None:
    """Compress sequentially within a loss budget, with a ``loss_fn`` that raises on ``failing_rank`` when
    the sequentially solved model is measured (the check that may keep the one-shot factors instead)."""
    import sys

    engine = sys.modules["drone_hf.compress"]  # the module: drone_hf.compress is also the function's name
    solved = []
    sequentially = engine.compress_sequentially

    def compress_sequentially(*args, **kwargs):
        out = sequentially(*args, **kwargs)
        solved.append(True)
        return out

    engine.compress_sequentially = compress_sequentially

    def loss_fn(model) -> float:
        if solved and rank == failing_rank:
            raise RuntimeError(f"no evaluation data on process {rank}")
        return 0.0

    def run() -> dict:
        model = drone_hf.compress(build("bert"), config(param_ratio=None, max_loss=0.1, allocation="uniform",
                                                        loss_fn=loss_fn, sequential=True), show_progress=False)
        record = model.config.quantization_config
        return {"ranks": record.ranks, "loss": record.allocation_result["sequential_loss_increase"]}

    _record_outcome(rank, size, init_file, out_dir, run)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_process_zero_decides_when_only_one_process_cannot_measure_the_sequential_model(tmp_path, failing_rank):
    """The sequential re-solve's loss check is process 0's for all as well: a loss_fn failing on one process
    only ends in process 0's outcome on both (its error, or its measured loss and kept factors)."""
    _spawn_or_fail(_failing_loss_worker, (2, str(tmp_path / "init"), str(tmp_path), failing_rank))
    outcomes = [torch.load(tmp_path / f"outcome{r}.pt") for r in range(2)]
    assert outcomes[0] == outcomes[1]
    if failing_rank == 0:
        assert "loss_fn raised RuntimeError: no evaluation data on process 0" in outcomes[0]["error"], outcomes[0]
    else:
        assert outcomes[0].get("ranks") and outcomes[0]["loss"] == 0.0, outcomes[0]


class _NeedsTwoArguments(Exception):
    """An exception pickle cannot rebuild (``__init__`` takes more than its ``args``)."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


#: case -> (what process 0 ends with, what process 1 ends with); None: a message checked apart
_HELPER_CASES = {
    "one raises": (("value", "decided on process 0"), ("value", "decided on process 0")),
    # process 0 keeps its own exception; the others cannot rebuild it and get its type and message
    "unpicklable error": (("error", "_NeedsTwoArguments", "budget: out of reach"),
                          ("error", "RuntimeError", "_NeedsTwoArguments: budget: out of reach")),
    "unpicklable value": (("error", "RuntimeError", None), ("error", "RuntimeError", None)),
}


def _helper_worker(rank: int, size: int, init_file: str, out_dir: str) -> None:
    """Every case of ``_HELPER_CASES`` in one process group (one spawn: starting processes is the slow part)."""
    from drone_hf.calibration.distributed import decided_by_process_zero

    def decide(case: str):
        if case == "one raises" and rank == 1:
            raise ValueError("process 1's own measurement")
        if case == "unpicklable error" and rank == 0:
            raise _NeedsTwoArguments("budget", "out of reach")
        if case == "unpicklable value":
            return lambda: rank  # a local function cannot be pickled
        return f"decided on process {rank}"

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        outcomes = {}
        for case in _HELPER_CASES:
            try:
                outcomes[case] = ("value", decided_by_process_zero(lambda c=case: decide(c), "testing"))
            except Exception as e:  # noqa: BLE001 - what each process raised is the outcome
                outcomes[case] = ("error", type(e).__name__, str(e))
        torch.save(outcomes, os.path.join(out_dir, f"helper{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_decided_by_process_zero_never_leaves_a_process_waiting(tmp_path):
    """What process 0 cannot send (an exception pickle cannot rebuild, a value it cannot pickle) still
    reaches the others as an error; a process whose own decision raised takes process 0's value."""
    _spawn_or_fail(_helper_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    got = [torch.load(tmp_path / f"helper{r}.pt") for r in range(2)]
    for case, expected in _HELPER_CASES.items():
        for rank in range(2):
            outcome, want = got[rank][case], expected[rank]
            assert outcome[:2] == want[:2], (case, rank, outcome)
            if len(want) == 3 and want[2] is not None:
                assert outcome[2] == want[2], (case, rank, outcome)
            elif len(want) == 3:
                # then the pickling error's own type and text, which differ between Python versions
                assert outcome[2].startswith("Process 0 cannot send the outcome of testing to the other "
                                             "processes: "), (case, rank, outcome)
    assert got[0]["unpicklable value"] == got[1]["unpicklable value"]


def _dense_loss_failing_worker(rank: int, size: int, init_file: str, out_dir: str, failing_rank: int) -> None:
    """Compress within a loss budget with a ``loss_fn`` that fails on ``failing_rank`` from its first call,
    the dense model's reference loss, taken before calibration; write what each process raised."""
    def loss_fn(model) -> float:
        if rank == failing_rank:
            raise RuntimeError(f"no evaluation data on process {rank}")
        return 0.0

    def run() -> dict:
        drone_hf.compress(build("bert"), config(param_ratio=None, max_loss=0.1, allocation="uniform", loss_fn=loss_fn),
                          show_progress=False)
        return {"error": None}

    _record_outcome(rank, size, init_file, out_dir, run)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_dense_loss_failing_on_one_process_stops_every_process(tmp_path, failing_rank):
    """Each process needs its own dense reference loss, so no process can take another's: when loss_fn fails
    on one process, that one raised and the others went on into the calibration's all_reduce, waiting for it.
    Now the failing process raises its own error and every other one an error naming it, before calibration."""
    _spawn_or_fail(_dense_loss_failing_worker, (2, str(tmp_path / "init"), str(tmp_path), failing_rank))
    outcomes = [torch.load(tmp_path / f"outcome{r}.pt") for r in range(2)]
    own, other = outcomes[failing_rank]["error"], outcomes[1 - failing_rank]["error"]
    assert own.startswith("ValueError: loss_fn raised RuntimeError: no evaluation data on process"), own
    assert other.startswith(f"RuntimeError: Process {failing_rank} of 2 failed while measuring the dense model's "
                            f"evaluation loss (ValueError: loss_fn raised RuntimeError: no evaluation data"), other
    assert "every process stops with it" in other
