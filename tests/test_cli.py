"""The drone-hf command line: the built-in demo, saving, and one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import save_tiny, sample_inputs
from transformers import AutoModel

from drone_hf import DroneLinear
from drone_hf.cli import main


def test_compress_saves_a_reloadable_checkpoint(tmp_path, capsys):
    src = save_tiny("bert", tmp_path / "dense")
    out = tmp_path / "out"
    code = main(["compress", str(src), "--param-ratio", "0.3", "--num-samples", "16", "--eval-batches", "1",
                 "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "layers factored" in text and "Held-out fidelity" in text and "speedup" in text
    model = AutoModel.from_pretrained(out)
    assert any(isinstance(m, DroneLinear) for m in model.modules())
    assert (out / "tokenizer.json").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())  # no temporary left behind
    with torch.no_grad():
        model(**sample_inputs())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--param-ratio", "1.5"], "param_ratio=1.5 must be a number in (0, 1]"),
        (["--target-modules", "nope"], "target_modules entry 'nope' matches no linear layer"),
        (["--dataset", "missing.txt"], "neither a built-in corpus"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, extra, message):
    src = save_tiny("bert", tmp_path / "dense")
    capsys.readouterr()  # drop the progress bars of building the fixture
    assert main(["compress", str(src), "--no-eval", *extra]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]  # progress bars of loading may precede it
    assert last.startswith("drone-hf: error:") and message in last


def test_output_must_be_new_and_not_the_source(tmp_path, capsys):
    src = save_tiny("bert", tmp_path / "dense")
    assert main(["compress", str(src), "--no-eval", "--output", str(src)]) == 2
    assert "is the source model folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert main(["compress", str(src), "--no-eval", "--output", str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "user data"


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "drone_hf", "compress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--param-ratio", "--dataset", "--method", "--damp", "--output", "--target-modules", "--no-eval"):
        assert option in out.stdout


@pytest.mark.slow
def test_builtin_demo_runs_end_to_end(capsys):
    assert main(["compress", "--eval-batches", "1", "--num-samples", "32"]) == 0
    text = capsys.readouterr().out
    assert "36 layers factored" in text and "speedup" in text and "embedding cosine" in text
