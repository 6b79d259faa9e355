"""Rank allocation: the uniform rank formula, break-even at param_ratio=1, and fixed ranks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drone_hf.allocation import allocate_ranks, uniform_rank

SHAPES = [(1, 1), (2, 3), (8, 8), (16, 4), (4, 16), (64, 64), (768, 768), (3072, 768), (768, 3072), (30, 7)]
RATIOS = ["0.01", "0.1", "0.25", "0.3", "0.5", "0.7", "0.75", "0.9", "1"]


def exact_rank(out_f: int, in_f: int, ratio: str) -> int:
    """floor(r·in·out / (in + out)) in exact rational arithmetic, at least 1, at most min(in, out)."""
    k = math.floor(Fraction(ratio) * out_f * in_f / (out_f + in_f))
    return max(1, min(k, out_f, in_f))


@pytest.mark.parametrize("out_f, in_f", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_uniform_rank_formula(out_f: int, in_f: int, ratio: str) -> None:
    assert uniform_rank(out_f, in_f, float(ratio)) == exact_rank(out_f, in_f, ratio)


@pytest.mark.parametrize("out_f, in_f", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_uniform_rank_keeps_at_most_the_ratio_of_parameters(out_f: int, in_f: int, ratio: str) -> None:
    k = uniform_rank(out_f, in_f, float(ratio))
    dense = out_f * in_f
    if k > 1:  # the floor of 1 may exceed a tiny budget
        assert Fraction(k * (out_f + in_f)) <= Fraction(ratio) * dense
    # and it is the largest such rank (below the shape limit)
    if k < min(out_f, in_f):
        assert Fraction((k + 1) * (out_f + in_f)) > Fraction(ratio) * dense


def test_exact_integer_boundaries_are_not_lost_to_round_off() -> None:
    # r·in·out/(in+out) is an exact integer here, but float arithmetic lands a hair below or above it
    assert uniform_rank(768, 768, 0.5) == 192
    assert uniform_rank(20, 20, 0.1) == 1
    assert uniform_rank(60, 60, 0.3) == 9
    assert uniform_rank(100, 100, 0.7) == 35
    assert uniform_rank(40, 40, 0.35) == 7


@pytest.mark.parametrize("out_f, in_f, expected", [(8, 8, 4), (768, 768, 384), (3072, 768, 614), (16, 4, 3), (1, 1, 1)])
def test_param_ratio_one_gives_break_even_rank(out_f: int, in_f: int, expected: int) -> None:
    k = uniform_rank(out_f, in_f, 1.0)
    assert k == expected
    assert k * (out_f + in_f) <= out_f * in_f or k == 1  # no more parameters than the dense layer
    assert (k + 1) * (out_f + in_f) > out_f * in_f  # one more would cost more
    if min(out_f, in_f) > 2:
        assert k < min(out_f, in_f)  # not lossless


def test_tiny_ratio_still_gives_rank_one() -> None:
    assert uniform_rank(768, 768, 1e-9) == 1
    assert uniform_rank(2, 2, 0.01) == 1


def test_rank_grows_with_ratio() -> None:
    ranks = [uniform_rank(768, 3072, r / 20) for r in range(1, 21)]
    assert ranks == sorted(ranks)
    assert ranks[-1] == uniform_rank(768, 3072, 1.0)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.0000001, 1.5, float("nan"), float("inf")])
def test_uniform_rank_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"param_ratio=.* must be in \(0, 1\]"):
        uniform_rank(8, 8, ratio)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 100))
def test_property_uniform_rank_is_floor_of_budget(out_f: int, in_f: int, percent: int) -> None:
    assert uniform_rank(out_f, in_f, percent / 100) == exact_rank(out_f, in_f, f"{percent}/100")
    k = uniform_rank(out_f, in_f, percent / 100)
    assert 1 <= k <= min(out_f, in_f)


# --------------------------------------------------------------------------------------------------
# allocate_ranks
# --------------------------------------------------------------------------------------------------
SHAPE_MAP = {"q": (64, 64), "up": (256, 64), "down": (64, 256), "tiny": (2, 3)}


def test_allocate_uniform_for_every_layer_in_order() -> None:
    ranks = allocate_ranks(SHAPE_MAP, 0.5)
    assert list(ranks) == list(SHAPE_MAP)
    assert ranks == {name: uniform_rank(o, i, 0.5) for name, (o, i) in SHAPE_MAP.items()}
    assert ranks == {"q": 16, "up": 25, "down": 25, "tiny": 1}
    assert allocate_ranks(SHAPE_MAP, 0.5, None) == ranks
    assert allocate_ranks(SHAPE_MAP, 0.5, {}) == ranks


def test_fixed_ranks_take_precedence() -> None:
    ranks = allocate_ranks(SHAPE_MAP, 0.5, {"q": 7, "down": 64})
    assert ranks["q"] == 7
    assert ranks["down"] == 64  # full rank is allowed (above break-even: no saving, but the user asked)
    assert ranks["up"] == uniform_rank(256, 64, 0.5)
    assert ranks["tiny"] == 1


def test_fixed_ranks_for_unknown_layers_are_ignored_here() -> None:
    # check_rank_keys validates names; allocation only reads the layers it is given
    assert allocate_ranks({"q": (8, 8)}, 1.0, {"elsewhere": 3}) == {"q": 4}


@pytest.mark.parametrize("name, rank, limit", [("q", 65, 64), ("up", 65, 64), ("tiny", 3, 2)])
def test_too_large_fixed_rank_raises(name: str, rank: int, limit: int) -> None:
    out_f, in_f = SHAPE_MAP[name]
    with pytest.raises(ValueError, match=rf"rank {rank} on '{name}'.*{out_f}x{in_f} layer has rank at most {limit}"):
        allocate_ranks(SHAPE_MAP, 0.5, {name: rank})


def test_too_large_rank_message_suggests_the_saving_range() -> None:
    with pytest.raises(ValueError, match=r"use a rank in \[1, 64\] \(below 32 to save parameters\)"):
        allocate_ranks({"q": (64, 64)}, 0.5, {"q": 100})


def test_bad_ratio_raises_even_with_fixed_ranks_for_unfixed_layers() -> None:
    with pytest.raises(ValueError, match="param_ratio"):
        allocate_ranks({"a": (8, 8), "b": (8, 8)}, 0.0, {"a": 2})
    # every layer fixed: the ratio is not used
    assert allocate_ranks({"a": (8, 8)}, 0.0, {"a": 2}) == {"a": 2}


def test_empty_shapes_gives_empty_ranks() -> None:
    assert allocate_ranks({}, 0.5) == {}


# --- bad budgets on a real compression: a clear error, and the model handed back untouched -----
import torch  # noqa: E402
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer  # noqa: E402
from transformers import BertModel  # noqa: E402

import drone_hf  # noqa: E402
import drone_hf.planner as planner_mod  # noqa: E402
from drone_hf import DroneConfig, DroneLinear  # noqa: E402

TOKENIZER = tokenizer()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(bert_config(hidden_size=64, intermediate_size=128)).eval()


def budget_config(**kw) -> DroneConfig:
    base = dict(dataset=CALIBRATION_TEXTS * 3, num_samples=18, eval_samples=6, batch_size=6, tokenizer=TOKENIZER)
    return DroneConfig(**(base | kw))


def assert_untouched(model: BertModel, before: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, DroneLinear) for m in model.modules())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(before[k], state[k]) for k in before)
    assert getattr(model.config, "quantization_config", None) is None


def refuse(kwargs: dict, match: str, **overrides) -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        drone_hf.compress(model, budget_config(**kwargs), show_progress=False, **overrides)
    assert_untouched(model, before)


def test_two_budgets_at_once_are_refused_even_as_overrides() -> None:
    refuse(dict(param_ratio=0.5), "2 budgets", max_loss=0.1)


def test_two_budgets_set_on_the_object_after_it_was_built_are_refused_too() -> None:
    cfg = budget_config(param_ratio=0.5)
    cfg.max_loss = 0.1  # compress re-checks the copy it works on
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="2 budgets"):
        drone_hf.compress(model, cfg, show_progress=False)
    assert_untouched(model, before)


@pytest.mark.parametrize("how", ["override", "attribute"])
def test_a_budget_given_later_replaces_the_default_param_ratio(how) -> None:
    cfg = budget_config()  # no budget: the default param_ratio=0.5
    assert cfg.param_ratio == 0.5 and "_param_ratio_defaulted" not in cfg.to_dict()
    if how == "override":
        model = drone_hf.compress(tiny_bert(), cfg, show_progress=False, max_loss=10.0)
        assert cfg.param_ratio == 0.5 and cfg.max_loss is None  # the caller's object is not changed
    else:
        cfg.max_loss = 10.0
        model = drone_hf.compress(tiny_bert(), cfg, show_progress=False)
    record = model.config.quantization_config
    assert record.param_ratio is None and record.max_loss == 10.0
    budget = record.allocation_result["budget"]
    assert budget["max_loss"] == 10.0 and "param_ratio" not in budget


def test_greedy_at_param_ratio_one_keeps_everything_dense_and_is_refused() -> None:
    """The dense layers already fit a budget of all their weights, so greedy factors nothing; a model
    marked DRONE with no factored layer would save a checkpoint that describes no compression."""
    refuse(dict(param_ratio=1.0), r"param_ratio=1 keeps all 12 targeted layers dense \(allocation='greedy'\).*"
                                  r"allocation='uniform'")
    model = drone_hf.compress(tiny_bert(), budget_config(param_ratio=1.0, allocation="uniform"), show_progress=False)
    assert sum(isinstance(m, DroneLinear) for m in model.modules()) == 12  # uniform: every layer at break-even



@pytest.mark.parametrize("grid", [[], [0, 8], [-4], [8.5], ["8"], (8, 16)])
def test_empty_or_invalid_rank_grid_is_refused(grid) -> None:
    if isinstance(grid, tuple):  # a tuple is accepted and stored as a list
        assert DroneConfig(param_ratio=0.5, allocation="greedy", rank_grid=grid).rank_grid == [8, 16]
        return
    with pytest.raises(ValueError, match=r"rank_grid=.* must be a non-empty list of positive integers"):
        DroneConfig(param_ratio=0.5, allocation="greedy", rank_grid=grid)


def test_rank_grid_with_no_rank_a_layer_can_take_leaves_the_model_dense() -> None:
    refuse(dict(param_ratio=0.5, allocation="greedy", rank_grid=[1000]), r"has no rank that fits .*give ranks in \[1, ")


def test_unreachable_param_ratio_names_the_smallest_reachable_and_leaves_the_model_dense() -> None:
    refuse(dict(param_ratio=0.01, allocation="greedy", rank_grid=[16, 32]),
           r"param_ratio=0.01 cannot be met .*smallest reachable: 0\.\d+.*raise param_ratio")


def test_unreachable_speedup_names_the_best_reachable_and_leaves_the_model_dense(monkeypatch) -> None:
    def slow_overhead(swapper, variants, inputs, repeats=9, warmup=2):
        return {name: 1.0 for name in variants}  # layers are a negligible share of the time

    monkeypatch.setattr(planner_mod, "end_to_end_times", slow_overhead)
    refuse(dict(target_speedup=2.0, allocation="greedy"),
           r"target_speedup=2.0 is out of reach .*best reachable is about 1\.\d\dx.*Ask for at most")


@pytest.mark.parametrize("strategy", ["uniform", "greedy", "drone"])
def test_a_failing_loss_callable_leaves_the_model_dense(strategy) -> None:
    def broken(model):
        raise KeyError("validation split")

    refuse(
        dict(max_loss=0.1, allocation=strategy, loss_fn=broken),
        r"loss_fn raised KeyError: 'validation split'.*not changed",
    )


@pytest.mark.parametrize("value", [float("nan"), "0.1", None, True])
def test_a_loss_callable_returning_no_number_is_refused(value) -> None:
    refuse(dict(max_loss=0.1, allocation="greedy", loss_fn=lambda model: value), r"loss_fn returned .* finite float")


def test_greedy_default_is_the_allocation_and_reaches_what_uniform_reaches() -> None:
    """``allocation`` defaults to greedy. Its default grid (multiples of 8 below break-even) alone
    cannot reach a small budget on narrow layers (64x64: break-even 32, so 8 is 25% of the layer);
    each layer's uniform rank is a candidate too, so any budget uniform meets, greedy meets."""
    assert DroneConfig().allocation == "greedy"
    ratio = 0.2  # uniform rank 6 on the 64x64 layers: below every multiple of 8
    model = drone_hf.compress(tiny_bert(), budget_config(param_ratio=ratio), show_progress=False)
    result = model.config.quantization_config.allocation_result
    assert result["strategy"] == "greedy"
    assert result["targeted_param_ratio"] <= ratio + 1e-9
    ranks = model.config.quantization_config.ranks
    assert ranks and min(ranks.values()) < 8  # the uniform candidate was used where 8 was too coarse
    with pytest.raises(ValueError, match=r"param_ratio=0.2 cannot be met"):  # the same grid without it
        drone_hf.compress(tiny_bert(), budget_config(param_ratio=ratio, rank_grid=[8, 16, 24]), show_progress=False)


def test_walk_hulls_takes_the_cheapest_loss_per_cost_step_of_any_layer_first():
    from drone_hf.allocation import walk_hulls

    hulls = {  # (cost, loss, rank) from dense down, as LayerOptions.hull gives them
        "a": [(100.0, 0.0, None), (60.0, 4.0, 8), (20.0, 40.0, 2)],  # slopes 0.1 then 0.9
        "b": [(50.0, 0.0, None), (30.0, 1.0, 4)],  # slope 0.05
    }
    walk = walk_hulls(hulls)
    assert walk == [(130.0, 1.0, {"b": 4}), (90.0, 5.0, {"a": 8, "b": 4}), (50.0, 41.0, {"a": 2, "b": 4})]
    assert walk_hulls({"a": [(10.0, 0.0, None)]}) == []  # a layer with no cheaper option adds nothing
