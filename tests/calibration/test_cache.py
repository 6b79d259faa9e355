"""Resumable calibration (DroneConfig(calibration_cache=...)): identical results, real resumes after a
SIGKILL, refusal of a cache from another run, and recovery from damaged entries."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model helpers
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer  # noqa: E402

import drone_hf  # noqa: E402
from drone_hf import DroneConfig  # noqa: E402
from drone_hf.calibration import cache as cache_mod  # noqa: E402

TOK = tokenizer()
TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def build(layers: int = 3, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config(num_hidden_layers=layers)).double().eval()


def config(**kw) -> DroneConfig:
    base = {"dataset": CALIBRATION_TEXTS, "num_samples": len(CALIBRATION_TEXTS), "batch_size": 2, "tokenizer": TOK,
            "param_ratio": 0.4, "allocation": "uniform"}  # uniform: every text calibrates (greedy holds some out)
    return DroneConfig(**(base | kw))


def compress(model, **kw):
    return drone_hf.compress(copy.deepcopy(model), config(**kw), show_progress=False)


def assert_identical(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.config.quantization_config.relative_errors == b.config.quantization_config.relative_errors


class Calls:
    """Counts forward passes that complete, per module (capture hooks that abort a pass are not counted)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.count = {n: 0 for n in modules}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.count[name] += 1

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("sequential", [False, True, "compensated"])
def test_cached_runs_equal_uncached_and_a_finished_cache_skips_all_calibration(tmp_path, sequential):
    dense = build()
    reference = compress(dense, sequential=sequential)
    first = compress(dense, sequential=sequential, calibration_cache=tmp_path)
    assert_identical(first, reference)
    # a second run finds everything finished: no block (sequential) / no batch (one-shot) runs again
    model = copy.deepcopy(dense)
    calls = Calls({f"block{i}": b for i, b in enumerate(model.encoder.layer)})
    again = drone_hf.compress(model, config(sequential=sequential, calibration_cache=tmp_path), show_progress=False)
    calls.remove()
    assert set(calls.count.values()) == {0}
    assert_identical(again, reference)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from drone_hf.calibration import cache as cache_mod
    sys.path.insert(0, {here!r})
    import test_cache as t

    mode, stop_at = sys.argv[1], int(sys.argv[2])
    cache_mod.SNAPSHOT_SECONDS = 0.0  # one-shot: a snapshot after every batch
    save = cache_mod.CalibrationCache.save

    def save_then_die(self, name, obj):
        save(self, name, obj)
        done = {{"outputs": obj.get("block", -2) + 1, "oneshot": obj.get("batches_done", -1)}}.get(name, -1)
        if done == stop_at:  # deterministic: the process dies right after this entry is on disk
            os.kill(os.getpid(), signal.SIGKILL)

    cache_mod.CalibrationCache.save = save_then_die
    t.compress(t.build(4), sequential=t.MODES[mode], calibration_cache=sys.argv[3])
    print("not killed")
    """
)


#: kill-script mode -> DroneConfig.sequential
MODES = {"one-shot": False, "sequential": True, "compensated": "compensated"}


def run_killed(tmp_path: Path, mode: str, stop_at: int) -> Path:
    folder = tmp_path / "cache"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS), root=str(ROOT), here=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    proc = subprocess.run([sys.executable, str(script), mode, str(stop_at), str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return folder


@pytest.mark.parametrize("mode", ["sequential", "compensated"])
def test_sequential_run_killed_after_two_blocks_resumes_without_running_them(tmp_path, mode):
    folder = run_killed(tmp_path, mode, 2)
    assert sorted(p.name for p in folder.glob("block-*.pt")) == ["block-00000.pt", "block-00001.pt"]
    dense = build(4)
    reference = compress(dense, sequential=MODES[mode])
    model = copy.deepcopy(dense)
    calls = Calls({f"block{i}": b for i, b in enumerate(model.encoder.layer)})
    resumed = drone_hf.compress(model, config(sequential=MODES[mode], calibration_cache=folder), show_progress=False)
    calls.remove()
    batches = -(-len(CALIBRATION_TEXTS) // 2)
    # finished blocks never ran; each later block ran whole once per batch to calibrate and once to feed
    # the next. Compensated: its calibration passes stop after each group's last layer (not counted),
    # then one whole pass orders the groups and one per batch advances the dense stream.
    runs = 2 * batches + (1 if mode == "compensated" else 0)
    assert calls.count == {"block0": 0, "block1": 0, "block2": runs, "block3": runs}
    assert_identical(resumed, reference)


def test_one_shot_run_killed_after_two_batches_feeds_only_the_rest(tmp_path):
    folder = run_killed(tmp_path, "one-shot", 2)
    dense = build(4)
    reference = compress(dense)
    model = copy.deepcopy(dense)
    calls = Calls({"model": model.encoder})
    resumed = drone_hf.compress(model, config(calibration_cache=folder), show_progress=False)
    calls.remove()
    batches = -(-len(CALIBRATION_TEXTS) // 2)
    assert calls.count["model"] == batches - 2
    assert_identical(resumed, reference)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "weights"}, "the model weights"),
        ({"model": "architecture"}, "the model architecture"),
        ({"num_samples": len(CALIBRATION_TEXTS) - 1}, "calibration data"),
        ({"max_length": 8}, "calibration data"),
        ({"target_modules": ["query", "value"]}, "statistics-relevant settings"),
        ({"sequential": True}, "statistics-relevant settings"),
        # greedy holds texts out for its evaluation loss: it calibrates on other texts than uniform
        ({"allocation": "greedy"}, "texts held out for evaluation: eval_samples, and allocation='uniform' against "
                                   "greedy"),
    ],
)
def test_a_cache_from_another_run_is_refused_and_left_alone(tmp_path, change, message):
    dense = build()
    compress(dense, calibration_cache=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = dense
    kw = dict(change)
    what = kw.pop("model", None)
    if what == "weights":
        other = copy.deepcopy(dense)
        with torch.no_grad():
            other.encoder.layer[2].output.dense.weight[0, 0] += 1e-9  # a layer no other layer's input depends on
    elif what == "architecture":
        other = build(layers=2)
    with pytest.raises(ValueError, match=f"different calibration run: changed since it was written: .*{message}"):
        compress(other, calibration_cache=tmp_path, **kw)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_sequential_cache_with_other_ranks_is_refused(tmp_path):
    dense = build()
    compress(dense, sequential=True, calibration_cache=tmp_path)
    with pytest.raises(ValueError, match="ranks of the sequential pass"):
        compress(dense, sequential=True, param_ratio=0.3, calibration_cache=tmp_path)


def test_a_plain_sequential_cache_is_not_resumed_as_compensated(tmp_path):
    """Plain sequential entries lack the dense stream and the cross-Gram: refused, not half-reused."""
    dense = build()
    compress(dense, sequential=True, calibration_cache=tmp_path)
    with pytest.raises(ValueError, match="statistics-relevant settings"):
        compress(dense, sequential="compensated", calibration_cache=tmp_path)


def test_a_sequential_loss_aware_cache_is_not_resumed_with_another_fisher(tmp_path):
    """Later blocks of a sequential run see earlier blocks solved with the output-gradient Gram, which
    ``kfac_fisher`` changes: a cache of one is refused for the other; the same setting resumes."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    dense = BertForSequenceClassification(bert_config(num_hidden_layers=2)).double().eval()
    first = compress(dense, method="drone-kfac", sequential=True, calibration_cache=tmp_path)  # true, the default
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="statistics-relevant settings"):
        compress(dense, method="drone-kfac", sequential=True, kfac_fisher="empirical", calibration_cache=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert_identical(compress(dense, method="drone-kfac", sequential=True, calibration_cache=tmp_path), first)


def test_damaged_or_truncated_entries_are_recomputed(tmp_path, caplog):
    dense = build()
    reference = compress(dense, sequential=True)
    compress(dense, sequential=True, calibration_cache=tmp_path)
    entry = tmp_path / "block-00001.pt"
    raw = bytearray(entry.read_bytes())
    raw[-10] ^= 0xFF  # one flipped bit pattern in the payload
    entry.write_bytes(bytes(raw))
    (tmp_path / "outputs.pt").write_bytes((tmp_path / "outputs.pt").read_bytes()[:100])  # a torn write
    model = copy.deepcopy(dense)
    calls = Calls({f"block{i}": b for i, b in enumerate(model.encoder.layer)})
    resumed = drone_hf.compress(model, config(sequential=True, calibration_cache=tmp_path), show_progress=False)
    calls.remove()
    assert all(v > 0 for v in calls.count.values())  # nothing trustworthy to resume from: recomputed
    assert_identical(resumed, reference)
    store = cache_mod.CalibrationCache(tmp_path, {})
    assert store.load("block-00001") is not None and store.load("outputs") is not None  # rewritten whole


def test_a_kill_during_a_write_leaves_the_old_entry_and_no_stray_file(tmp_path, monkeypatch):
    store = cache_mod.CalibrationCache(tmp_path, {})
    store.save("entry", {"x": torch.arange(3)})

    def dies(src, dst):
        raise KeyboardInterrupt  # stands for the process dying between writing and renaming

    monkeypatch.setattr(cache_mod.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        store.save("entry", {"x": torch.arange(5)})
    monkeypatch.undo()
    assert torch.equal(store.load("entry")["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.pt", "manifest.json"]
    # a temporary file left by a real SIGKILL is ignored and cleaned when the cache is opened again
    (tmp_path / ".entry.pt.abc.tmp").write_bytes(b"partial")
    cache_mod.CalibrationCache(tmp_path, {})
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_that_is_not_a_cache_is_not_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and is not a drone-hf calibration cache"):
        compress(build(), calibration_cache=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest.json"):
        cache_mod.CalibrationCache(tmp_path / "sub", {})


def test_a_refused_folder_keeps_the_users_temporary_files(tmp_path):
    """Cleaning up after a killed write is for the cache's own files, in a folder known to be a cache:
    a user's ".draft.tmp" or "rank-notes.txt" next to their notes is neither deleted nor overlooked."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".draft.tmp").write_text("unsaved work")
    with pytest.raises(ValueError, match="not empty and is not a drone-hf calibration cache"):
        cache_mod.CalibrationCache(tmp_path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.tmp", "notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "rank-notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and is not a drone-hf calibration cache"):
        cache_mod.CalibrationCache(other, {})
    fresh = tmp_path / "fresh"  # killed while writing its first manifest: still a cache to open
    fresh.mkdir()
    (fresh / ".manifest.json.x1y2.tmp").write_bytes(b"partial")
    cache_mod.CalibrationCache(fresh, {})
    assert sorted(p.name for p in fresh.iterdir()) == ["manifest.json"]


def test_calibration_cache_option_is_validated_and_never_serialised(tmp_path):
    for bad in (3, True, "", ["a"]):
        with pytest.raises(ValueError, match="calibration_cache=.* must be a folder path"):
            DroneConfig(calibration_cache=bad)
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        DroneConfig(calibration_cache=afile)
    cfg = DroneConfig(calibration_cache=tmp_path / "new")
    assert "calibration_cache" not in cfg.to_dict()
    assert json.loads(cfg.to_json_string()).get("calibration_cache") is None
    comp = compress(build(), calibration_cache=tmp_path / "new")
    assert (tmp_path / "new" / "manifest.json").is_file()
    assert "calibration_cache" not in comp.config.to_dict()["quantization_config"]


def record_progress_bars(monkeypatch, module) -> list[dict]:
    """The keyword arguments of every progress bar ``module`` opens from now on (the bars still show)."""
    bars: list[dict] = []
    real_tqdm = module.hf_logging.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(module.hf_logging, "tqdm", recording_tqdm)
    return bars


def test_progress_bar_shows_resumed_work(tmp_path, monkeypatch):
    dense = build()
    save = cache_mod.CalibrationCache.save

    def save_then_stop(self, name, obj):
        save(self, name, obj)
        if name == "outputs" and obj["block"] == 1:
            raise KeyboardInterrupt  # interrupted after two finished blocks

    monkeypatch.setattr(cache_mod.CalibrationCache, "save", save_then_stop)
    model = copy.deepcopy(dense)
    with pytest.raises(KeyboardInterrupt):
        drone_hf.compress(model, config(sequential=True, calibration_cache=tmp_path), show_progress=False)
    assert not any(isinstance(m, drone_hf.DroneLinear) for m in model.modules())  # dense layers put back
    monkeypatch.undo()
    import drone_hf.sequential as sequential_mod

    bars = record_progress_bars(monkeypatch, sequential_mod)
    resumed = drone_hf.compress(model, config(sequential=True, calibration_cache=tmp_path), show_progress=True)
    block_bars = [b for b in bars if b.get("unit") == "block"]
    shown = [(b["desc"], b["initial"], b["total"]) for b in block_bars]
    assert shown == [("Sequential blocks (2 resumed from cache)", 2, 3)]
    assert_identical(resumed, compress(dense, sequential=True))


def _distributed_worker(rank: int, size: int, init_file: str, folder: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        dense = build()
        results, counts = [], []
        for step in range(3):
            if step == 2:  # one process lost a finished block: the processes must agree to start over
                if rank == 1:
                    (Path(folder) / f"rank1-of-{size}" / "block-00001.pt").unlink()
                dist.barrier()
            model = copy.deepcopy(dense)
            calls = Calls({f"block{i}": b for i, b in enumerate(model.encoder.layer)})
            drone_hf.compress(model, config(sequential=True, calibration_cache=folder), show_progress=False)
            calls.remove()
            results.append(model.state_dict())
            counts.append(sum(calls.count.values()))
        torch.save({"results": results, "counts": counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, three compressions each: about 50 s on 2 cores
def test_processes_keep_their_own_entries_and_agree_on_the_resume_point(tmp_path):
    import torch.multiprocessing as mp

    folder = tmp_path / "cache"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(folder), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in folder.iterdir()) == ["rank0-of-2", "rank1-of-2"]
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for run in runs:
        first, cached, restarted = run["counts"]
        assert first > 0 and cached == 0 and restarted == first  # resumed all / started over together
        for state in run["results"][1:]:
            for key, value in run["results"][0].items():
                assert torch.equal(state[key], value), key
    for key, value in runs[0]["results"][0].items():  # the processes agree with each other exactly
        assert torch.equal(runs[1]["results"][0][key], value), key


def test_a_one_shot_cache_serves_another_param_ratio_without_a_forward_pass(tmp_path):
    dense = build()
    compress(dense, param_ratio=0.4, calibration_cache=tmp_path)
    model = copy.deepcopy(dense)
    calls = Calls({"encoder": model.encoder})
    again = drone_hf.compress(model, config(param_ratio=0.25, calibration_cache=tmp_path), show_progress=False)
    calls.remove()
    assert calls.count["encoder"] == 0  # the statistics do not depend on the budget
    assert_identical(again, compress(dense, param_ratio=0.25))


# --- the peer methods' statistics passes (drone-kfac, fwsvd, asvd) ------------------------------

def build_classifier(layers: int = 3) -> BertForSequenceClassification:
    """A model with logits: the loss-aware passes need a loss to take gradients of."""
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(num_hidden_layers=layers)).double().eval()


#: method settings -> the cache entry its statistics pass writes
PEER_PASSES = [
    ({"method": "drone-kfac", "kfac_fisher": "true"}, "output-grams-true-seed0"),
    ({"method": "drone-kfac", "kfac_fisher": "empirical"}, "output-grams-empirical"),
    ({"method": "drone-kfac", "kfac_fisher": "exact"}, "output-grams-exact"),
    ({"method": "fwsvd"}, "row-fisher"),
    ({"method": "asvd"}, "abs-means"),
]


@pytest.mark.parametrize(("settings", "entry"), PEER_PASSES, ids=[e for _, e in PEER_PASSES])
def test_a_peer_statistics_pass_is_cached_and_serves_another_budget_without_a_forward_pass(tmp_path, settings, entry):
    dense = build_classifier()
    first = compress(dense, calibration_cache=tmp_path, **settings)
    assert_identical(first, compress(dense, **settings))
    assert (tmp_path / f"{entry}.pt").exists()
    model = copy.deepcopy(dense)
    calls = Calls({"encoder": model.bert.encoder})
    again = drone_hf.compress(model, config(param_ratio=0.25, calibration_cache=tmp_path, **settings),
                              show_progress=False)
    calls.remove()
    assert calls.count["encoder"] == 0  # neither the Gram pass nor the method's own pass ran again
    assert_identical(again, compress(dense, param_ratio=0.25, **settings))


@pytest.mark.parametrize("fisher", ["true", "empirical", "exact"])
def test_a_loss_aware_pass_interrupted_after_two_batches_feeds_only_the_rest(tmp_path, monkeypatch, fisher):
    import drone_hf.calibration.resumable as resumable_mod

    dense = build_classifier()
    settings = {"method": "drone-kfac", "kfac_fisher": fisher}
    monkeypatch.setattr(cache_mod, "SNAPSHOT_SECONDS", 0.0)  # a snapshot after every batch
    save = cache_mod.CalibrationCache.save

    def save_then_stop(self, name, obj):
        save(self, name, obj)
        if name.startswith("output-grams") and obj["batches_done"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.CalibrationCache, "save", save_then_stop)
    model = copy.deepcopy(dense)
    with pytest.raises(KeyboardInterrupt):
        drone_hf.compress(model, config(calibration_cache=tmp_path, **settings), show_progress=False)
    monkeypatch.setattr(cache_mod.CalibrationCache, "save", save)
    assert all(p.requires_grad for p in model.parameters())  # the interrupted pass restored requires_grad

    bars = record_progress_bars(monkeypatch, resumable_mod)
    model = copy.deepcopy(dense)
    calls = Calls({"encoder": model.bert.encoder})
    resumed = drone_hf.compress(model, config(calibration_cache=tmp_path, **settings), show_progress=True)
    calls.remove()
    batches = -(-len(CALIBRATION_TEXTS) // 2)
    assert calls.count["encoder"] == (batches - 2) + batches  # the rest of the gradient pass, then the Gram pass
    shown = [(b["desc"], b["initial"], b["total"]) for b in bars if b.get("unit") == "batch"]
    assert shown == [("Output gradients (resumed at batch 2)", 2, batches), ("Calibrating", 0, batches)]
    # bit-identical to an uninterrupted run: the true Fisher's label draws are seeded per batch index
    assert_identical(resumed, compress(dense, **settings))


def test_the_true_fisher_entry_is_per_seed(tmp_path):
    from drone_hf.calibration.cache import CalibrationCache
    from drone_hf.calibration.data import tokenize_batches
    from drone_hf.calibration.output_gradients import collect_output_grams

    model = build_classifier(1)
    layers = {"out": model.bert.encoder.layer[0].output.dense}
    data = tokenize_batches(CALIBRATION_TEXTS, TOK, 32, 2)
    cache = CalibrationCache(tmp_path, {})

    def gram(seed: int, with_cache: bool = True) -> torch.Tensor:
        stats = collect_output_grams(model, layers, data, fisher="true", seed=seed, cache=cache if with_cache else None)
        return stats.observers["out"].gram

    first = gram(0)
    hits = cache.hits
    assert torch.equal(gram(0), first) and cache.hits == hits + 1  # the same draws: read back
    other = gram(1)
    assert cache.hits == hits + 1  # seed 1 never reads seed 0's entry
    assert torch.equal(other, gram(1, with_cache=False)) and not torch.equal(other, first)
    assert sorted(p.name for p in tmp_path.glob("output-grams-*")) == ["output-grams-true-seed0.pt",
                                                                       "output-grams-true-seed1.pt"]
