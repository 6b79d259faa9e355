"""The width-pruning prototype study (benchmarks/lm_width_pruning.py): its OBS elimination must
predict exactly the loss model it optimises, its compensation must be the least-squares optimum,
and its --quick mode must run end to end."""

import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.lm_width_pruning import DAMP, _damped, eliminate_neurons, main, prune_mlp  # noqa: E402
from drone_hf.solver import DEFAULT_KFAC_DAMP  # noqa: E402


def _problem(seed=0, out=6, width=24, tokens=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g, dtype=torch.float64)
    x = torch.randn(width, tokens, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, width)[:, None]
    a = torch.randn(out, out, generator=g, dtype=torch.float64)
    return w, x @ x.T, a @ a.T


def _loss(w, gram, out_gram, scale, kept):
    """scale · tr(H_δ ΔW G_δ ΔWᵀ) of the compensated weight on ``kept`` (the damped quadratic)."""
    g, h = _damped(gram, DAMP), _damped(out_gram, DEFAULT_KFAC_DAMP)
    comp = torch.linalg.solve(g[kept][:, kept], (w @ g[:, kept]).T).T
    full = torch.zeros_like(w)
    full[:, kept] = comp
    delta = w - full
    return scale * float(torch.trace(h @ delta @ g @ delta.T))


def test_elimination_predicts_the_exact_loss_of_each_step():
    w, gram, out_gram = _problem()
    order, losses = eliminate_neurons(w, gram, out_gram, 0.5, step=4, max_removed=16)
    assert len(order) == 16 == len(set(order)) and len(losses) == 4
    for s, predicted in enumerate(losses, 1):
        kept = torch.tensor(sorted(set(range(24)) - set(order[: 4 * s])))
        assert abs(predicted - _loss(w, gram, out_gram, 0.5, kept)) <= 1e-8 * max(1.0, predicted)
    assert all(a <= b for a, b in zip(losses, losses[1:], strict=False))  # removing more never helps


def test_single_steps_pick_the_cheapest_neuron():
    w, gram, out_gram = _problem(seed=1, width=10)
    order, losses = eliminate_neurons(w, gram, out_gram, 1.0, step=1, max_removed=1)
    costs = [_loss(w, gram, out_gram, 1.0, torch.tensor([j for j in range(10) if j != i])) for i in range(10)]
    assert order[0] == min(range(10), key=costs.__getitem__)
    assert abs(losses[0] - min(costs)) <= 1e-8 * max(1.0, min(costs))


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
    g = _damped(gram, DAMP)
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
