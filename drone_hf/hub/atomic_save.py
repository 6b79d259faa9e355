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

Weights of another ``variant=`` (``model.fp16.safetensors`` next to ``model.safetensors``) are kept:
only the variants the new save writes are superseded, as in a plain transformers folder.

A folder that cannot be swapped (a mount point such as a container volume, whose rename fails with
EBUSY, or one whose parent this process cannot write) is saved file by file instead: written complete
into ``<folder>/.drone-tmp-<pid>-<random>``, then each entry renamed into place, ``config.json`` last.
Each file is whole at every moment, the set of them is not; while it is not, the folder has no
``config.json`` (the old one is moved aside first), so a kill then leaves a folder that refuses to
load rather than one that loads a mix of two saves (``_save_file_by_file``).

A process working inside the saved folder (``save_pretrained(".")``) is moved to the new folder at the
same path; the swap would otherwise leave it in the deleted old one.

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

#: Weight files and weight indexes of any layout (single file or shards, safetensors or bin), with
#: transformers' ``variant=`` naming (``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``,
#: ``model.safetensors.index.fp16.json``); group ``variant`` is empty for the default weights.
WEIGHT_FILE = re.compile(
    r"^(?:model|pytorch_model)(?:\.(?P<variant>[^.]+?))?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)$"
    r"|^(?:model|pytorch_model)\.(?:safetensors|bin)\.index(?:\.(?P<index_variant>[^.]+))?\.json$"
)


def weight_variant(name: str) -> str | None:
    """The variant of a top-level weight file's name (``""`` for the default weights), ``None`` for any
    other file."""
    match = WEIGHT_FILE.match(name)
    if match is None:
        return None
    return match["variant"] or match["index_variant"] or ""


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
    """Delete ``.<name>.drone-tmp-<pid>-*`` siblings (and, inside a folder saved file by file,
    ``.drone-tmp-<pid>-*`` folders and ``.drone-old-<pid>-*-config.json`` files) left by interrupted
    saves whose process is gone."""
    places = [(target.parent, f".{target.name}{TMP_TAG}")]
    if target.is_dir():
        places += [(target, TMP_TAG), (target, OLD_TAG)]
    for folder, prefix in places:
        for leftover in folder.glob(prefix + "*"):
            pid = leftover.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _written_variants(new: Path) -> set[str]:
    """The weight variants a save wrote: an existing folder's weights of those variants are stale (as
    transformers drops its own stale shards), other variants' weights are kept beside them."""
    return {v for entry in new.iterdir() if (v := weight_variant(entry.name)) is not None}


def _supersedes(name: str, variants: set[str]) -> bool:
    return weight_variant(name) in variants


def _carry_over_user_files(old: Path, new: Path) -> None:
    """Bring into ``new`` what ``old`` holds that the new save neither wrote nor supersedes."""
    variants = _written_variants(new)
    for entry in old.iterdir():
        dst = new / entry.name
        if (dst.exists() or dst.is_symlink() or _supersedes(entry.name, variants)
                or entry.name.startswith((TMP_TAG, OLD_TAG))):  # an interrupted file-by-file save's leftovers
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
    if target.is_dir() and not _swappable(target):
        return _save_file_by_file(target, write, token)
    cwd = _working_directory()
    try:
        return _save_and_swap(target, write, token)
    finally:
        _return_to(cwd, target)


def _swappable(target: Path) -> bool:
    """Whether the folder itself can be swapped: not a mount point (a container volume, whose
    rename fails with EBUSY), and in a parent this process may write its temporary sibling into."""
    return not os.path.ismount(target) and os.access(target.parent, os.W_OK | os.X_OK)


def _working_directory() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # already in a deleted folder
        return None


def _return_to(cwd: str | None, target: Path) -> None:
    """A process working inside the saved folder was left in the old folder's deleted inode by the
    swap (``save_pretrained(".")``: getcwd failing, relative paths finding nothing): re-enter the same
    path, now the new folder. Other processes' shells in that folder need a ``cd .`` of their own."""
    if cwd is None:
        return
    path = Path(cwd)
    if path != target and target not in path.parents:
        return
    try:
        os.chdir(cwd)
    except OSError:  # a subfolder the new checkpoint does not have
        os.chdir(target)


def _save_and_swap(target: Path, write: Callable[[Path], Any], token: str) -> Any:
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
            os.chmod(tmp, 0o777 & ~current_umask())
            tmp.rename(target)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_file_by_file(target: Path, write: Callable[[Path], Any], token: str) -> Any:
    """Save into a folder that cannot be swapped (a mount point, a read-only parent): the checkpoint
    is written complete into a temporary folder inside ``target``, then each entry is renamed into
    place (each rename atomic, the set of them not) and the stale weights are removed. A kill before
    the renames leaves the previous checkpoint untouched. During them the folder has no
    ``config.json``: the previous one is moved aside first (``.drone-old-<pid>-<random>-config.json``,
    removed by the save's end or by the next save once this process is gone) and the new one comes
    last, so a kill there leaves a folder that does not load (transformers: no config.json) instead of
    one that loads old shards beside new ones, or new weights under the old config."""
    tmp = target / f"{TMP_TAG}{token}"
    tmp.mkdir()
    aside = target / f"{OLD_TAG}{token}-config.json"
    try:
        result = write(tmp)
        variants = _written_variants(tmp)
        stale = [e for e in target.iterdir() if _supersedes(e.name, variants) and not (tmp / e.name).exists()]
        if (tmp / "config.json").is_file() and (target / "config.json").is_file():
            os.replace(target / "config.json", aside)
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == "config.json"):  # config.json last
            dst = target / entry.name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(entry, dst)
        for entry in stale:  # old shards / another layout's weights, once the new ones are in place
            entry.unlink(missing_ok=True)
        aside.unlink(missing_ok=True)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process umask (read by setting and restoring it: os has no getter), which the mode of a
    folder from ``tempfile.mkdtemp`` (always 0700) must be brought back to before it is renamed into
    place, so a saved checkpoint can be read by whoever a plain ``mkdir`` would let read it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
