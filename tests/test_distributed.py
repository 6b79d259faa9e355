"""Two processes (gloo on CPU) calibrate on shards, all-reduce, and end with the 1-process factors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import CALIBRATION_TEXTS, tokenizer
from test_compress import build

import drone_hf
from drone_hf.calibration.distributed import shard_texts


def config(**kw):
    base = dict(dataset=CALIBRATION_TEXTS, num_samples=8, batch_size=3, tokenizer=tokenizer(), param_ratio=0.4)
    return drone_hf.DroneConfig(**(base | kw))


def _worker(rank: int, size: int, init_file: str, out_dir: str, sequential: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        model = drone_hf.compress(build("bert"), config(sequential=sequential), show_progress=False)
        torch.save(
            {"state": model.state_dict(), "calibration": model.config.quantization_config.calibration},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sequential", [False, pytest.param(True, marks=pytest.mark.slow)])
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
