"""Saves of a DRONE model are atomic: the folder is the old checkpoint or the new one, never a mix.

The kill test is deterministic, not timing luck: the saving subprocess replaces the safetensors writer
with one that writes half of the file, signals the parent through a marker file and sleeps; the parent
then sends SIGKILL. A control run does the same through transformers' own (non-atomic)
``save_pretrained`` and shows the folder is destroyed there, so the test can tell the difference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer
from transformers import AutoModel, BertModel

import drone_hf
from drone_hf.hub import atomic_save as atomic_module
from drone_hf.hub.atomic_save import OLD_TAG, TMP_TAG

ROOT = Path(__file__).resolve().parents[2]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A saved DRONE checkpoint with the user's own files next to it (README, tokenizer, a subfolder)."""
    torch.manual_seed(0)
    model = drone_hf.compress(
        BertModel(bert_config()).eval(),
        drone_hf.DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tokenizer()),
        show_progress=False,
    )
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("# my model\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "eval.txt").write_text("accuracy 0.9\n")
    return folder


SAVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import safetensors.torch
    import transformers.modeling_utils as mu
    from transformers import AutoModel
    import drone_hf

    folder, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def stuck_writer(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:  # half a file, as when a process dies mid-write
            f.write(data[: len(data) // 2])
            f.flush()
        ready.write_text(str(filename))
        time.sleep(600)

    model = AutoModel.from_pretrained(folder)
    for p in model.parameters():  # a different checkpoint, so any byte written in place shows
        p.data.add_(1.0)
    mu.safe_save_file = stuck_writer
    save = type(model).save_pretrained
    if mode == "transformers":  # control: transformers' own save, without drone-hf's atomic wrapper
        save = save.__wrapped__
    save(model, folder)
    """
)


def kill_mid_save(folder: Path, tmp_path: Path, mode: str) -> str:
    """Run a save of ``folder`` in a subprocess, SIGKILL it once it is inside the weights write."""
    ready = tmp_path / f"ready-{mode}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(folder), str(ready), mode], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the saver exited early:\n{proc.stdout.read().decode()}")
            assert time.monotonic() < deadline, "the saver never reached the weights write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ready.read_text()


def test_killed_save_leaves_previous_checkpoint_intact(checkpoint: Path, tmp_path: Path) -> None:
    before = folder_bytes(checkpoint)
    reference = AutoModel.from_pretrained(checkpoint).state_dict()
    written = kill_mid_save(checkpoint, tmp_path, "drone")
    assert Path(written).parent != checkpoint  # the half file went into the temporary sibling
    assert folder_bytes(checkpoint) == before  # bit for bit, user files included
    reloaded = AutoModel.from_pretrained(checkpoint).state_dict()
    assert reloaded.keys() == reference.keys()
    assert all(torch.equal(reloaded[k], reference[k]) for k in reference)
    leftovers = list(checkpoint.parent.glob(f".{checkpoint.name}{TMP_TAG}*"))
    assert len(leftovers) == 1  # documented: the interrupted save's folder, removed by the next save
    AutoModel.from_pretrained(checkpoint).save_pretrained(checkpoint)
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}{TMP_TAG}*"))


def test_control_killed_non_atomic_save_corrupts_the_folder(checkpoint: Path, tmp_path: Path) -> None:
    """Without the atomic wrapper the same kill destroys the checkpoint: the kill test has teeth."""
    written = kill_mid_save(checkpoint, tmp_path, "transformers")
    assert Path(written).parent == checkpoint
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AutoModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_saving_into_an_existing_folder_keeps_user_files_and_drops_stale_weights(
    checkpoint: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exchange:  # systems without renameat2: the rename-aside fallback
        monkeypatch.setattr(atomic_module, "_exchange", lambda a, b: False)
    stale = checkpoint / "model-00001-of-00002.safetensors"
    stale.write_bytes(b"an old shard")
    user_files = {k: v for k, v in folder_bytes(checkpoint).items() if not k.startswith(("model", "config.json"))}
    model = AutoModel.from_pretrained(checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(checkpoint)
    after = folder_bytes(checkpoint)
    assert {k: after[k] for k in user_files} == user_files  # README, tokenizer, notes/, shim: unchanged
    assert not stale.exists()
    reloaded = AutoModel.from_pretrained(checkpoint)
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.drone-*"))


@pytest.mark.parametrize("swappable", [True, False], ids=["swapped", "file-by-file"])
def test_a_failing_save_changes_nothing(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, swappable: bool) -> None:
    import transformers.modeling_utils as mu

    if not swappable:  # a mount point: saved through a temporary folder inside it
        monkeypatch.setattr(atomic_module.os.path, "ismount", lambda p: Path(p) == checkpoint)
    before = folder_bytes(checkpoint)
    model = AutoModel.from_pretrained(checkpoint)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(checkpoint)
    assert folder_bytes(checkpoint) == before
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.drone-*"))
    assert not list(checkpoint.glob(f"{TMP_TAG}*"))


def test_save_into_a_new_nested_folder(checkpoint: Path, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(checkpoint)
    target = tmp_path / "a" / "b" / "new"
    model.save_pretrained(target)
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert oct((target).stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    reloaded = AutoModel.from_pretrained(target)
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_stale_temporaries_of_live_processes_are_left_alone(checkpoint: Path) -> None:
    live = checkpoint.parent / f".{checkpoint.name}{TMP_TAG}{os.getppid()}-beef"
    dead = checkpoint.parent / f".{checkpoint.name}{TMP_TAG}999999999-dead"
    live.mkdir()
    dead.mkdir()
    AutoModel.from_pretrained(checkpoint).save_pretrained(checkpoint)
    assert live.exists() and not dead.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_saving_the_working_directory_leaves_the_process_in_the_new_folder(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_pretrained(".") swaps the folder the process works in: the process must end up in the
    new folder at the same path, not in the deleted old one (getcwd failing, "." empty)."""
    monkeypatch.chdir(checkpoint / "notes")  # a subfolder of the saved folder, kept by the save
    model = AutoModel.from_pretrained(checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained("..")
    assert os.getcwd() == str(checkpoint / "notes")
    assert Path("eval.txt").read_text() == "accuracy 0.9\n"
    monkeypatch.chdir(checkpoint)
    model.save_pretrained(".")
    assert "model.safetensors" in os.listdir(".")
    assert _same_weights(AutoModel.from_pretrained("."), model)


def test_a_folder_that_cannot_be_swapped_is_saved_file_by_file(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point (a container volume) cannot be renamed: the save goes through a temporary folder
    inside it, keeps the user's files, drops stale weights and leaves the folder itself in place."""
    monkeypatch.setattr(atomic_module.os.path, "ismount", lambda p: Path(p) == checkpoint)
    inode = checkpoint.stat().st_ino
    (checkpoint / "model-00001-of-00002.safetensors").write_bytes(b"an old shard")
    user_files = {k: v for k, v in folder_bytes(checkpoint).items() if not k.startswith(("model", "config.json"))}
    model = AutoModel.from_pretrained(checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(checkpoint)
    assert checkpoint.stat().st_ino == inode
    after = folder_bytes(checkpoint)
    assert {k: after[k] for k in user_files} == user_files
    assert not (checkpoint / "model-00001-of-00002.safetensors").exists()
    assert not list(checkpoint.glob(f"{TMP_TAG}*")) and not list(checkpoint.parent.glob(f".{checkpoint.name}.drone-*"))
    assert _same_weights(AutoModel.from_pretrained(checkpoint), model)


def test_a_file_by_file_save_stopped_midway_leaves_a_folder_that_does_not_load_not_a_mix(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renaming entries into a mount point one by one is not atomic as a set: a kill after some shards
    left new shards beside old ones under a config that loaded them silently. The old config.json is
    moved aside before the first rename and the new one comes last, so such a folder has none and
    refuses to load; the next save (the stopped process gone) completes the folder and removes the
    moved-aside config."""
    monkeypatch.setattr(atomic_module.os.path, "ismount", lambda p: Path(p) == checkpoint)
    model = AutoModel.from_pretrained(checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(checkpoint, max_shard_size="100KB")  # several shards: a set to rename
    old_config = (checkpoint / "config.json").read_bytes()
    real_replace, calls = os.replace, []

    def stopped_after_two(src, dst):
        if Path(dst).parent == checkpoint and Path(src).parent.name.startswith(TMP_TAG):
            calls.append(Path(dst).name)
            if len(calls) > 2:
                raise KeyboardInterrupt  # the kill, after two new shards are in place
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", stopped_after_two)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(checkpoint, max_shard_size="100KB")
    monkeypatch.setattr(atomic_module.os, "replace", real_replace)
    assert len(calls) == 3 and "config.json" not in calls
    assert not (checkpoint / "config.json").exists()
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers: "Unrecognized model"
        AutoModel.from_pretrained(checkpoint)  # refuses, instead of loading two saves' shards
    aside = list(checkpoint.glob(f"{OLD_TAG}*-config.json"))
    assert [a.read_bytes() for a in aside] == [old_config]  # the previous config, kept for a hand repair
    dead = checkpoint / aside[0].name.replace(f"{OLD_TAG}{os.getpid()}-", f"{OLD_TAG}999999999-")
    aside[0].rename(dead)  # as a later process finds it: the stopped one is gone
    model.save_pretrained(checkpoint, max_shard_size="100KB")
    assert _same_weights(AutoModel.from_pretrained(checkpoint), model)
    assert not list(checkpoint.glob(f"{OLD_TAG}*")) and not list(checkpoint.glob(f"{TMP_TAG}*"))


def test_variants_live_side_by_side(checkpoint: Path) -> None:
    """save_pretrained(variant="fp16") into a folder with the default weights keeps them, as a plain
    transformers folder does; a later default save replaces only the default weights."""
    from drone_hf.hub import summarize_checkpoint

    model = AutoModel.from_pretrained(checkpoint)
    half = AutoModel.from_pretrained(checkpoint).to(torch.float16)
    half.save_pretrained(checkpoint, variant="fp16")
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "model.fp16.safetensors").is_file()
    assert _same_weights(AutoModel.from_pretrained(checkpoint, dtype=torch.float32), model)
    assert _same_weights(AutoModel.from_pretrained(checkpoint, variant="fp16", dtype=torch.float16), half)
    model.save_pretrained(checkpoint, max_shard_size="100KB")  # the default weights, now sharded
    assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "model.fp16.safetensors").is_file()
    assert (checkpoint / "model.safetensors.index.json").is_file()
    assert _same_weights(AutoModel.from_pretrained(checkpoint, dtype=torch.float32), model)
    only_variant = checkpoint.parent / "fp16-only"
    half.save_pretrained(only_variant, variant="fp16")
    summary = summarize_checkpoint(only_variant)
    assert summary.report.model_params == summarize_checkpoint(checkpoint).report.model_params
