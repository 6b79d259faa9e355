"""Resumable calibration: a folder that keeps finished statistics so a killed run picks up where it stopped.

``DroneConfig(calibration_cache="folder")`` turns it on. What is kept:

* one-shot mode: a snapshot of every layer's running accumulators (Gram, token count, token sum)
  and how many batches they cover, written every :data:`SNAPSHOT_SECONDS` and after the last batch.
  A resumed run loads the snapshot and feeds only the batches it does not cover. Float64 sums are
  restored exactly and the remaining batches are added in the same order, so the result is
  bit-identical to an uninterrupted run.
* the method's own pass (loss-aware DRONE's output-gradient Grams, FWSVD's row Fisher, ASVD's
  mean ``|x|``): its running sums, on the same schedule, in an entry per pass (the loss-aware one
  named after ``kfac_fisher`` and, for the true Fisher, the seed of its label draws). One loop
  serves every pass: :mod:`~drone_hf.calibration.resumable`.
* ``sequential=True``: each block's statistics once the block is calibrated (``block-00003``), and
  the outputs of the latest finished block (what the next block receives). A resumed run re-solves
  the finished blocks from their statistics (no forward pass through them), installs their factors,
  and continues with the next block on the stored outputs.

The folder is bound to one run by a manifest of fingerprints: the model (class and architecture
config), its weights (sha256 over every parameter and buffer), the calibration batches (sha256 over
the token ids and masks, which covers dataset, tokenizer, num_samples, max_length, batch_size and
seed), the observed layers and statistics (widths, input or output Gram), the mode and, for
sequential runs, the solver settings and ranks. Any difference is an error naming what changed:
drone-hf never reuses statistics of another run and never deletes a folder it was pointed at (it
may hold another long calibration). Use a new folder or delete the old one.

Every entry is written to a temporary file in the folder and renamed into place (atomic on POSIX),
so a kill mid-write leaves either the old entry or the new one. Entries carry a sha256 of their
payload; a damaged one is reported, ignored and recomputed.

Several processes (``torchrun``): each process keeps its own entries (its shard differs), and the
processes agree on the resume point (the smallest any of them reached) before going on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.logging import get_logger
from .distributed import world

logger = get_logger(__name__)

#: Version of the cache layout; a folder written by another layout is refused like a changed model.
CACHE_FORMAT = 1

#: One-shot mode writes its running statistics at most this often (seconds), and after the last batch.
#: Writing costs about the size of all accumulators; this bounds the work lost to a kill.
SNAPSHOT_SECONDS = 60.0

_MAGIC = b"DRONE-HF-CALIBRATION-CACHE 1\n"
_MANIFEST = "manifest.json"
#: What ``_write`` leaves behind when killed mid-write: ``.<manifest.json|entry.pt>.<random>.tmp``.
_OWN_TEMPORARY = re.compile(rf"^\.(?:{re.escape(_MANIFEST)}|[^/]+\.pt)\.[^.]+\.tmp$")
#: The per-process sub-folders of a cache written by several processes.
_PROCESS_FOLDER = re.compile(r"^rank\d+-of-\d+$")

#: What each fingerprint covers, for error messages.
_WHAT = {
    "format": "the cache layout (written by another drone-hf version)",
    "model": "the model architecture (class or config)",
    "weights": "the model weights",
    # which texts calibrate also depends on whether some are held out for the evaluation loss
    # (allocation='greedy', max_loss, target_speedup hold out eval_samples texts; uniform holds none)
    "data": "the calibration data or its tokenization (dataset, tokenizer, num_samples, max_length, batch_size, seed, "
            "or the texts held out for evaluation: eval_samples, and allocation='uniform' against greedy / max_loss / "
            "target_speedup, which hold texts out)",
    "statistics": "the statistics-relevant settings (target layers, method, damp, mode)",
    "process": "the process layout (rank / world size of torch.distributed)",
    "ranks": "the ranks of the sequential pass (budget, allocation or planned ranks)",
    "pruned": "the MLP widths of the sequential pass (prune_mlp's planned widths)",
}


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.device.type == "meta":
        return b"meta"
    return t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order; offloaded
    tensors are read from their accelerate offload store."""

    from .offload import is_offloaded

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        store = module._hf_hook.weights_map if is_offloaded(module) else {}
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None:
                continue
            if t.device.type == "meta" and name in store:  # accelerate offload: the real values are in its store
                t = store[name]
            tensors.setdefault(f"{prefix}.{name}" if prefix else name, t)

    def chunks():
        for name, t in sorted(tensors.items()):
            yield f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
            yield _tensor_bytes(t)

    return _sha(chunks())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model class and its config (without paths and records that do not change it)."""
    cfg = getattr(model, "config", None)
    d = dict(cfg.to_dict()) if cfg is not None and hasattr(cfg, "to_dict") else {}
    for key in ("_name_or_path", "quantization_config", "transformers_version", "_commit_hash"):
        d.pop(key, None)
    return _sha([type(model).__qualname__.encode(), json.dumps(d, sort_keys=True, default=str).encode()])


def data_fingerprint(batches: list[dict[str, torch.Tensor]]) -> str:
    """sha256 over the calibration batches (every tensor, in key order): the exact tokens fed."""

    def chunks():
        for i, batch in enumerate(batches):
            for key in sorted(batch):
                t = batch[key]
                yield f"{i}|{key}|{t.dtype}|{tuple(t.shape)}|".encode()
                yield _tensor_bytes(t)

    return _sha(chunks())


def value_fingerprint(value: Any) -> str:
    """sha256 of a JSON-able description."""
    return _sha([json.dumps(value, sort_keys=True, default=str).encode()])


class CalibrationCache:
    """One calibration run's folder of finished statistics (see the module docstring).

    Args:
        folder: created if missing.
        fingerprints: component name (see ``_WHAT``) -> hex digest; checked against the folder's
            manifest, or written into a new one.

    Raises:
        ValueError: the folder belongs to another run (the message names what changed and the fix).
    """

    def __init__(self, folder: str | os.PathLike, fingerprints: dict[str, str]) -> None:
        self.root = Path(folder)
        self.root.mkdir(parents=True, exist_ok=True)
        rank, size = world()
        fingerprints = {"format": str(CACHE_FORMAT), "process": f"{rank}/{size}", **fingerprints}
        # each process keeps its own entries: its shard of the texts differs
        self.folder = self.root if size == 1 else self.root / f"rank{rank}-of-{size}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0  #: entries loaded (tests and logs use it to show what was skipped)
        self.manifest = self.folder / _MANIFEST
        self._fingerprints: dict[str, str] = {}
        own_temporaries = [p for p in self.folder.iterdir() if _OWN_TEMPORARY.match(p.name)]
        if self.manifest.exists():
            try:
                self._fingerprints = json.loads(self.manifest.read_text())["fingerprints"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"calibration_cache {os.fspath(self.root)!r} has an unreadable {_MANIFEST} ({e}); it was not "
                    "written by drone-hf or is damaged. Delete the folder or give another calibration_cache."
                ) from e
        elif any(not (_OWN_TEMPORARY.match(p.name) or (p.is_dir() and _PROCESS_FOLDER.match(p.name)))
                 for p in self.folder.iterdir()):
            raise ValueError(
                f"calibration_cache {os.fspath(self.root)!r} is not empty and is not a drone-hf calibration cache; "
                "give an empty or new folder (drone-hf never writes into or deletes other files)."
            )
        for leftover in own_temporaries:  # left by a kill mid-write; only once the folder is known to be ours
            leftover.unlink(missing_ok=True)
        self.bind(fingerprints)

    def bind(self, fingerprints: dict[str, str]) -> None:
        """Check ``fingerprints`` against the manifest; record the ones it does not hold yet.

        Raises:
            ValueError: a component differs from the one recorded: the cache is from another run.
        """
        changed = [k for k, v in fingerprints.items() if k in self._fingerprints and self._fingerprints[k] != v]
        if changed:
            what = "; ".join(_WHAT.get(k, k) for k in changed)
            raise ValueError(
                f"calibration_cache {os.fspath(self.root)!r} holds statistics of a different calibration run: "
                f"changed since it was written: {what}. drone-hf does not reuse or delete it; give a new "
                "calibration_cache folder (or delete this one to start over)."
            )
        new = {k: v for k, v in fingerprints.items() if k not in self._fingerprints}
        if new or not self.manifest.exists():
            self._fingerprints.update(new)
            text = json.dumps({"fingerprints": self._fingerprints}, indent=1, sort_keys=True)
            self._write(self.manifest, text.encode())

    # --- entries ---------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def _write(self, path: Path, data: bytes) -> None:
        """Atomic: a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def save(self, name: str, obj: Any) -> None:
        """Write entry ``name`` (tensors, numbers, strings, lists and dicts of them), checksummed."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = buf.getvalue()
        self._write(self._path(name), _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)

    def load(self, name: str) -> Any | None:
        """Entry ``name``, or ``None`` when it is missing or damaged (a damaged one is logged and will be
        recomputed)."""
        path = self._path(name)
        if not path.exists():
            return None
        raw = path.read_bytes()
        head = len(_MAGIC)
        digest, payload = raw[head:head + 64], raw[head + 65:]
        if not raw.startswith(_MAGIC) or hashlib.sha256(payload).hexdigest().encode() != digest:
            logger.warning(f"Calibration cache entry {path} is damaged (checksum mismatch); recomputing it.")
            return None
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        self.hits += 1
        return obj

    def has(self, name: str) -> bool:
        return self._path(name).exists()

    def remove(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass


def open_cache(
    folder: str | os.PathLike | None,
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    statistics: dict[str, Any],
) -> CalibrationCache | None:
    """The cache for this run, or ``None`` when ``folder`` is ``None``.

    Args:
        model: the dense model, before anything is swapped (its weights are fingerprinted).
        batches: this process's calibration batches.
        statistics: a JSON-able description of everything else the statistics depend on (observed
            layers and widths, which layers use output Grams, mode, solver settings).
    """
    if folder is None:
        return None
    return CalibrationCache(
        folder,
        {
            "model": model_fingerprint(model),
            "weights": weights_fingerprint(model),
            "data": data_fingerprint(batches),
            "statistics": value_fingerprint(statistics),
        },
    )


def observer_state(obs) -> dict[str, Any]:
    """A :class:`~drone_hf.calibration.observer.GramObserver`'s accumulators, for an entry.

    The float32 partial sum is stored as it is, not flushed: a resumed run then adds the remaining
    batches in exactly the order an uninterrupted run would, and ends bit-identical to it."""
    return obs.state()


def restore_observer(obs, state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put an entry's accumulators back into ``obs`` (exactly, in the precision written)."""
    obs.load_state(state, device)
