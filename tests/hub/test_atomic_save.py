"""Saves of DRONE models are atomic: a killed save leaves the previous checkpoint intact, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from drone_hf.hub import atomic
from drone_hf.hub.atomic import atomic_folder

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture
def saved(compressed, tmp_path):
    """A DRONE checkpoint on disk with a user file next to it, and the model that wrote it."""
    model, _ = compressed("bert")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    (ckpt / "README.md").write_text("my notes\n")
    return model, ckpt


def test_save_keeps_user_files_replaces_weights_and_leaves_no_staging(saved):
    model, ckpt = saved
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")  # as if an older sharded save
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.up.weight.mul_(2.0)
    model.save_pretrained(ckpt)
    files = snapshot(ckpt)
    assert files["README.md"] == b"my notes\n"  # carried over, as a plain save_pretrained keeps it
    assert "model-00001-of-00002.safetensors" not in files  # stale weights never survive a new save
    assert leftovers(ckpt) == []
    reloaded = AutoModel.from_pretrained(ckpt)
    assert torch.equal(
        reloaded.encoder.layer[0].attention.self.query.up.weight, model.encoder.layer[0].attention.self.query.up.weight
    )


def test_failed_save_leaves_the_previous_checkpoint_untouched(saved, monkeypatch):
    model, ckpt = saved
    before = snapshot(ckpt)
    import transformers.modeling_utils as mu

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(ckpt)
    assert snapshot(ckpt) == before and leftovers(ckpt) == []


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    import transformers.modeling_utils as mu
    from transformers import AutoModel
    import drone_hf

    model = AutoModel.from_pretrained({ckpt!r})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a different model, so a half-written save would show

    real = mu.safe_save_file

    def stall(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the weights are on disk (in the staging folder) ...
        print("WRITTEN", filename, flush=True)
        time.sleep(600)  # ... and the process is killed before the config is marked and swapped in

    mu.safe_save_file = stall
    model.save_pretrained({ckpt!r})
    """
)


def test_killed_save_leaves_the_previous_checkpoint_intact(saved, tmp_path):
    model, ckpt = saved
    before = snapshot(ckpt)
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE.format(tests=str(TESTS), ckpt=str(ckpt)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # blocks until the weights are written, then it sleeps
        assert line.startswith("WRITTEN"), line
        written = Path(line.split()[1])
        assert written.parent != ckpt and written.parent.name.startswith(f".{ckpt.name}.drone-save-")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(ckpt) == before  # every byte of the previous checkpoint is still there
    reloaded = AutoModel.from_pretrained(ckpt)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert written.parent.exists()  # the dead process's staging folder ...
    model.save_pretrained(ckpt)  # ... is cleaned up by the next save into the same path
    assert leftovers(ckpt) == [] and snapshot(ckpt)["README.md"] == b"my notes\n"


def test_interrupted_fallback_swap_is_recovered(tmp_path, monkeypatch):
    """Without an atomic exchange the target is renamed aside first; a crash right then is undone by
    the next save (the previous checkpoint comes back before anything else happens)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("old")
    aside = tmp_path / f".ckpt{atomic.OLD_TAG}999999"  # a pid that is not running
    os.rename(target, aside)
    atomic.recover(target)
    assert (target / "config.json").read_text() == "old" and not aside.exists()

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the portable two-rename path
    with atomic_folder(target) as staging:
        (staging / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new" and leftovers(target) == []


def test_atomic_folder_refuses_a_file_path(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"user data")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with atomic_folder(path):
            pass
    assert path.read_bytes() == b"user data"


def test_exchange_is_used_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system/filesystem")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
