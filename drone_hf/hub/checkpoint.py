"""The self-describing DRONE checkpoint: a ``config.json`` that plain transformers cannot misread.

Why this exists. transformers has no plugin discovery: a checkpoint whose only DRONE marker is
``quantization_config.quant_method = "drone"`` loads, when drone_hf was not imported, as a *randomly
initialised dense model* (transformers logs "Unknown quantization type ... we will skip the
quantization" and initialises the missing ``query.weight`` & co. at random). Users would then get
garbage outputs with nothing but a warning.

Decision. A DRONE checkpoint's ``config.json`` declares its own ``model_type`` (``"drone"``), records
the real one under ``drone_checkpoint.base_model_type``, and names a four-line remote-code shim
(``drone_hf_checkpoint.py``, written next to the weights) as its ``auto_map["AutoConfig"]``:

* ``import drone_hf`` done: drone_hf rewrites the marker back to the base ``model_type`` as the config
  dict is read (:func:`unmark_config_dict`, hooked into ``PreTrainedConfig.get_config_dict``), so every
  Auto class, concrete class and ``pipeline(...)`` loads the factored model, no ``trust_remote_code``.
* drone_hf not imported: transformers does not know ``model_type="drone"`` and sees custom code, so
  ``AutoConfig``/``AutoModel*``/``pipeline`` *fail loudly* ("contains custom code ... pass
  ``trust_remote_code=True``") instead of loading random weights.
* not imported but ``trust_remote_code=True``: the shim imports drone_hf and the model loads correctly;
  if drone-hf is not installed, the shim fails with "pip install drone-hf ... import drone_hf".

A shim that *re-implements* DRONE loading was rejected: it would be a second copy of the format to
keep in sync, executed from the Hub. The shim only imports the installed package. Known limit: a
*concrete* class (``BertModel.from_pretrained``) without drone_hf imported still only warns
("model of type `drone` to instantiate a model of type `bert`"): concrete classes read any
``config.json`` without looking at ``auto_map``, and nothing in a config file can stop that.

Checkpoints saved before this format (``model_type`` of the base model, DRONE only in
``quantization_config``) still load with drone_hf imported; re-saving them adds the marker.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..config import QUANT_METHOD
from ..quantizer import DroneHfQuantizer
from ..utils.logging import get_logger
from ..utils.public_names import hub_id, public_name
from .atomic_save import atomic_save

logger = get_logger(__name__)

#: ``model_type`` written into a DRONE checkpoint's ``config.json``; unknown to plain transformers.
MARKER_MODEL_TYPE = "drone"
#: Top-level ``config.json`` key with what the checkpoint is (base model type, provenance, versions).
CHECKPOINT_KEY = "drone_checkpoint"
#: Version of the marker layout under :data:`CHECKPOINT_KEY`. A newer one fails loudly on load.
CHECKPOINT_FORMAT = 1
#: File name (module) and class of the remote-code shim written next to the weights.
SHIM_MODULE = "drone_hf_checkpoint"
SHIM_FILE = SHIM_MODULE + ".py"
SHIM_CLASS = "DroneCheckpointConfig"
SHIM_REF = f"{SHIM_MODULE}.{SHIM_CLASS}"
#: How to load, in one line; written into the checkpoint and shown in error messages.
LOAD_HINT = "pip install drone-hf, then `import drone_hf` before from_pretrained"

SHIM_SOURCE = f'''"""DRONE-compressed checkpoint (low-rank factored linear layers): it needs the drone-hf plugin.

