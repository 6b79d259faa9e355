"""Make ``tests/`` importable (``tiny_models``) from this subfolder, whatever the collection order."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


import pytest  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

AUTO_FOR = {
    "bert": AutoModel,
    "bert-seq-cls": AutoModelForSequenceClassification,
    "gpt2-lm": AutoModelForCausalLM,
    "llama-gqa-lm": AutoModelForCausalLM,
}


@pytest.fixture
def compressed(tmp_path):
    """``compressed(arch)`` -> (DRONE model compressed from a saved tiny ``arch``, its dense folder).

    The dense folder holds the tokenizer too, so the model's own folder has one to push.
    """
    from tiny_models import CALIBRATION_TEXTS, save_tiny

    from drone_hf import DroneConfig

    def make(arch: str = "bert", **config):
        src = save_tiny(arch, tmp_path / f"{arch}-dense")
        cfg = DroneConfig(**({"dataset": CALIBRATION_TEXTS, "num_samples": 8} | config))
        return AUTO_FOR[arch].from_pretrained(src, drone_config=cfg), src

    return make


from hub.fake_hub import FakeHub  # noqa: E402


@pytest.fixture
def fake_hub(monkeypatch):
    return FakeHub().install(monkeypatch)
