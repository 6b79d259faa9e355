"""What a saved DRONE checkpoint holds, read from ``config.json`` and the safetensors headers.

No weight is loaded, so inspecting a multi-gigabyte LLM checkpoint costs a few kilobytes of reading;
the shapes come from the safetensors headers (the first bytes of each file). Only the layer order
needs the architecture: neither file keeps the model's module order (``config.json`` is written with
sorted keys, safetensors sorts its tensors by name), so the recorded class is built empty on the
``meta`` device (no memory, no weights) to list the layers as the model runs them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import _is_int
from ..report import AttentionRow, CompressionReport, LayerRow, PrunedRow
from .checkpoint import CHECKPOINT_KEY, is_drone_config_dict, is_marked, unmark_config_dict

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


_AGAIN = "download or save it again"


def _read_json(path: Path, what: str = "object") -> Any:
    """A JSON file that must hold an object, refused with its name when it is not valid JSON (a
    truncated copy) or holds something else (an edited file)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(f"{path} is not valid JSON ({detail}): it is truncated or was edited; {_AGAIN}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an {what}: it was edited or is damaged; "
                         f"{_AGAIN}")
    return value


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's header.

    Raises:
        ValueError: the file is not a safetensors file, its header is truncated or malformed, or its
            tensor data is shorter (or longer) than the header describes (a truncated copy whose header
            survived); each message names the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header length {n} is implausible)")
        text = f.read(n)
    if len(text) != n:
        raise ValueError(f"{path} is truncated: its header is {n} bytes but the file holds {len(text)} after the "
                         f"length; {_AGAIN}")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} has a header that is not valid JSON: the file is corrupt; {_AGAIN}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a header that is a JSON {type(header).__name__}, not an object: the file is "
                         f"corrupt; {_AGAIN}")
    header.pop("__metadata__", None)
    end = 0
    for name, meta in header.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
              and isinstance(meta.get("shape"), list) and all(_is_int(d) and d >= 0 for d in meta["shape"])
              and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
              and all(_is_int(o) and o >= 0 for o in meta["data_offsets"]))
        if not ok:
            raise ValueError(f"{path}: tensor {name!r} has no valid dtype / shape / data_offsets in the header: the "
                             f"file is corrupt; {_AGAIN}")
        end = max(end, meta["data_offsets"][1])
    data = size - 8 - n
    if data != end:
        how = "truncated" if data < end else "longer than its header describes"
        raise ValueError(f"{path} is {how}: its header describes {end:,} bytes of tensor data but the file holds "
                         f"{data:,}; {_AGAIN}")
    return header


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint's weights: the default ones, else those of the only
    ``variant=`` saved there (``model.fp16.safetensors``, its shards and index)."""
    from .atomic_save import weight_variant

    variants = sorted({v for p in folder.iterdir() if p.name.endswith((".safetensors", ".json"))
                       and (v := weight_variant(p.name)) is not None})
    variant = "" if "" in variants or not variants else variants[0]
    if len(variants) > 1 and variant != "":
        raise ValueError(
            f"{folder} holds weights of several variants ({', '.join(variants)}) and no default "
            "model.safetensors; inspect one variant's copy in a folder of its own"
        )
    index = folder / ("model.safetensors.index.json" if not variant else f"model.safetensors.index.{variant}.json")
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f"{index} has no weight_map (tensor name -> shard file): it was edited or is damaged; "
                             f"{_AGAIN}")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{index} names {', '.join(missing)}, missing from {folder}: the checkpoint was copied "
                             f"or downloaded incompletely; {_AGAIN}")
        return [folder / n for n in names]
    single = folder / ("model.safetensors" if not variant else f"model.{variant}.safetensors")
    if single.is_file():
        return [single]
    raise ValueError(
        f"{folder} has no model.safetensors (or model.safetensors.index.json): not a checkpoint saved by "
        "save_pretrained, or its weights are missing"
    )


@dataclass
class CheckpointSummary:
    """A DRONE checkpoint at a glance; ``str()`` is the text ``drone-hf inspect`` prints.

    Attributes:
        folder: the checkpoint folder.
        marked: whether ``config.json`` carries the drone-hf marker (``model_type: drone``), i.e.
            plain transformers refuses it; older checkpoints carry only ``quantization_config``.
        base_model_type, architecture: the underlying model (``bert``, ``BertModel``).
        info: the ``drone_checkpoint`` record (base model id, drone-hf version...), empty if absent.
        quantization: the ``quantization_config`` as saved (settings, ranks, calibration summary).
        report: per-layer rows (shapes from the headers, ranks, calibration errors) and parameter totals.
        dtypes: tensor dtypes found in the weights.
        files: size in bytes of each file in the folder.
    """

    folder: Path
    marked: bool
    base_model_type: str | None
    architecture: str | None
    info: dict[str, Any]
    quantization: dict[str, Any]
    report: CompressionReport
    dtypes: list[str]
    files: dict[str, int] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        return sum(size for name, size in self.files.items() if name.endswith(".safetensors"))

    def to_dict(self) -> dict[str, Any]:
        rep = self.report
        return {
            "folder": str(self.folder),
            "marked": self.marked,
            "base_model_type": self.base_model_type,
            "architecture": self.architecture,
            "drone_checkpoint": self.info,
            "quantization_config": self.quantization,
            "layers": rep.to_dicts(),
            "dense_targeted_params": rep.dense_targeted_params,
            "factored_targeted_params": rep.factored_targeted_params,
            "targeted_param_ratio": rep.targeted_param_ratio,
            "dense_model_params": rep.dense_model_params,
            "model_params": rep.model_params,
            "model_param_ratio": rep.model_param_ratio,
            "dtypes": self.dtypes,
            "weight_bytes": self.weight_bytes,
            "files": self.files,
        }

    def __str__(self) -> str:
        q = self.quantization
        calib = q.get("calibration") or {}
        settings = {k: q.get(k) for k in ("method", "param_ratio", "target_speedup", "max_loss", "allocation", "damp",
                                          "target_modules", "modules_to_not_convert", "num_samples", "max_length",
                                          "seed") if q.get(k) is not None}
        lines = [
            f"DRONE checkpoint: {self.folder}",
            f"  model:       {self.architecture or '?'} (model_type {self.base_model_type or '?'})"
            + (f", compressed from {self.info['base_model']}" if self.info.get("base_model") else ""),
            f"  format:      quantization_config format {q.get('format_version')}, "
            + (f"marker format {self.info.get('format_version')} "
               f"(written by drone-hf {self.info.get('drone_hf_version')})"
               if self.marked else "no drone-hf marker (older checkpoint: loads only with `import drone_hf`)"),
            "  settings:    " + ", ".join(f"{k}={v}" for k, v in settings.items()),
            f"  calibration: {calib.get('num_texts', '?')} texts from {calib.get('dataset', '?')}, "
            f"{calib.get('num_tokens', '?')} tokens, max_length {calib.get('max_length', '?')}",
            f"  weights:     {self.weight_bytes / 1e6:.1f} MB on disk ({', '.join(self.dtypes)})",
        ]
        attention = q.get("attention_ranks") or {}
        if attention:
            per_head = sorted(set(attention.values()))
            lines.append(f"  attention:   query-key compressed in {len(attention)} attention modules, per-head rank "
                         f"{', '.join(map(str, per_head))}")
        pruned = self.report.pruned_rows
        if pruned:
            lines.append(f"  mlp widths:  {len(pruned)} MLP blocks width-pruned: "
                         + ", ".join(f"{r.name} {r.width}/{r.original}" for r in pruned))
        lines += ["", str(self.report)]
        return "\n".join(lines)


def summarize_checkpoint(folder: str | Path) -> CheckpointSummary:
    """Read a saved DRONE checkpoint's ranks, shapes, sizes and settings without loading it.

    Raises:
        ValueError: not a folder, no ``config.json``, not a DRONE checkpoint, or weights that do not
            match the recorded ranks (each message says what is wrong).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the folder a DRONE checkpoint was saved to")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: not a checkpoint saved by save_pretrained")
    raw = _read_json(config_file)
    if not is_drone_config_dict(raw):
        raise ValueError(
            f"{folder} is a dense checkpoint (model_type {raw.get('model_type')!r}, no DRONE quantization_config); "
            f"compress it first: `drone-hf compress {folder} --output DIR`"
        )
    marked = is_marked(raw)
    base = unmark_config_dict(raw)
    q = base.get("quantization_config") or {}
    for key in ("ranks", "attention_ranks", "relative_errors", "attention_errors", "calibration", "mlp_widths"):
        if q.get(key) is not None and not isinstance(q[key], dict):
            raise ValueError(f"{config_file}: quantization_config.{key} is a {type(q[key]).__name__}, not an object"
                             f"{' of layer name -> value' if key != 'calibration' else ''}: it was edited or is "
                             f"damaged; restore config.json from the original save")
    for key in ("ranks", "attention_ranks"):
        for name, rank in (q.get(key) or {}).items():
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"{config_file}: quantization_config.{key}[{name!r}] is {rank!r}, not a positive "
                                 "integer rank: it was edited or is damaged; restore config.json from the original "
                                 "save")
    ranks = q.get("ranks") or {}
    if not ranks and not q.get("attention_ranks") and not q.get("mlp_widths"):
        raise ValueError(f"{config_file} records no ranks under quantization_config: it was edited or is damaged")
    errors = q.get("relative_errors") or {}

    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    for path in _weight_files(folder):
        for name, meta in read_safetensors_header(path).items():
            shapes[name] = meta["shape"]
            dtypes.add(meta["dtype"])
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n

    rows = []
    order = _layer_order(base, [*ranks, *(q.get("attention_ranks") or {})])
    for name, rank in sorted(ranks.items(), key=lambda kv: order(kv[0])):
        down = _find(shapes, name + ".down.weight")
        up = _find(shapes, name + ".up.weight")
        if down is None or up is None:
            raise ValueError(
                f"{folder}: ranks records {name!r} but the weights have no {name}.down/.up factors; the weights and "
                "config.json do not belong together"
            )
        (k, in_f), (out_f, k2) = down, up
        if k != rank or k2 != rank:
            raise ValueError(f"{folder}: {name!r} is recorded with rank {rank} but its factors have rank {k}/{k2}")
        rows.append(LayerRow(name, out_f, in_f, rank, out_f * in_f, rank * (out_f + in_f), errors.get(name)))
    attention_rows = _attention_rows(base, q, order)
    pruned_rows = _pruned_rows(folder, q.get("mlp_widths") or {}, shapes)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    arch = (base.get("architectures") or [None])[0]
    return CheckpointSummary(
        folder=folder,
        marked=marked,
        base_model_type=base.get("model_type"),
        architecture=arch,
        info=dict(base.get(CHECKPOINT_KEY) or {}),
        quantization=_in_layer_order(q, [r.name for r in rows], [r.name for r in attention_rows]),
        report=CompressionReport(rows=rows, model_params=total, attention_rows=attention_rows,
                                 pruned_rows=pruned_rows),
        dtypes=sorted(dtypes),
        files=files,
    )


