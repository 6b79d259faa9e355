"""The width-pruning prototype study (benchmarks/lm_width_pruning.py): its MLP narrowing must be the
least-squares optimum and its --quick mode must run end to end (the elimination's mathematics is
the library's, tested in tests/solver/test_width.py)."""

import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.lm_width_pruning import main, prune_mlp  # noqa: E402
from drone_hf.solver.width import WIDTH_DAMP, _damped  # noqa: E402


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)


def test_prune_mlp_compensates_down_by_least_squares():
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(_config()).double()
    x = torch.randn(200, 8, dtype=torch.float64)
    with torch.no_grad():
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        dense_out = mlp(x)
    gram = h.T @ h
    untouched = LlamaMLP(_config()).double()
    untouched.load_state_dict(mlp.state_dict())
    prune_mlp(untouched, [], gram)  # nothing removed: the same function
    with torch.no_grad():
        assert torch.allclose(untouched(x), dense_out, atol=1e-9)
    removed, down = [1, 5, 6, 12], mlp.down_proj.weight.detach().clone()
    prune_mlp(mlp, removed, gram)
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 12
    keep = [j for j in range(16) if j not in removed]
    g = _damped(gram, WIDTH_DAMP)
    # normal equations of the (damped) least squares: W G[:, S] = W'_S G[S, S]
    lhs = down @ g[:, keep]
    rhs = mlp.down_proj.weight.detach() @ g[keep][:, keep]
    assert torch.allclose(lhs, rhs, atol=1e-8 * float(lhs.abs().max()))


def test_quick_run_writes_every_row(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "lm_width_pruning.json").read_text())
    assert rec["partial"] is False
    assert set(rec["rows"]) == {f"{c}/{a}" for c in (0.2, 0.1) for a in ("low-rank only", "low-rank + width pruning")}
    for row in rec["rows"].values():
        assert row["kept"] <= 1 - row["cut"] + 1e-9  # the budget holds
        assert torch.isfinite(torch.tensor(row["ppl"])) and row["ppl"] > 1
        if row["label"] == "low-rank only":
            assert not any(p.startswith("width") for p in row["mlp_blocks"])
    text = (tmp_path / "lm_width_pruning.md").read_text()
    assert "git commit" in text and "| 20% | low-rank + width pruning |" in text


def test_another_step_writes_its_own_files(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--step", "2"]) == 0
    assert not (tmp_path / "lm_width_pruning.json").exists()
    rec = json.loads((tmp_path / "lm_width_pruning_step2.json").read_text())
    assert rec["step"] == 2 and "removed 2 per elimination step" in (tmp_path / "lm_width_pruning_step2.md").read_text()


def test_a_step_below_one_is_refused_before_anything_runs(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path), "--step", "0"])
    assert "--step must be a positive number of neurons, got 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
