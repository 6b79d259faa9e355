"""Model cards for DRONE checkpoints: what was compressed, how much, how well, how to load it.

The card is rendered by ``huggingface_hub.ModelCard.from_template`` from the Jinja template
``drone_hf/hub/templates/drone_model_card.md.j2`` (shipped inside the package so that a pip-installed
drone-hf can render it; ``model_cards/examples/`` in the repository holds rendered examples). Every
number on the card comes from the model itself (its factored layers and recorded calibration) or from
a :class:`Measurements` the caller measured: nothing is estimated, and unknown numbers are said to be
unknown rather than left out silently.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..config import QUANT_METHOD
from ..report import CompressionReport, report
from ..utils.public_names import hub_id
from .checkpoint import CHECKPOINT_KEY

#: The template the cards are rendered from.
TEMPLATE_PATH = Path(__file__).parent / "templates" / "drone_model_card.md.j2"
#: File name of the rank-per-layer plot in a pushed repository (the card links to it).
RANK_PLOT_FILE = "rank_per_layer.png"
#: The tag every drone-hf model card carries (how a README.md drone-hf wrote is told from a user's).
CARD_TAG = "drone-hf"

DRONE_CITATION = """@inproceedings{chen2021drone,
  title     = {{DRONE}: Data-aware Low-rank Compression for Large {NLP} Models},
  author    = {Chen, Patrick and Yu, Hsiang-Fu and Dhillon, Inderjit S. and Hsieh, Cho-Jui},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {34},
  year      = {2021}
}"""
DRONE_PAPER_URL = "https://proceedings.neurips.cc/paper/2021/hash/f56de5ef149cf0aedcc8f4797031e229-Abstract.html"

# Auto class and pipeline task by the model class name's suffix (first match wins).
_TASKS = (
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
)


#: How the model card names each solver (``DroneConfig.method``).
_METHOD_NAMES = {
    "drone": "DRONE (data-aware)",
    "svd": "plain truncated SVD (data-free baseline)",
    "asvd": "ASVD (activation-aware SVD, peer method)",
    "fwsvd": "Fisher-weighted SVD (peer method)",
    "svdllm": "SVD-LLM (Cholesky whitening, peer method)",
    "drone-kfac": "loss-aware DRONE (output error weighted by a Kronecker-factored Fisher)",
}


def auto_class_and_task(architecture: str | None) -> tuple[str, str]:
    """(Auto class name, pipeline task) that fit a model class name such as ``"BertForMaskedLM"``."""
    for suffix, auto, task in _TASKS:
        if architecture and architecture.endswith(suffix):
            return auto, task
    return "AutoModel", "feature-extraction"


def describe_device(device: torch.device | str = "cpu") -> str:
    """A short, human description of where a measurement ran: device name, and threads on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