def _attention_rows(base: dict[str, Any], q: dict[str, Any], order: Callable[[str], Any]) -> list[AttentionRow]:
    """Query-key compressed attention modules from ``attention_ranks`` and the config's shapes (the
    query and key projections of self-attention read the hidden state; every architecture the
    query-key stage supports has biases on them), counted as :func:`drone_hf.report` counts them."""
    ranks = q.get("attention_ranks") or {}
    if not ranks:
        return []
    heads = next((base[k] for k in ("num_attention_heads", "n_head", "n_heads") if isinstance(base.get(k), int)), None)
    hidden = next((base[k] for k in ("hidden_size", "n_embd", "dim") if isinstance(base.get(k), int)), None)
    if not heads or not hidden:
        raise ValueError("config.json records compressed attention but no head count / hidden size to size it")
    head_dim = base.get("head_dim") if isinstance(base.get("head_dim"), int) else hidden // heads
    per_row = hidden + (1 if base.get("attention_bias", True) else 0)
    errors = q.get("attention_errors") or {}
    return [
        AttentionRow(name=name, heads=heads, head_dim=head_dim, qk_rank=rank, in_features=hidden,
                     dense_params=2 * heads * head_dim * per_row, compressed_params=2 * heads * rank * per_row,
                     score_error=errors.get(name))
        for name, rank in sorted(ranks.items(), key=lambda kv: order(kv[0]))
    ]


