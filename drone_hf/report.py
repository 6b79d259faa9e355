"""``report(model)``: what compression did to each layer, as rows and as a readable table.

What a ratio counts: *targeted* ratios compare the weight parameters of the factored layers
(``rank·(in+out)``) with the dense layers they replaced (``in·out``); biases are unchanged and not
counted. *Attention* rows (``compress_attention=True``) compare the query and key projections of each
compressed self-attention module, weights **and** biases (both shrink from ``H·d`` to ``H·k`` rows):
``2·H·k·(n+1)`` against ``2·H·d·(n+1)``. *Model* ratios compare every parameter of the model
(embeddings, norms, heads included) before and after, so they count both kinds of layers exactly.

Compute: a factored layer's multiply-adds per token shrink like its weights; a compressed attention
module's query/key projections shrink like its parameters and its ``L x L`` score product (per token
pair) by ``k/d`` (:attr:`CompressionReport.score_macs_ratio`; whether a kernel realises that saving
depends on the attention implementation, see ``docs/attention.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .modules.attention import DroneAttention
from .modules.low_rank_linear import DroneLinear
from .modules.mlp_blocks import find_mlp_blocks, layer_shape, recorded_mlp_widths
from .modules.targets import canonical_name, supported_layers


@dataclass(frozen=True)
class PrunedRow:
    """One width-pruned MLP block (``prune_mlp=True``): its name, width now and before, and the
    parameters (weights and biases) of its projections now and before."""

    name: str
    width: int
    original: int
    params: int
    dense_params: int

    @classmethod
    def from_layers(cls, name: str, width: int, original: int, inputs: list[tuple[int, int]],
                    output: tuple[int, int]) -> PrunedRow:
        """From the narrowed layers' ``(weight parameters per neuron, has bias)`` for each input layer
        and ``(outputs, has bias)`` for the output layer: both scale with the width, the output bias not."""
        per_neuron = sum(n + b for n, b in inputs) + output[0]
        fixed = output[0] if output[1] else 0
        return cls(name, width, original, per_neuron * width + fixed, per_neuron * original + fixed)


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
class AttentionRow:
    """One query-key compressed self-attention module (``compress_attention=True``).

    ``dense_params``/``compressed_params`` count the query and key projections, weights and biases
    (see the module docstring); ``score_error`` is the relative error of the attention scores on the
    calibration tokens (``None`` when the checkpoint has no record of it).
    """

    name: str
    heads: int
    head_dim: int
    qk_rank: int
    in_features: int
    dense_params: int
    compressed_params: int
    score_error: float | None

    @property
    def param_ratio(self) -> float:
        return self.compressed_params / self.dense_params

    @property
    def score_macs_ratio(self) -> float:
        """Multiply-adds of the score product ``q·k`` after / before: ``k/d``."""
        return self.qk_rank / self.head_dim


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer rows plus totals; ``str(report)`` is a fixed-width table, ``to_markdown()`` a Markdown one.

    ``rows`` are the factored linear layers, ``attention_rows`` the query-key compressed attention
    modules (empty unless ``compress_attention=True``); iterating a report yields ``rows`` only.
    """

    rows: list[LayerRow]
    model_params: int
    allocation: dict | None = None
    attention_rows: list[AttentionRow] = field(default_factory=list)
    pruned_rows: list[PrunedRow] = field(default_factory=list)

    @property
    def dense_targeted_params(self) -> int:
        return sum(r.dense_params for r in self.rows)

    @property
    def factored_targeted_params(self) -> int:
        return sum(r.factored_params for r in self.rows)

    @property
    def targeted_param_ratio(self) -> float:
        """Factored / dense weight parameters over the factored layers only.

        Layers an allocation targeted but kept dense are not rows, so they are not counted here;
        :attr:`budgeted_param_ratio` counts them, as ``param_ratio`` does.
        """
        dense = self.dense_targeted_params
        return self.factored_targeted_params / dense if dense else 1.0

    @property
    def dense_kept_layers(self) -> int:
        """Targeted layers the allocation kept dense: under a size budget because it allowed them to stay
        dense, under a speed or loss budget because factoring them would not have been faster."""
        return int((self.allocation or {}).get("dense_layers") or 0)

    @property
    def budgeted_param_ratio(self) -> float | None:
        """Kept / dense weights over every targeted layer, dense-kept ones included: the quantity
        ``param_ratio`` budgets (``allocation_result["targeted_param_ratio"]``); ``None`` if unrecorded."""
        value = (self.allocation or {}).get("targeted_param_ratio")
        return None if value is None else float(value)

    @property
    def dense_attention_params(self) -> int:
        """Query/key parameters (weights and biases) of the compressed attention modules before compression."""
        return sum(r.dense_params for r in self.attention_rows)

    @property
    def compressed_attention_params(self) -> int:
        """Query/key parameters (weights and biases) of the compressed attention modules now."""
        return sum(r.compressed_params for r in self.attention_rows)

    @property
    def attention_param_ratio(self) -> float:
        """Query/key parameters after / before over the compressed attention modules (1.0 if none)."""
        dense = self.dense_attention_params
        return self.compressed_attention_params / dense if dense else 1.0

    @property
    def score_macs_ratio(self) -> float:
        """Multiply-adds of all compressed modules' score products after / before (``Σ H·k / Σ H·d``; 1.0 if none)."""
        dense = sum(r.heads * r.head_dim for r in self.attention_rows)
        return sum(r.heads * r.qk_rank for r in self.attention_rows) / dense if dense else 1.0

    @property
    def compressed_param_ratio(self) -> float:
        """After / before over everything DRONE changed: factored linear weights plus attention query/key."""
        dense = self.dense_targeted_params + self.dense_attention_params
        after = self.factored_targeted_params + self.compressed_attention_params
        return after / dense if dense else 1.0

    @property
    def dense_model_params(self) -> int:
        """Parameters of the model before compression (factored layers and compressed attention restored)."""
        return (
            self.model_params
            - self.factored_targeted_params
            + self.dense_targeted_params
            - self.compressed_attention_params
            + self.dense_attention_params
            - sum(r.params for r in self.pruned_rows)
            + sum(r.dense_params for r in self.pruned_rows)
        )

    @property
    def model_param_ratio(self) -> float:
        """All parameters after / before (embeddings and heads included)."""
        return self.model_params / self.dense_model_params

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def to_dicts(self) -> list[dict]:
        """The factored linear rows as dicts (see :meth:`attention_dicts` for the attention rows)."""
        return [asdict(r) | {"param_ratio": r.param_ratio} for r in self.rows]

    def attention_dicts(self) -> list[dict]:
        """The compressed attention rows as dicts, with their parameter and score-compute ratios."""
        return [
            asdict(r) | {"param_ratio": r.param_ratio, "score_macs_ratio": r.score_macs_ratio}
            for r in self.attention_rows
        ]

    def _attention_table(self) -> tuple[list[str], list[list[str]]]:
        head = ["attention module", "heads x width", "q/k rank", "q/k params before", "after", "kept", "score error"]
        body = [
            [
                r.name,
                f"{r.heads}x{r.head_dim}",
                str(r.qk_rank),
                f"{r.dense_params:,}",
                f"{r.compressed_params:,}",
                f"{r.param_ratio:.1%}",
                "n/a" if r.score_error is None else f"{r.score_error:.4f}",
            ]
            for r in self.attention_rows
        ]
        return head, body

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
        text = ""
        if self.rows or not (self.attention_rows or self.pruned_rows):  # an all-pruned model factors nothing
            text = (
                f"{len(self.rows)} layers factored; targeted weights {self.dense_targeted_params:,} -> "
                f"{self.factored_targeted_params:,} ({self.targeted_param_ratio:.1%} kept); "
            )
        if self.attention_rows:
            ranks = sorted({r.qk_rank for r in self.attention_rows})
            text += (
                f"{len(self.attention_rows)} attention modules query-key compressed (per-head rank "
                f"{'/'.join(map(str, ranks))}); query/key parameters {self.dense_attention_params:,} -> "
                f"{self.compressed_attention_params:,} ({self.attention_param_ratio:.1%} kept), score products "
                f"{self.score_macs_ratio:.1%} of the multiply-adds; "
            )
        if self.pruned_rows:
            widths = "/".join(str(r.width) for r in self.pruned_rows)
            before = sum(r.dense_params for r in self.pruned_rows)
            after = sum(r.params for r in self.pruned_rows)
            text += (
                f"{len(self.pruned_rows)} MLP blocks width-pruned (widths {widths} of "
                f"{'/'.join(sorted({str(r.original) for r in self.pruned_rows}))}); their parameters {before:,} -> "
                f"{after:,} ({after / before:.1%} kept); "
            )
        text += (
            f"whole model {self.dense_model_params:,} -> {self.model_params:,} parameters "
            f"({self.model_param_ratio:.1%})."
        )
        a = self.allocation or {}
        if a and (a.get("strategy") != "uniform" or "param_ratio" not in (a.get("budget") or {})):
            parts = [f"allocation {a.get('strategy')}", f"budget {a.get('budget')}"]
            if a.get("eval_loss"):
                parts.append(f"evaluation loss {a['eval_loss']}")
            if self.dense_kept_layers:
                kept = f"{self.dense_kept_layers} targeted layers kept dense"
                if self.budgeted_param_ratio is not None:
                    kept += f" ({self.budgeted_param_ratio:.1%} of all targeted weights kept, what param_ratio counts)"
                parts.append(kept)
            if "measured_speedup" in a:
                parts.append(f"speedup predicted {a['predicted_speedup']:.2f}x, measured {a['measured_speedup']:.2f}x")
            if "measured_loss_increase" in a:
                parts.append(f"held-out loss increase {a['measured_loss_increase']:.4g}")
            if a.get("sequential_kept") is False:
                parts.append(f"sequential={a.get('sequential')!r} re-solve exceeded the budget "
                             f"({a['sequential_loss_increase']:.4g}): one-shot factors kept")
            text += "\n" + "; ".join(parts) + "."
        return text

    def _tables(self) -> list[tuple[list[str], list[list[str]]]]:
        tables = [self._table()] if self.rows else []
        return tables + ([self._attention_table()] if self.attention_rows else [])

    def __str__(self) -> str:
        lines: list[str] = []
        for head, body in self._tables():
            widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
            lines += [_fixed(head, widths), _fixed(["-" * w for w in widths], widths)]
            lines += [_fixed(r, widths) for r in body] + [""]
        return "\n".join(lines + [self.summary()])

    def to_markdown(self) -> str:
        lines: list[str] = []
        for head, body in self._tables():
            lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        return "\n".join(lines + [self.summary()])