Load it with `pip install drone-hf`, then `import drone_hf` before `from_pretrained(...)`.
With drone-hf installed, `from_pretrained(..., trust_remote_code=True)` works too: transformers then
runs this file, which only imports the installed drone_hf package (it contains no model code).
"""

try:
    from drone_hf.hub.checkpoint import {SHIM_CLASS}  # noqa: F401  (importing drone_hf registers DRONE)
except ImportError as error:
    raise ImportError(
        "This checkpoint is DRONE-compressed (drone-hf): its linear layers are stored as low-rank factors that "
        "plain transformers cannot load. Install the plugin with `pip install drone-hf` and `import drone_hf` "
        "before from_pretrained(...)."
    ) from error
'''

_PATCH_FLAG = "_drone_hf_checkpoint_patched"


# --- the config.json format ------------------------------------------------------------------
def is_drone_model(model: Any) -> bool:
    """Whether ``model`` carries DRONE-factored layers managed by drone-hf (its quantizer is ours)."""
    return isinstance(getattr(model, "hf_quantizer", None), DroneHfQuantizer)


def is_marked(config_dict: dict[str, Any]) -> bool:
    """Whether a raw ``config.json`` dict is a marked DRONE checkpoint."""
    return config_dict.get("model_type") == MARKER_MODEL_TYPE


def is_drone_config_dict(config_dict: dict[str, Any]) -> bool:
    """Marked checkpoints and older ones that only carry ``quantization_config.quant_method="drone"``."""
    qc = config_dict.get("quantization_config")
    return is_marked(config_dict) or (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD)


def checkpoint_info(model: Any, base_model_type: str) -> dict[str, Any]:
    """The :data:`CHECKPOINT_KEY` record for ``model``, keeping provenance already carried by its config."""
    from .. import __version__

    previous = getattr(getattr(model, "config", None), CHECKPOINT_KEY, None)
    previous = previous if isinstance(previous, dict) else {}
    base_model = previous.get("base_model")
    if base_model is None:
        base_model = hub_id(getattr(model, "name_or_path", None))
    return {
        "format_version": CHECKPOINT_FORMAT,
        "base_model_type": base_model_type,
        "base_model": base_model,
        "drone_hf_version": __version__,
        "how_to_load": LOAD_HINT,
    }


def check_base_model(base_model: Any) -> str:
    """``base_model`` if it is a Hub model id (``name`` or ``namespace/name``), else a ``ValueError``
    with the fix: the id is written into ``config.json`` and the model card's metadata and link, where
    a local path means nothing on another machine and shows the user's directory layout."""
    # By its spelling, not by whether it exists: a clone of a Hub model in the working directory
    # (`git clone .../gpt2`, then `--base-model gpt2`) is the use this exists for.
    if isinstance(base_model, str) and (os.path.isabs(base_model) or base_model.startswith((".", "~"))
                                        or base_model.count("/") > 1 or os.sep != "/" and os.sep in base_model):
        raise ValueError(f"base_model {base_model!r} is a local path, not a Hub model id; it is recorded in the "
                         "checkpoint and its model card, so give the Hub id the dense model is a copy of (like "
                         "'org/name'), or leave it out")
    if isinstance(base_model, str):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(base_model)
            return base_model
        except HFValidationError:
            pass
    raise ValueError(f"base_model {base_model!r} is not a Hub model id: use 'name' or 'namespace/name' with letters, "
                     "digits, '-', '_' and '.' (the dense model's id on the Hub), or leave it out")


def set_base_model(model: Any, base_model: str) -> None:
    """Record the dense model's Hub id in ``model``'s checkpoint record (written by the next save).

    Needed when the model was loaded from a local folder (a local path is never recorded) but is a
    copy of a Hub model, e.g. the packaged all-MiniLM-L6-v2.

    Raises:
        ValueError: ``base_model`` is not a Hub model id (:func:`check_base_model`).
    """
    check_base_model(base_model)
    record = dict(getattr(model.config, CHECKPOINT_KEY, None) or {})
    record["base_model"] = base_model
    setattr(model.config, CHECKPOINT_KEY, record)


