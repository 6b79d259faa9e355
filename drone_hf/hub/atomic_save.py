"""Atomic ``save_pretrained``: a DRONE checkpoint folder is either the old one or the new one, never half.

Why. transformers writes a checkpoint file by file into the target folder: killed halfway (a
pre-empted job, Ctrl-C, out of disk), the folder holds a truncated ``model.safetensors`` next to an
old or new ``config.json``, and the previous good checkpoint is gone. A compression run can take
hours, so losing its output, or worse serving a half-written one, is not acceptable.

How. The save goes into a fresh temporary sibling ``.<name>.drone-tmp-<pid>-<random>`` (same parent,
so the same filesystem and renames are atomic). When it is complete:

1. files of the existing folder that the new save does not write and that are not stale weights
   (a ``README.md``, tokenizer files, anything of the user's) are hard-linked into the new folder
   (copied where links are not possible); the existing folder is only read;
2. the two folders are swapped with one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere,
   or on filesystems without it, the old folder is renamed aside and the new one into place (a
   crash between those two renames leaves the old checkpoint complete under
   ``.<name>.drone-old-<pid>-<random>``, never a mix);
3. the old folder, now under the temporary name, is deleted.

Semantics of saving into an existing folder (decided, and tested): every file the save writes is
replaced; weight files of the previous save that the new one does not write (``model.safetensors``,
shards ``model-0000i-of-0000n.safetensors``, their index, ``pytorch_model*.bin``) are dropped, as
transformers itself drops stale shards; everything else is kept unchanged. A kill at any point before
step 2 leaves the previous folder bit for bit as it was, plus a ``.<name>.drone-tmp-*`` folder that
the next save into the same place removes (when its process is gone).

Cost: the new checkpoint is written once (no copy of the weights); kept user files are hard links.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Top-level files of an existing folder that a new save supersedes even when it does not write
#: them itself: weights and weight indexes of any layout (single file or shards, safetensors or bin).
STALE_WEIGHTS = re.compile(
    r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$"
)
TMP_TAG = ".drone-tmp-"
OLD_TAG = ".drone-old-"

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where the system cannot."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Delete ``.<name>.drone-tmp-<pid>-*`` siblings left by interrupted saves whose process is gone."""
    prefix = f".{target.name}{TMP_TAG}"
    for sibling in target.parent.glob(prefix + "*"):
        pid = sibling.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over_user_files(old: Path, new: Path) -> None:
    """Bring into ``new`` what ``old`` holds that the new save neither wrote nor supersedes."""
    for entry in old.iterdir():
        dst = new / entry.name
        if dst.exists() or dst.is_symlink() or STALE_WEIGHTS.match(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))


def atomic_save(target: str | os.PathLike, write: Callable[[Path], Any]) -> Any:
    """Run ``write(folder)`` on a temporary sibling of ``target`` and swap it into place.

    Args:
        target: the checkpoint folder the user asked for (created if missing).
        write: writes the complete checkpoint into the folder it is given; its return value is
            passed through.

    Raises:
        ValueError: ``target`` is an existing file (the folder would replace it).
        Whatever ``write`` raises; the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(os.path.realpath(os.fspath(target)))  # a symlinked folder: save where it points
    if target.is_file():
        raise ValueError(f"save_pretrained got {str(target)!r}, which is a file; pass a folder path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.parent / f".{target.name}{TMP_TAG}{token}"
    tmp.mkdir()
    try:
        result = write(tmp)
        if target.is_dir():
            _carry_over_user_files(target, tmp)
            os.chmod(tmp, target.stat().st_mode & 0o7777)
            if _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
                return result
            aside = target.parent / f".{target.name}{OLD_TAG}{token}"
            target.rename(aside)
            try:
                tmp.rename(target)
            except BaseException:
                aside.rename(target)  # put the previous checkpoint back where it was
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.chmod(tmp, 0o777 & ~_umask())
            tmp.rename(target)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
