"""Accuracy for ``evaluate.load``: the fraction of predictions equal to their references.

Same definition and output key as the Hub's ``evaluate-metric/accuracy`` (``{"accuracy": float}``),
shipped so drone-hf's recipes need no network access. Optional ``sample_weight`` as there.
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy: the proportion of correct predictions among all predictions (num correct / num total)."
_INPUTS = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    sample_weight (`list` of `float`, *optional*): per-example weights.
Returns:
    accuracy (`float`): in [0, 1].
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
        if not references:
            raise ValueError("accuracy of an empty set is undefined; pass at least one prediction.")
        weights = sample_weight if sample_weight is not None else [1.0] * len(references)
        correct = sum(w for p, r, w in zip(predictions, references, weights, strict=True) if int(p) == int(r))
        return {"accuracy": float(correct / sum(weights))}
