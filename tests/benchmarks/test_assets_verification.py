"""The benchmark assets fetch step refuses files that do not match their pinned SHA-256 (offline test)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import assets  # noqa: E402

NAME = "vaderSentiment-3.3.2.tar.gz"


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "DOWNLOADS", tmp_path)
    monkeypatch.setitem(assets.SHA256, NAME, hashlib.sha256(b"the real archive").hexdigest())
    return tmp_path


def fake_pip(content: bytes, calls: list):
    def run(cmd, check):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], NAME).write_bytes(content)
        return subprocess.CompletedProcess(cmd, 0)

    return run


def test_a_good_cached_file_is_reused_without_pip(downloads, monkeypatch):
    (downloads / NAME).write_bytes(b"the real archive")
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"unused", calls))
    assert assets._download("vaderSentiment==3.3.2", sdist=True) == downloads / NAME and calls == []


def test_a_corrupt_cached_file_is_fetched_again(downloads, monkeypatch):
    (downloads / NAME).write_bytes(b"truncated")
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"the real archive", calls))
    path = assets._download("vaderSentiment==3.3.2", sdist=True)
    assert path.read_bytes() == b"the real archive" and len(calls) == 1
    assert "--no-binary" in calls[0] and "--no-deps" in calls[0]


def test_a_download_with_the_wrong_hash_is_refused_and_deleted(downloads, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"something else", []))
    with pytest.raises(RuntimeError, match="not the pinned .*update SHA256 in benchmarks/assets.py"):
        assets._download("vaderSentiment==3.3.2", sdist=True)
    assert not (downloads / NAME).exists()
