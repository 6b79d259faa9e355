"""Metric scripts for ``evaluate.load`` shipped with drone-hf, so recipes evaluate offline.

``evaluate.load("accuracy")`` fetches its script from the Hub; these are local copies of the same
definitions, loaded by path (:func:`drone_hf.training.recipe.load_metric`).
"""

from pathlib import Path

#: Folder holding the metric scripts (``accuracy.py``).
METRICS_DIR = Path(__file__).resolve().parent
