"""Atomic checkpoint folders: a save either lands whole or leaves the previous checkpoint untouched.

``save_pretrained`` writes weights and config into the target folder file by file; a crash (out of
memory, a killed job, a full disk) half way leaves a folder whose config and weights disagree, and
overwriting the only good copy of an hours-long compression run is exactly when that hurts. DRONE
models therefore save through :func:`atomic_folder`:

1. everything is written into a hidden staging folder next to the target (same filesystem, so the
   final step is a rename, not a copy): ``.<name>.drone-save-<pid>``;
2. files of the previous checkpoint that the new save did not write are carried over (hard links,
   so nothing is copied; nothing writes into them afterwards), except the previous weight files
   (the new save is the model): a tokenizer, a README or trainer state saved next to the model
   survive as they do with a plain save;
3. the staging folder replaces the target in one step: an atomic exchange of the two directory
   entries (Linux ``renameat2(RENAME_EXCHANGE)``), then the old tree is deleted. Where the exchange
   is unavailable, the target is renamed aside and the staging folder renamed in; a crash between
   those two renames leaves the previous checkpoint whole under ``.<name>.drone-old-<pid>``, and the
   next save into the same path puts it back before doing anything else.

A process killed at any point before step 3 leaves the target exactly as it was; leftover staging
folders of dead processes are removed by the next save into the same path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..utils.logging import get_logger

logger = get_logger(__name__)

STAGING_TAG = ".drone-save-"
OLD_TAG = ".drone-old-"
#: Weight files (single, sharded, their index): the new save is the model, so none of the previous
#: checkpoint's are carried over (``save_pretrained`` deletes stale shards; a stale single file or
#: index next to new weights would be loaded instead of them).
_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(target: Path, tag: str) -> list[tuple[Path, int]]:
    prefix = f".{target.name}{tag}"
    out = []
    if target.parent.is_dir():
        for p in target.parent.iterdir():
            if p.name.startswith(prefix) and p.name[len(prefix) :].isdigit():
                out.append((p, int(p.name[len(prefix) :])))
    return out


def recover(target: Path) -> None:
    """Undo what a killed save left behind at ``target``: put a previous checkpoint that was renamed
    aside back in place (when the target is missing), and remove staging folders of dead processes."""
    for old, pid in _siblings(target, OLD_TAG):
        if _pid_alive(pid):
            continue
        if not target.exists():
            os.rename(old, target)
            logger.warning(f"Restored the previous checkpoint at {target} (a save into it was interrupted).")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for staging, pid in _siblings(target, STAGING_TAG):
        if not _pid_alive(pid):
            shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not hasattr(os, "fspath") or os.name != "posix":
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy, across devices) every entry of ``old`` that ``new`` lacks, except weights."""
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or _WEIGHTS.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _install(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder; save_pretrained needs a folder path.")
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous checkpoint
        return
    aside = target.with_name(f".{target.name}{OLD_TAG}{os.getpid()}")
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder to write a checkpoint into; on success it replaces ``target`` whole.

    On an exception the staging folder is removed and ``target`` is left exactly as it was.
    """
    target = Path(os.path.abspath(os.fspath(target)))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder; save_pretrained needs a folder path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = target.with_name(f".{target.name}{STAGING_TAG}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.is_dir():
            _carry_over(target, staging)
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