def mark_config_dict(config_dict: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config_dict`` (a base config as transformers wrote it) marked as a DRONE checkpoint.

    Raises:
        ValueError: the base config already uses its own remote-code ``AutoConfig`` (a custom
            architecture); marking it would hide that code, so the caller keeps it unmarked.
    """
    out = copy.deepcopy(config_dict)
    if is_marked(out):
        return out
    auto_map = dict(out.get("auto_map") or {})
    if auto_map.get("AutoConfig") not in (None, SHIM_REF):
        raise ValueError(
            f"the base model defines its own remote-code config ({auto_map['AutoConfig']!r}); DRONE checkpoints of "
            "remote-code architectures cannot carry the drone-hf marker"
        )
    auto_map["AutoConfig"] = SHIM_REF
    out["auto_map"] = auto_map
    out[CHECKPOINT_KEY] = {**info, "base_model_type": out.get("model_type")}
    out["model_type"] = MARKER_MODEL_TYPE
    return out


def unmark_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The base config dict of a marked DRONE checkpoint (unchanged when it is not marked).

    The :data:`CHECKPOINT_KEY` record stays in the dict, so it rides on the loaded config object and
    the next ``save_pretrained`` keeps the provenance.

    Raises:
        ValueError: the marker is damaged, written by a newer drone-hf, or its quant_method was edited.
    """
    if not is_marked(config_dict):
        return config_dict
    info = config_dict.get(CHECKPOINT_KEY)
    if not isinstance(info, dict) or not isinstance(info.get("base_model_type"), str):
        raise ValueError(
            f"config.json says model_type={MARKER_MODEL_TYPE!r} but has no {CHECKPOINT_KEY}.base_model_type: it was "
            "not written by drone-hf, or it was edited. Restore the original config.json."
        )
    version = info.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise ValueError(
            f"This DRONE checkpoint uses marker format {version!r}, newer than this drone-hf understands "
            f"({CHECKPOINT_FORMAT}). Upgrade with `pip install -U drone-hf`."
        )
    qc = config_dict.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        # Without this check transformers would load the factored checkpoint as a dense model (or as
        # another method's) with the missing dense weights initialised at random.
        found = "no quantization_config" if not isinstance(qc, dict) else f"quantization_config.quant_method={method!r}"
        raise ValueError(
            f"config.json is marked as a DRONE checkpoint ({CHECKPOINT_KEY}) but has {found}, so its factored "
            f"weights would load as random dense layers: config.json was edited. Restore "
            f"quantization_config.quant_method={QUANT_METHOD!r} (or the original config.json written by drone-hf)."
        )
    out = copy.deepcopy(config_dict)
    out["model_type"] = info["base_model_type"]
    auto_map = {k: v for k, v in (out.get("auto_map") or {}).items() if not (k == "AutoConfig" and v == SHIM_REF)}
    if auto_map:
        out["auto_map"] = auto_map
    else:
        out.pop("auto_map", None)
    return out


def mark_checkpoint_folder(folder: str | os.PathLike, model: Any) -> bool:
    """Rewrite ``folder/config.json`` (just written by ``save_pretrained``) as a marked DRONE
    checkpoint and write the shim next to it. Returns whether the folder was marked."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return False  # not the saving rank, or a caller that skipped the config
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if is_marked(raw) and (folder / SHIM_FILE).is_file():
        return True  # the config's own write marked it (_patch_config_json): nothing to redo
    try:
        marked = mark_config_dict(raw, checkpoint_info(model, raw.get("model_type")))
    except ValueError as e:
        logger.warning(f"Saved an unmarked DRONE checkpoint to {folder}: {e}. Load it only with `import drone_hf`.")
        return False
    _write_text(config_file, json.dumps(marked, indent=2, sort_keys=True) + "\n")
    _write_text(folder / SHIM_FILE, SHIM_SOURCE)
    return True


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class DroneCheckpointConfig(PreTrainedConfig):
    """The class ``auto_map["AutoConfig"]`` names in a DRONE checkpoint (reached only through the shim).

    It is never instantiated: loading returns the *base* model's config (``BertConfig``...), so the
    Auto classes pick the ordinary model class and the DRONE quantizer rebuilds the factored layers.
    """

    model_type = MARKER_MODEL_TYPE

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):  # type: ignore[override]
        from transformers import AutoConfig

        # drone_hf is imported by now (the shim imported it), so the dict is unmarked as it is read.
        return AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):  # type: ignore[override]
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        base = unmark_config_dict(config_dict)
        try:
            base_class = CONFIG_MAPPING[base["model_type"]]
        except KeyError:
            raise ValueError(
                f"This DRONE checkpoint's base model type {base['model_type']!r} is unknown to this transformers; "
                "upgrade it with `pip install -U transformers`."
            ) from None
        return base_class.from_dict(base, **kwargs)


# --- hooks into transformers (idempotent) -------------------------------------------------------
def install() -> None:
    """Hook the checkpoint format into transformers: read (unmark), save (mark), push (model card).

    Each hook changes nothing for models and checkpoints that are not DRONE ones. Idempotent, like
    :func:`drone_hf.loading.patch_from_pretrained`.
    """
    _patch_get_config_dict()
    _patch_config_json()
    _patch_save_pretrained()
    _patch_push_to_hub()
    _patch_dtype_casts()


def _patch_get_config_dict() -> None:
    current = PreTrainedConfig.__dict__["get_config_dict"].__func__
    if getattr(current, _PATCH_FLAG, False):
        return

    @functools.wraps(current)
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, unused = current(cls, pretrained_model_name_or_path, **kwargs)
        return unmark_config_dict(config_dict), unused

    setattr(get_config_dict, _PATCH_FLAG, True)
    PreTrainedConfig.get_config_dict = classmethod(get_config_dict)


def _is_drone_config(config: Any) -> bool:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == QUANT_METHOD


def _patch_config_json() -> None:
    """Mark every ``config.json`` a DRONE config writes, not only the model's save.

    ``AutoConfig.from_pretrained(ckpt)`` returns the unmarked base config; saving it back (to edit
    ``id2label``, say: ``config.save_pretrained(ckpt)``, or ``config.push_to_hub``) wrote an unmarked
    file that plain transformers loads as a dense model with random weights in place of the factors,
    the failure the marker exists to prevent. The file is marked where it is written, with the shim
    beside it; other JSON files a config is written to are left as they are. Local paths given as
    ``dataset``/``tokenizer`` are written as names only (:mod:`drone_hf.utils.public_names`)."""
    current = PreTrainedConfig.to_json_file
    if getattr(current, _PATCH_FLAG, False):
        return

    @functools.wraps(current)
    def to_json_file(self, json_file_path, *args, **kwargs):
        result = current(self, json_file_path, *args, **kwargs)
        path = Path(json_file_path)
        if path.name != "config.json" or not _is_drone_config(self):
            return result
        raw = json.loads(path.read_text(encoding="utf-8"))
        qc = raw.get("quantization_config")
        if isinstance(qc, dict):  # the calibration data / tokenizer given as local paths: names only
            for key in ("dataset", "tokenizer"):
                if key in qc:
                    qc[key] = public_name(qc[key])
        owner = SimpleNamespace(config=self, name_or_path=getattr(self, "_name_or_path", None))
        try:
            marked = mark_config_dict(raw, checkpoint_info(owner, raw.get("model_type")))
        except ValueError:  # a remote-code base config: the model's save warns about it
            return result
        _write_text(path, json.dumps(marked, indent=2, sort_keys=True) + "\n")
        _write_text(path.with_name(SHIM_FILE), SHIM_SOURCE)
        return result

    setattr(to_json_file, _PATCH_FLAG, True)
    PreTrainedConfig.to_json_file = to_json_file


def _patch_dtype_casts() -> None:
    """``model.half()`` / ``model.float()`` on a DRONE model.

    transformers refuses both for every quantized model ("not supported for quantized model"), which
    protects integer weights; DRONE's factors are ordinary float ``nn.Linear`` weights, so the casts
    are as valid as ``model.to(torch.float16)``, which already works. Other quantized models keep
    transformers' refusal."""
    for name in ("half", "float"):
        current = getattr(PreTrainedModel, name)
        if getattr(current, _PATCH_FLAG, False):
            continue

        def cast(self, *args, _current=current, _name=name):
            if is_drone_model(self):
                return getattr(torch.nn.Module, _name)(self, *args)
            return _current(self, *args)

        functools.update_wrapper(cast, current)
        setattr(cast, _PATCH_FLAG, True)
        setattr(PreTrainedModel, name, cast)


_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision")


def _patch_save_pretrained() -> None:
    current = PreTrainedModel.save_pretrained
    if getattr(current, _PATCH_FLAG, False):
        return
    signature = inspect.signature(current)

    @functools.wraps(current)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not is_drone_model(self):
            return current(self, save_directory, *args, **kwargs)
        bound = signature.bind(self, save_directory, *args, **kwargs)
        push = bool(bound.arguments.get("push_to_hub", False))
        extra = bound.arguments.get("kwargs", {})
        hub = {k: extra.pop(k) for k in _HUB_KWARGS if k in extra}
        if push:
            # transformers would upload inside save_pretrained, before the config is marked: the Hub
            # copy would be the unsafe one. Save, mark, then upload ourselves.
            bound.arguments["push_to_hub"] = False
        is_main = bound.arguments.get("is_main_process", True)
        saved: list[str] = []
        if is_main:
            # Written into a temporary sibling, marked, then swapped into place (atomic_save.py): an
            # interrupted save leaves the previous checkpoint as it was.
            def write(folder):
                bound.arguments["save_directory"] = str(folder)
                out = current(*bound.args, **bound.kwargs)
                mark_checkpoint_folder(folder, self)
                # what this save wrote, before the user's other files are carried over: the push uploads
                # these (and the card), never a Trainer's optimizer states or training_args.bin beside them
                saved[:] = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
                return out

            result = atomic_save(save_directory, write)
        else:  # other ranks of a distributed save write nothing (transformers' should_save_on_this_rank)
            result = current(*bound.args, **bound.kwargs)
        if push and is_main:
            from .push import push_folder

            repo_id = hub.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
            push_folder(self, save_directory, repo_id, token=bound.arguments.get("token"), files=saved, **hub)
        return result

    setattr(save_pretrained, _PATCH_FLAG, True)
    PreTrainedModel.save_pretrained = save_pretrained


def _patch_push_to_hub() -> None:
    current = PreTrainedModel.push_to_hub
    if getattr(current, _PATCH_FLAG, False):
        return

    @functools.wraps(current)
    def push_to_hub(self, *args, **kwargs):
        if not is_drone_model(self):
            return current(self, *args, **kwargs)
        from .push import push_to_hub as drone_push

        return drone_push(self, *args, **kwargs)

    setattr(push_to_hub, _PATCH_FLAG, True)
    PreTrainedModel.push_to_hub = push_to_hub