@dataclass
class Measurements:
    """Numbers measured on a compressed model, for its model card. ``None`` means not measured.

    Attributes:
        dense_latency_ms, compressed_latency_ms: median forward time of each model on the same
            inputs, interleaved runs (:func:`drone_hf.evaluation.measure_latency`).
        latency_device: where they were measured (:func:`describe_device`); a speedup means
            nothing without it.
        latency_inputs: the input shape, e.g. ``"batch 8 x 128 tokens"``.
        latency_page_faults: minor page faults per forward pass during the latency runs (both
            models); many mean the allocator re-faulted activations each pass, a cost that lowers
            the speedup and that a process reusing freed memory does not pay (``docs/speed.md``).
        fidelity_cosine, fidelity_relative_error: :func:`drone_hf.evaluation.output_fidelity`
            against the dense model; ``fidelity_data`` names the held-out text, ``fidelity_tokens``
            how many real tokens were compared.
        perplexity_dense, perplexity_compressed, perplexity_data: causal LMs.
        accuracy_dense, accuracy_compressed, accuracy_data: classifiers on a labelled set.
    """

    dense_latency_ms: float | None = None
    compressed_latency_ms: float | None = None
    latency_device: str | None = None
    latency_inputs: str | None = None
    latency_page_faults: float | None = None
    fidelity_cosine: float | None = None
    fidelity_relative_error: float | None = None
    fidelity_tokens: int | None = None
    fidelity_data: str | None = None
    perplexity_dense: float | None = None
    perplexity_compressed: float | None = None
    perplexity_data: str | None = None
    accuracy_dense: float | None = None
    accuracy_compressed: float | None = None
    accuracy_data: str | None = None

    @property
    def speedup(self) -> float | None:
        """Dense time / compressed time, when both were measured."""
        if self.dense_latency_ms and self.compressed_latency_ms:
            return self.dense_latency_ms / self.compressed_latency_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def merge(self, *others: Measurements) -> Measurements:
        """A copy with every field the ``others`` measured (later ones win) filled in."""
        data = asdict(self)
        for other in others:
            data.update(other.to_dict())
        return Measurements(**data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurements:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown Measurements field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> Measurements:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def plot_ranks(rep: CompressionReport, path: str | Path | None = None, title: str | None = None):
    """Bar chart of the rank of every factored layer against its parameter break-even rank.

    A layer only saves parameters (and multiply-adds) while its rank is below ``in·out/(in+out)``;
    the markers show that line, so how far below it each layer sits is visible at a glance.

    Args:
        rep: :func:`drone_hf.report` of the model.
        path: where to write a PNG (written without timestamps, so the same model gives the same
            bytes); ``None`` to only return the figure.
        title: figure title.

    Returns:
        the matplotlib ``Figure`` (shown inline when it is a notebook cell's last value).

    Raises:
        ImportError: matplotlib is missing (``pip install matplotlib``).
    """
    try:
        # The object API, not pyplot: no global figure state and no backend switch, so this is safe
        # on headless servers and leaves a notebook's inline backend alone.
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib ships with the dev and hub extras
        raise ImportError("Plotting ranks needs matplotlib: `pip install matplotlib`.") from e

    rows = rep.rows
    x = list(range(len(rows)))
    breakeven = [r.out_features * r.in_features / (r.out_features + r.in_features) for r in rows]
    fig = Figure(figsize=(max(6.0, 0.22 * len(rows) + 2), 3.6), dpi=100)
    ax = fig.subplots()
    ax.bar(x, [r.rank for r in rows], color="#3b75af", label="rank kept")
    ax.scatter(x, breakeven, marker="_", s=120, color="#d62728", label="break-even rank in·out/(in+out)")
    ax.set_xlabel("factored layer (forward order)")
    ax.set_ylabel("rank")
    ax.set_xlim(-0.8, len(rows) - 0.2)
    ax.set_ylim(0, 1.3 * max(breakeven + [r.rank for r in rows]))  # headroom for the legend
    ax.set_title(title or f"DRONE rank per layer ({len(rows)} layers, {rep.targeted_param_ratio:.1%} of weights kept)")
    step = max(1, len(rows) // 24)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([_short(r.name) for r in rows][::step], rotation=90, fontsize=6)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png", metadata={"Software": None})
    return fig


def _short(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``3.attention.self.query`` for tick labels."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i:])
    return name


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _sequential_setting(qc: Any) -> Any:
    """The ``sequential`` setting as the card shows it; ``None`` (not shown) for one-shot calibration."""
    mode = getattr(qc, "sequential", False)
    if not mode:
        return None
    if (qc.allocation_result or {}).get("sequential_kept") is False:  # compress._keep_loss_budget fell back
        return f"{mode} (its re-solve exceeded max_loss: the one-shot factors were kept)"
    return mode


def card_context(
    model: Any,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    measurements: Measurements | None = None,
    rank_plot: str | None = RANK_PLOT_FILE,
) -> dict[str, Any]:
    """Everything the template shows, as plain values (also what tests check the card against)."""
    rep = report(model)
    qc = model.config.quantization_config
    info = getattr(model.config, CHECKPOINT_KEY, None) or {}
    base_model = base_model or info.get("base_model") or hub_id(getattr(model, "name_or_path", None))
    architecture = type(model).__name__
    auto_class, task = auto_class_and_task(architecture)
    element = next(model.parameters()).element_size()
    calibration = qc.calibration or {}
    settings = {
        "method": qc.method,
        "param_ratio": qc.param_ratio,
        "target_speedup": getattr(qc, "target_speedup", None),
        "max_loss": getattr(qc, "max_loss", None),
        "allocation": getattr(qc, "allocation", None),
        "damp": qc.damp,
        "sequential": _sequential_setting(qc),
        "compress_attention": True if getattr(qc, "compress_attention", False) else None,
        "prune_mlp": True if getattr(qc, "prune_mlp", False) else None,
        "attention_rank": getattr(qc, "attention_rank", None) if getattr(qc, "compress_attention", False) else None,
        "target_modules": qc.target_modules or "all linear layers of the base model except heads",
        "modules_to_not_convert": qc.modules_to_not_convert,
        "num_samples": qc.num_samples,
        "max_length": qc.max_length,
        "seed": qc.seed,
    }
    m = measurements or Measurements()
    return {
        "repo_id": repo_id,
        "model_name": (repo_id or "").split("/")[-1] or f"{(base_model or architecture).split('/')[-1]}-drone",
        "base_model": base_model,
        "architecture": architecture,
        "model_type": model.config.model_type,
        "auto_class": auto_class,
        "pipeline_task": task,
        "quant_method": QUANT_METHOD,
        "method_name": _METHOD_NAMES.get(qc.method, qc.method),
        "settings": {k: v for k, v in settings.items() if v is not None},
        "format_version": qc.format_version,
        "layers": rep.rows,
        "num_layers": len(rep.rows),
        "attention_rows": rep.attention_rows,
        "pruned_rows": rep.pruned_rows,
        "dense_attention_params": rep.dense_attention_params,
        "compressed_attention_params": rep.compressed_attention_params,
        "attention_param_ratio": rep.attention_param_ratio,
        "score_macs_ratio": rep.score_macs_ratio,
        "dense_targeted_params": rep.dense_targeted_params,
        "factored_targeted_params": rep.factored_targeted_params,
        "targeted_param_ratio": rep.targeted_param_ratio,
        "dense_kept_layers": rep.dense_kept_layers,
        "dense_kept_reason": ("the size budget allowed them to stay dense" if "param_ratio" in
                              ((qc.allocation_result or {}).get("budget") or {})
                              else "factoring them would not have been faster"),
        "budgeted_param_ratio": rep.budgeted_param_ratio,
        "dense_model_params": rep.dense_model_params,
        "model_params": rep.model_params,
        "model_param_ratio": rep.model_param_ratio,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dense_size": _fmt_bytes(rep.dense_model_params * element),
        "compressed_size": _fmt_bytes(rep.model_params * element),
        "calibration": {
            "dataset": calibration.get("dataset", "unknown"),
            "num_texts": calibration.get("num_texts"),
            "num_tokens": calibration.get("num_tokens"),
            "max_length": calibration.get("max_length"),
        },
        "m": m,
        "speedup": m.speedup,
        "rank_plot": rank_plot,
        "citation": DRONE_CITATION,
        "paper_url": DRONE_PAPER_URL,
    }


def render_model_card(
    model: Any,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    measurements: Measurements | None = None,
    rank_plot: str | None = RANK_PLOT_FILE,
    license: str | None = None,
    template_path: str | Path | None = None,
):
    """Render the model card of a DRONE-compressed model.

    Args:
        model: a DRONE model (compressed in memory or reloaded from a checkpoint).
        repo_id: the Hub repository it goes to (shown in the loading snippet).
        base_model: the dense model's Hub id (``base_model`` in the card's metadata, which links the
            two on the Hub). Default: the one recorded in the checkpoint, else ``model.name_or_path``
            when that is a Hub id (local paths are never written).
        measurements: measured speedup / fidelity / perplexity / accuracy; missing ones are shown as
            not measured.
        rank_plot: relative path of the rank plot image the card shows (``None``: no image).
        license: SPDX id for the metadata (keep the base model's license).
        template_path: a custom Jinja template (default :data:`TEMPLATE_PATH`).

    Returns:
        a ``huggingface_hub.ModelCard``; ``str(card)`` is the README.md text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    ctx = card_context(model, repo_id, base_model=base_model, measurements=measurements, rank_plot=rank_plot)
    data = ModelCardData(
        library_name="transformers",
        base_model=ctx["base_model"],
        pipeline_tag=ctx["pipeline_task"],
        license=license,
        tags=[CARD_TAG, "drone", "low-rank", "compression"],
        # Extra keys stay in the YAML header: a machine-readable summary of the compression.
        drone={
            "method": ctx["settings"]["method"],
            "layers_factored": ctx["num_layers"],
            "targeted_param_ratio": round(ctx["targeted_param_ratio"], 4),
            "model_param_ratio": round(ctx["model_param_ratio"], 4),
        },
    )
    return ModelCard.from_template(data, template_path=str(template_path or TEMPLATE_PATH), **ctx)