def report(model: nn.Module) -> CompressionReport:
    """Per-layer rows (name, shape, rank, parameters before/after, relative calibration error), and
    one row per query-key compressed attention module (per-head rank, query/key parameters before and
    after, relative score error).

    Works on a freshly compressed model and on one reloaded from a DRONE checkpoint (the errors
    come from the checkpoint's record).

    Raises:
        ValueError: the model has neither a factored layer nor a compressed attention module.
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
    attention_rows = [_attention_row(canonical_name(model, name), m) for name, m in model.named_modules()
                      if isinstance(m, DroneAttention)]
    record = getattr(getattr(model, "config", None), "quantization_config", None)
    pruned_rows = _pruned_rows(model)
    if not rows and not attention_rows and not pruned_rows:
        raise ValueError(
            "The model has no DRONE-factored layer: compress it first with drone_hf.compress(model, config) or "
            "from_pretrained(..., drone_config=DroneConfig(...))."
        )
    allocation = getattr(record, "allocation_result", None)
    return CompressionReport(
        rows=rows, model_params=sum(p.numel() for p in model.parameters()), allocation=allocation,
        attention_rows=attention_rows, pruned_rows=pruned_rows,
    )


def _pruned_rows(model: nn.Module) -> list[PrunedRow]:
    """One row per block in the record's ``mlp_widths``, from the model's narrowed layers."""
    widths = recorded_mlp_widths(model)
    if not widths:
        return []
    blocks = {b.name: b for b in find_mlp_blocks(model)}
    layers = supported_layers(model)

    def has_bias(member: str) -> int:
        return int(getattr(layers[member][1], "bias", None) is not None)

    rows = []
    for name, w in widths.items():
        block = blocks.get(name)
        if block is None:
            continue
        inputs = [(layer_shape(layers[m][1])[1], has_bias(m)) for m in block.inputs]
        output = (layer_shape(layers[block.output][1])[0], has_bias(block.output))
        rows.append(PrunedRow.from_layers(name, int(w["width"]), int(w["original"]), inputs, output))
    return rows


def _fixed(cells: list[str], widths: list[int]) -> str:
    """One fixed-width line: the first two columns left-aligned, numbers right-aligned."""
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def _attention_row(name: str, m: DroneAttention) -> AttentionRow:
    """Query and key projections, weights and biases, at width ``d`` (before) and ``k`` (now) per head."""
    per_row = m.query_proj.in_features + (1 if m.query_proj.bias is not None else 0)
    return AttentionRow(
        name=name, heads=m.num_heads, head_dim=m.head_dim, qk_rank=m.qk_rank, in_features=m.query_proj.in_features,
        dense_params=2 * m.num_heads * m.head_dim * per_row, compressed_params=2 * m.num_heads * m.qk_rank * per_row,
        score_error=m.relative_error,
    )
