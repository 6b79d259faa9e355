"""Compressed attention through ``save_pretrained`` / plain ``from_pretrained``, in a fresh process.

Every family is compressed on load (query-key compression plus linear compression of the rest),
saved, and reloaded by a new Python process that only imports drone_hf and calls ``from_pretrained``:
outputs must be bit-identical, GPT-2 greedy generation on a left-padded batch (causal mask plus
padding) identical token for token, and the checkpoint keys must match the rebuilt skeleton one to one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attention_models import build
from tiny_models import CALIBRATION_TEXTS, sample_inputs, tokenizer
from transformers import AutoModel, AutoModelForCausalLM

from drone_hf import DroneConfig
from drone_hf.modules.attention import drone_attention_modules

AUTO = {"bert": AutoModel, "distilbert": AutoModel, "mpnet": AutoModel, "gpt2": AutoModelForCausalLM}
#: case -> (family, extra DroneConfig fields): linear + attention, and attention alone.
CASES = {family: (family, {"param_ratio": 0.5}) for family in AUTO} | {
    "bert-attention-only": ("bert", {"target_modules": ["query", "key"]}),
}

RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, transformers
    import drone_hf
    from drone_hf.modules.attention import drone_attention_modules
    cases, inputs_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    inputs = torch.load(inputs_file)
    results = {}
    for case, (folder, auto_name) in cases.items():
        model = getattr(transformers, auto_name).from_pretrained(folder)
        with torch.no_grad():
            out = model(**inputs["plain"])
            out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            gen = model.generate(**inputs["prompts"], max_new_tokens=6, do_sample=False, pad_token_id=0) \\
                if auto_name == "AutoModelForCausalLM" else None
        ranks = {n: m.qk_rank for n, m in drone_attention_modules(model).items()}
        results[case] = {"out": out, "gen": gen, "ranks": ranks}
    torch.save(results, out_file)
    """
)


def prompts() -> dict[str, torch.Tensor]:
    tok = tokenizer()
    tok.padding_side = "left"
    return dict(tok(["The union is", "Our economy grew faster this year than"], return_tensors="pt", padding=True))


def compress_and_save(case: str, root: Path):
    family, extra = CASES[case]
    src = root / f"{case}-dense"
    build(family).save_pretrained(src)
    tokenizer().save_pretrained(src)
    cfg = DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=8, batch_size=4, compress_attention=True, attention_rank=3, **extra
    )
    model = AUTO[family].from_pretrained(src, drone_config=cfg).eval()
    model.save_pretrained(root / case)
    return model


def test_every_family_round_trips_bit_for_bit_in_a_fresh_process(tmp_path) -> None:
    inputs = {"plain": dict(sample_inputs()), "prompts": prompts()}
    expected, cases = {}, {}
    for case in CASES:
        model = compress_and_save(case, tmp_path)
        with torch.no_grad():
            out = model(**inputs["plain"])
            out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            gen = model.generate(**inputs["prompts"], max_new_tokens=6, do_sample=False, pad_token_id=0) \
                if AUTO[CASES[case][0]] is AutoModelForCausalLM else None
        ranks = {n: m.qk_rank for n, m in drone_attention_modules(model).items()}
        expected[case] = {"out": out, "gen": gen, "ranks": ranks}
        cases[case] = (str(tmp_path / case), AUTO[CASES[case][0]].__name__)
        saved = json.loads((tmp_path / case / "config.json").read_text())["quantization_config"]
        assert saved["attention_ranks"] and set(saved["attention_ranks"].values()) == {3}
        assert all(isinstance(v, float) for v in saved["attention_errors"].values())

    inputs_file, out_file = tmp_path / "inputs.pt", tmp_path / "out.pt"
    torch.save(inputs, inputs_file)
    done = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(cases), str(inputs_file), str(out_file)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out_file)
    for case, want in expected.items():
        assert got[case]["ranks"] == want["ranks"] and len(want["ranks"]) == 2, case
        torch.testing.assert_close(got[case]["out"], want["out"], rtol=0, atol=0, msg=case)
        if want["gen"] is not None:
            assert want["gen"].shape[1] == inputs["prompts"]["input_ids"].shape[1] + 6
            assert torch.equal(got[case]["gen"], want["gen"]), case


@pytest.mark.parametrize("case", ["gpt2", "bert-attention-only"])
def test_reload_has_no_missing_or_unexpected_keys(case, tmp_path) -> None:
    compress_and_save(case, tmp_path)
    model, info = AUTO[CASES[case][0]].from_pretrained(tmp_path / case, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert len(drone_attention_modules(model)) == 2
    if case == "gpt2":
        assert not any(k.endswith("c_attn.weight") for k in model.state_dict())