def _natural_key(name: str) -> list:
    """Name order with layer indices compared as numbers: block 10 after block 9, not after block 1."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _module_order(base: dict[str, Any]) -> dict[str, int] | None:
    """Position of each module of the recorded architecture in ``named_modules()``, from the class
    built empty on the ``meta`` device (no memory, no weights); ``None`` when transformers has no such
    class (remote code) or the config does not build, and the caller falls back to name order."""
    arch = (base.get("architectures") or [None])[0]
    try:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        model_type = base.get("model_type")
        # the lazy mapping's .get() is dict.get and answers None for every type: membership, then []
        if model_type not in transformers.CONFIG_MAPPING:
            return None
        config_class = transformers.CONFIG_MAPPING[model_type]
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            return None
        plain = {k: v for k, v in base.items() if k not in ("quantization_config", CHECKPOINT_KEY)}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # building the skeleton is not news to the user
        try:
            with torch.device("meta"):
                model = cls(config_class.from_dict(plain))
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001  (any failure only costs the order, never the summary)
        return None
    from ..modules.targets import canonical_name

    # recorded layer names are relative to the base model (bert.encoder... is saved as encoder...)
    return {canonical_name(model, name): i for i, (name, _) in enumerate(model.named_modules())}


def _layer_order(base: dict[str, Any], names: list[str]) -> Callable[[str], Any]:
    """The sort key that lists layers in the model's own order (query, key, value, attention output,
    then the MLP, block by block, as ``drone_hf.report(model)`` prints them after ``compress``), or in
    natural name order when the architecture cannot be built or does not hold every recorded layer
    (it is then not the model that was compressed, and its order would mix with name order)."""
    if not names:
        return _natural_key
    position = _module_order(base)
    if position is None or any(name not in position for name in names):
        return _natural_key
    return position.__getitem__


def _in_layer_order(q: dict[str, Any], layers: list[str], attention: list[str]) -> dict[str, Any]:
    """``quantization_config`` with its per-layer maps in the table's order: as saved (sorted keys) they
    put ``layer.10`` before ``layer.2`` in ``inspect --json``. Only key order changes; a key the table
    lacks keeps its place after the others."""
    out = dict(q)
    for key, names in (("ranks", layers), ("relative_errors", layers), ("attention_ranks", attention),
                       ("attention_errors", attention)):
        if isinstance(q.get(key), dict):
            first = {name: q[key][name] for name in names if name in q[key]}
            out[key] = first | {name: v for name, v in q[key].items() if name not in first}
    return out


def _find(shapes: dict[str, list[int]], suffix: str) -> list[int] | None:
    """The shape of the tensor named ``suffix`` or ``<prefix>.suffix`` (task models prefix names)."""
    if suffix in shapes:
        return shapes[suffix]
    hits = [s for n, s in shapes.items() if n.endswith("." + suffix)]
    return hits[0] if len(hits) == 1 else None


def _pruned_rows(folder: Path, widths: dict[str, Any], shapes: dict[str, list[int]]) -> list[PrunedRow]:
    """One row per block of ``mlp_widths``, its projections found in the weights by the block patterns
    of :mod:`drone_hf.modules.mlp_blocks`; a block whose tensors do not match its record is refused."""
    from ..modules.mlp_blocks import PATTERNS

    rows = []
    for name, record in widths.items():
        if not (isinstance(record, dict) and _is_int(record.get("width")) and _is_int(record.get("original"))):
            raise ValueError(f"{folder}: quantization_config.mlp_widths[{name!r}] is {record!r}, not "
                             "{'width': int, 'original': int}: config.json was edited or is damaged")
        width, original = int(record["width"]), int(record["original"])
        for inputs, output in PATTERNS:
            found = [_find(shapes, f"{name}.{m}.weight") for m in (*inputs, output)]
            if all(f is not None for f in found):
                break
        else:
            raise ValueError(f"{folder}: mlp_widths records the MLP block {name!r} but the weights have no layers of "
                             "it; the weights and config.json do not belong together")
        conv = inputs == ("c_fc",)  # GPT-2's Conv1D layers store [in, out]
        dims = [(f[1], f[0]) if conv else (f[0], f[1]) for f in found]  # [out, in] each
        if any(d[0] != width for d in dims[:-1]) or dims[-1][1] != width:
            raise ValueError(f"{folder}: {name!r} is recorded with MLP width {width} but its layers hold "
                             f"{[list(f) for f in found]}; the weights and config.json do not belong together")
        has_bias = [_find(shapes, f"{name}.{m}.bias") is not None for m in (*inputs, output)]
        inputs_ = [(d[1], b) for d, b in zip(dims[:-1], has_bias[:-1], strict=True)]
        rows.append(PrunedRow.from_layers(name, width, original, inputs_, (dims[-1][0], has_bias[-1])))
    return rows
