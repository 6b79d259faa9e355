"""Pushing a DRONE model to the Hub: weights, marked config, shim, tokenizer, model card and plot.

One commit carries everything, so a repository is never left with weights but no card (or a card
describing other weights). ``model.push_to_hub(...)`` of a DRONE model comes here too (see
:func:`drone_hf.hub.checkpoint.install`): transformers' own push would write a generic card that
says nothing about the compression and does not upload the tokenizer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..utils.logging import get_logger
from .card import CARD_TAG, RANK_PLOT_FILE, Measurements, plot_ranks, render_model_card
from .checkpoint import is_drone_model, set_base_model

logger = get_logger(__name__)

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "tokenizer.model")


def check_repo_id(repo_id: Any) -> str:
    """``repo_id`` if it is a valid Hub model id (``name`` or ``namespace/name``), else a ``ValueError``
    naming the rule; called before any work so a typo never costs a compression run."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty string like 'your-name/model-drone', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(
            f"repo_id {repo_id!r} is not a valid Hub model id: use 'name' or 'namespace/name' with letters, digits, "
            f"'-', '_' and '.' ({e})"
        ) from None
    if repo_id.count("/") > 1:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub model id: use 'name' or 'namespace/name'")
    return repo_id


def resolve_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer to ship with ``model``: the one given (object or path), else the one in the
    model's own local folder, else the calibration tokenizer path; ``None`` (with a warning) if none.

    Only local folders are searched by default: pushing must not download anything by surprise.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    candidates = [getattr(model, "name_or_path", None)]
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    candidates.append(getattr(qc, "tokenizer", None))
    for source in candidates:
        if isinstance(source, (str, os.PathLike)) and any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(os.fspath(source))
    logger.warning(
        "No tokenizer found next to the model, so none is uploaded: pass tokenizer= to push it with the model."
    )
    return None


def write_card_files(
    model: Any,
    folder: str | os.PathLike,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    measurements: Measurements | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> list[str]:
    """Write ``README.md`` (the model card) and the rank plot into ``folder``; returns their names.

    Without matplotlib the card is written without the image (and says nothing about it).
    """
    folder = Path(folder)
    written = []
    try:
        plot = None
        if _report(model).rows:  # a model whose only change is pruned MLP widths has no ranks to plot
            plot_ranks(_report(model), folder / RANK_PLOT_FILE)
            written.append(RANK_PLOT_FILE)
            plot = RANK_PLOT_FILE
    except ImportError:
        logger.warning("matplotlib is not installed: the model card has no rank plot (`pip install matplotlib`).")
        plot = None
    card = render_model_card(
        model, repo_id, base_model=base_model, measurements=measurements, rank_plot=plot, license=license
    )
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    card.save(folder / "README.md")
    written.append("README.md")
    return written


def _report(model: Any):
    from ..report import report

    return report(model)


def push_folder(
    model: Any,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    measurements: Measurements | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    files: list[str] | None = None,
):
    """Add the card and plot to a saved DRONE checkpoint ``folder`` and upload it in one commit.

    ``files``: the paths (relative to ``folder``) the save wrote, uploaded with the card and plot; the
    default, every non-hidden file, is for a folder written for this push alone. A folder the user
    also keeps other things in (a Trainer ``output_dir``: ``checkpoint-*/optimizer.pt``,
    ``training_args.bin``, logs) must name its files: uploading all of it would publish them. A
    ``README.md`` there that drone-hf did not write stays as it is on disk; the commit carries the
    DRONE card instead (the Hub copy must say how to load the checkpoint).

    Returns:
        the ``huggingface_hub.CommitInfo`` of the commit.
    """
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    folder = Path(folder)
    if files is None:
        files = [path.relative_to(folder).as_posix() for path in folder.rglob("*")
                 if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    with tempfile.TemporaryDirectory(prefix="drone-hf-card-") as cards:
        card_folder = Path(cards) if _user_readme(folder / "README.md") else folder
        card_files = write_card_files(
            model, card_folder, repo_id, base_model=base_model, measurements=measurements, license=license, tags=tags
        )
        uploads = {name: folder / name for name in files} | {name: card_folder / name for name in card_files}
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                      for name, path in sorted(uploads.items())]
        return _commit(operations, repo_id, token=token, private=private, commit_message=commit_message,
                       commit_description=commit_description, revision=revision, create_pr=create_pr)


def _user_readme(path: Path) -> bool:
    """A ``README.md`` that is not a drone-hf model card (its front matter lacks the ``drone-hf`` tag)."""
    if not path.is_file():
        return False
    try:
        from huggingface_hub import ModelCard

        tags = ModelCard.load(path).data.tags or []
    except Exception:  # noqa: BLE001 - unreadable or no front matter: not ours either way
        return True
    return CARD_TAG not in tags


def _commit(operations: list, repo_id: str, *, token, private, commit_message, commit_description, revision,
            create_pr):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    logger.info(f"Uploading {len(operations)} files to {repo_id}")
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload DRONE-compressed model (drone-hf)",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    base_model: str | None = None,
    measurements: Measurements | dict | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
):
    """Upload a DRONE-compressed model to the Hub with its tokenizer and a model card, in one commit.

    What the commit holds: ``model.safetensors`` (factors and untouched weights), ``config.json``
    marked as a DRONE checkpoint, ``drone_hf_checkpoint.py`` (the loader shim, see
    :mod:`drone_hf.hub.checkpoint`), the tokenizer files, ``README.md`` (the card: base model,
    method and settings, per-layer ranks, parameter and size reduction, measured speed and fidelity
    when given, calibration data, how to load, the DRONE citation) and ``rank_per_layer.png``.

    ``model.push_to_hub(repo_id, ...)`` on a DRONE model calls this with the same arguments.

    Args:
        model: a DRONE model (``from_pretrained(..., drone_config=...)``, ``drone_hf.compress`` or a
            reloaded checkpoint).
        repo_id: ``"namespace/name"`` (or ``"name"`` in your namespace); created if missing.
        tokenizer: tokenizer object or path; default: the one in the model's local folder.
        token, private, commit_message, commit_description, revision, create_pr: as for
            ``huggingface_hub.HfApi``.
        max_shard_size: as for ``save_pretrained``.
        base_model: the dense model's Hub id, for the card and the checkpoint record (recorded on
            ``model.config``); default: the recorded one, else ``name_or_path`` if a Hub id.
        measurements: :class:`~drone_hf.hub.Measurements` (or a dict of its fields) to show on the card.
        license: SPDX license id for the card's metadata (keep the base model's).
        tags: extra tags for the card.

    Returns:
        the ``huggingface_hub.CommitInfo`` of the commit.

    Raises:
        ValueError: the model is not DRONE-compressed, or ``repo_id`` is not a valid id (checked
            before anything is written or uploaded).
    """
    check_repo_id(repo_id)
    if not is_drone_model(model):
        raise ValueError(
            "drone_hf.push_to_hub uploads DRONE-compressed models; this one has no DRONE layers. Compress it first "
            "(drone_hf.compress(model, config)) or use its own push_to_hub for a dense model."
        )
    if isinstance(measurements, dict):
        measurements = Measurements.from_dict(measurements)
    if base_model is not None:
        set_base_model(model, base_model)  # the pushed config.json records it too, not only the card
    tok = resolve_tokenizer(model, tokenizer)
    with tempfile.TemporaryDirectory(prefix="drone-hf-push-") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tok is not None:
            tok.save_pretrained(tmp)
        return push_folder(
            model,
            tmp,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            base_model=base_model,
            measurements=measurements,
            license=license,
            tags=tags,
        )
