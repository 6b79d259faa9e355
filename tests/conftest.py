"""Suite-wide guards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads_unchanged():
    """A test that pins torch's thread count (benchmarks run in-process do) must not leak it: later
    bit-for-bit comparisons against a fresh process assume the default reduction order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Saved dense + DRONE checkpoints (with tokenizers) of tiny BERT, BERT classifier and GPT-2, for the
    command-line tests (tests/test_cli.py, tests/test_cli_input_checks.py)."""
    from tiny_models import CALIBRATION_TEXTS, save_tiny
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from drone_hf import DroneConfig

    root = tmp_path_factory.mktemp("cli")  # once per test module
    autos = {"bert": AutoModel, "bert-seq-cls": AutoModelForSequenceClassification, "gpt2-lm": AutoModelForCausalLM}
    out = {}
    for arch, auto in autos.items():
        dense = save_tiny(arch, root / f"{arch}-dense")
        model = auto.from_pretrained(dense, drone_config=DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8))
        model.save_pretrained(root / arch)
        AutoTokenizer.from_pretrained(dense).save_pretrained(root / arch)
        out[arch] = (dense, root / arch)
    return out
