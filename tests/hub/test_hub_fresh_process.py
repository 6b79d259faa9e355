"""A DRONE checkpoint in a fresh process, with and without ``import drone_hf``.

Every load path a user reaches for (``AutoModel``, ``AutoModelForSequenceClassification``,
``AutoModelForCausalLM``, ``pipeline``) runs in a new interpreter under four situations:

* ``import``:  drone_hf imported first -> the factored model, outputs bit for bit;
* ``plain``:   not imported -> a loud ``ValueError`` (never a randomly initialised dense model);
* ``trust``:   not imported, ``trust_remote_code=True`` -> the shim imports drone_hf, loads correctly;
* ``missing``: drone-hf not installed, ``trust_remote_code=True`` -> ``ImportError`` naming the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, sample_inputs, save_tiny
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import drone_hf
from drone_hf import DroneConfig, DroneLinear

CASES = {
    # name: (tiny architecture, Auto class, pipeline task, pipeline call kwargs)
    "bert": ("bert", AutoModel, "feature-extraction", {}),
    "bert-seq-cls": ("bert-seq-cls", AutoModelForSequenceClassification, "text-classification", {}),
    "gpt2-lm": ("gpt2-lm", AutoModelForCausalLM, "text-generation", {"max_new_tokens": 2, "do_sample": False}),
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    situation, spec_file, out_file = sys.argv[1:4]
    if situation == "import":
        import drone_hf
    if situation == "missing":
        sys.modules["drone_hf"] = None  # exactly what `import drone_hf` sees when drone-hf is not installed
    import torch, transformers
    trust = {"trust_remote_code": True} if situation in ("trust", "missing") else {}
    results = {}
    for case in json.load(open(spec_file)):
        try:
            if case["kind"] == "auto":
                model = getattr(transformers, case["auto"]).from_pretrained(case["folder"], **trust)
            else:
                pipe = transformers.pipeline(case["task"], model=case["folder"], **trust)
                pipe("The union is strong.", **case["call_kwargs"])  # the pipeline runs end to end
                model = pipe.model
            with torch.no_grad():
                out = model(**torch.load(case["inputs"]))
            out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            results[case["name"]] = {
                "ok": True,
                "class": type(model).__name__,
                "n_drone": sum(type(m).__name__ == "DroneLinear" for m in model.modules()),
                "max_diff": float((out - torch.load(case["expected"])).abs().max()),
            }
        except Exception as e:
            results[case["name"]] = {"ok": False, "error_type": type(e).__name__, "error": str(e)}
    results["drone_hf_imported"] = sys.modules.get("drone_hf") is not None
    json.dump(results, open(out_file, "w"))
    """
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three saved DRONE checkpoints (with tokenizers), the inputs, and each model's expected outputs."""
    root = tmp_path_factory.mktemp("drone-checkpoints")
    inputs = sample_inputs()
    torch.save(dict(inputs), root / "inputs.pt")
    spec, layers = [], {}
    for name, (arch, auto, task, call_kwargs) in CASES.items():
        src = save_tiny(arch, root / f"{name}-dense")
        model = auto.from_pretrained(src, drone_config=DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8))
        with torch.no_grad():
            out = model(**inputs)
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        torch.save(out, root / f"{name}-expected.pt")
        folder = root / name
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(src).save_pretrained(folder)
        layers[name] = sum(isinstance(m, DroneLinear) for m in model.modules())
        common = {"case": name, "folder": str(folder), "inputs": str(root / "inputs.pt"),
                  "expected": str(root / f"{name}-expected.pt")}
        spec.append({"name": f"{auto.__name__}:{name}", "kind": "auto", "auto": auto.__name__, **common})
        spec.append({"name": f"pipeline:{task}", "kind": "pipeline", "task": task, "call_kwargs": call_kwargs,
                     **common})
    (root / "spec.json").write_text(json.dumps(spec))
    return root, spec, layers


def run_situation(situation: str, root, tmp_path) -> dict:
    env = os.environ | {
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # where transformers copies the shim
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, situation, str(root / "spec.json"), str(out)],
        env=env,
        stdin=subprocess.DEVNULL,  # transformers may prompt for remote code; answer nothing
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("situation", ["import", "trust"])
def test_loads_the_factored_model_bit_for_bit(situation, checkpoints, tmp_path):
    root, spec, layers = checkpoints
    results = run_situation(situation, root, tmp_path)
    assert results.pop("drone_hf_imported") is True  # by the test (import) or by the shim (trust)
    assert set(results) == {c["name"] for c in spec}
    case_of = {c["name"]: c["case"] for c in spec}
    for name, got in results.items():
        assert got["ok"], f"{name}: {got}"
        assert got["n_drone"] == layers[case_of[name]], name
        assert got["max_diff"] == 0.0, name


def test_without_drone_hf_every_load_path_fails_loudly(checkpoints, tmp_path):
    root, spec, _ = checkpoints
    results = run_situation("plain", root, tmp_path)
    assert results.pop("drone_hf_imported") is False
    assert set(results) == {c["name"] for c in spec}
    for name, got in results.items():
        assert not got["ok"], f"{name} loaded without drone_hf: {got}"  # never a random dense model
        assert got["error_type"] == "ValueError", name
        assert "custom code" in got["error"] and "trust_remote_code=True" in got["error"], name


def test_without_drone_hf_installed_the_error_names_the_fix(checkpoints, tmp_path):
    root, spec, _ = checkpoints
    results = run_situation("missing", root, tmp_path)
    assert results.pop("drone_hf_imported") is False
    for name, got in results.items():
        assert not got["ok"] and got["error_type"] == "ImportError", f"{name}: {got}"
        assert "pip install drone-hf" in got["error"] and "import drone_hf" in got["error"], name


def test_reference_outputs_are_from_factored_models(checkpoints):
    """Guards the tests above: a dense model would give other outputs than the expected ones."""
    root, _, layers = checkpoints
    assert all(n > 0 for n in layers.values())
    dense = AutoModel.from_pretrained(root / "bert-dense")
    with torch.no_grad():
        out = dense(**torch.load(root / "inputs.pt")).last_hidden_state
    assert float((out - torch.load(root / "bert-expected.pt")).abs().max()) > 1e-4
    assert drone_hf.hub.summarize_checkpoint(root / "bert").marked
