"""``report(model)``: what compression did to each layer, as rows and as a readable table.

What a ratio counts: *targeted* ratios compare the weight parameters of the factored layers
(``rank·(in+out)``) with the dense layers they replaced (``in·out``); biases are unchanged and not
counted. *Model* ratios compare every parameter of the model (embeddings, norms, heads included)
before and after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .modules.low_rank_linear import DroneLinear
from .modules.targets import canonical_name


@dataclass(frozen=True)
class LayerRow:
    """One factored layer: its name (relative to the base model), shape, rank, sizes and error."""

    name: str
    out_features: int
    in_features: int
    rank: int
    dense_params: int
    factored_params: int
    relative_error: float | None

    @property
    def param_ratio(self) -> float:
        return self.factored_params / self.dense_params


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer rows plus totals; ``str(report)`` is a fixed-width table, ``to_markdown()`` a Markdown one."""

    rows: list[LayerRow]
    model_params: int
    allocation: dict | None = None

    @property
    def dense_targeted_params(self) -> int:
        return sum(r.dense_params for r in self.rows)

    @property
    def factored_targeted_params(self) -> int:
        return sum(r.factored_params for r in self.rows)

    @property
    def targeted_param_ratio(self) -> float:
        """Factored / dense weight parameters over the factored layers only."""
        dense = self.dense_targeted_params
        return self.factored_targeted_params / dense if dense else 1.0

    @property
    def dense_model_params(self) -> int:
        """Parameters of the model before compression."""
        return self.model_params - self.factored_targeted_params + self.dense_targeted_params

    @property
    def model_param_ratio(self) -> float:
        """All parameters after / before (embeddings and heads included)."""
        return self.model_params / self.dense_model_params

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) | {"param_ratio": r.param_ratio} for r in self.rows]

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "shape", "rank", "params before", "params after", "kept", "rel. error"]
        body = [
            [
                r.name,
                f"{r.out_features}x{r.in_features}",
                str(r.rank),
                f"{r.dense_params:,}",
                f"{r.factored_params:,}",
                f"{r.param_ratio:.1%}",
                "n/a" if r.relative_error is None else f"{r.relative_error:.4f}",
            ]
            for r in self.rows
        ]
        return head, body

    def summary(self) -> str:
        text = (
            f"{len(self.rows)} layers factored; targeted weights {self.dense_targeted_params:,} -> "
            f"{self.factored_targeted_params:,} ({self.targeted_param_ratio:.1%} kept); whole model "
            f"{self.dense_model_params:,} -> {self.model_params:,} parameters ({self.model_param_ratio:.1%})."
        )
        a = self.allocation or {}
        if a and (a.get("strategy") != "uniform" or "param_ratio" not in (a.get("budget") or {})):
            parts = [f"allocation {a.get('strategy')}", f"budget {a.get('budget')}"]
            if a.get("dense_layers"):
                parts.append(f"{a['dense_layers']} targeted layers kept dense")
            if "measured_speedup" in a:
                parts.append(f"speedup predicted {a['predicted_speedup']:.2f}x, measured {a['measured_speedup']:.2f}x")
            if "measured_loss_increase" in a:
                parts.append(f"held-out loss increase {a['measured_loss_increase']:.4g}")
            text += "\n" + "; ".join(parts) + "."
        return text

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
        return "\n".join(lines + ["", self.summary()])

    def to_markdown(self) -> str:
        head, body = self._table()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ["", self.summary()])


def report(model: nn.Module) -> CompressionReport:
    """Per-layer rows (name, shape, rank, parameters before/after, relative calibration error).

    Works on a freshly compressed model and on one reloaded from a DRONE checkpoint (the errors
    come from the checkpoint's record).

    Raises:
        ValueError: the model has no DRONE layer.
    """
    rows = [
        LayerRow(
            name=canonical_name(model, name),
            out_features=m.out_features,
            in_features=m.in_features,
            rank=m.rank,
            dense_params=m.dense_parameters,
            factored_params=m.factored_parameters,
            relative_error=m.relative_error,
        )
        for name, m in model.named_modules()
        if isinstance(m, DroneLinear)
    ]
    if not rows:
        raise ValueError(
            "The model has no DRONE-factored layer: compress it first with drone_hf.compress(model, config) or "
            "from_pretrained(..., drone_config=DroneConfig(...))."
        )
    record = getattr(getattr(model, "config", None), "quantization_config", None)
    allocation = getattr(record, "allocation_result", None)
    return CompressionReport(
        rows=rows, model_params=sum(p.numel() for p in model.parameters()), allocation=allocation
    )
