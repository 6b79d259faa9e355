"""Multiple-choice models (``…ForMultipleChoice``) calibrate on plain text, one choice per text."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer
from transformers import BertForMultipleChoice, BertModel

import drone_hf
from drone_hf import DroneConfig, DroneLinear


@pytest.fixture(scope="module")
def dense() -> BertForMultipleChoice:
    torch.manual_seed(0)
    return BertForMultipleChoice(bert_config()).eval()


def _config(**kw) -> DroneConfig:
    return DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tokenizer(), **kw)


def _choices(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (2, 3, 12), generator=gen)  # 2 questions x 3 choices
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_statistics_equal_the_bare_encoders_on_the_same_texts(dense):
    """The encoder must see each calibration text exactly as the bare encoder would: the factors of
    every layer then equal those of compressing the encoder alone with the same settings."""
    model = drone_hf.compress(copy.deepcopy(dense), _config(allocation="uniform"), show_progress=False)
    encoder = BertModel(bert_config()).eval()
    encoder.load_state_dict(dense.bert.state_dict())
    alone = drone_hf.compress(encoder, _config(allocation="uniform"), show_progress=False)
    factored = {n: m for n, m in alone.named_modules() if isinstance(m, DroneLinear)}
    assert len(factored) == 12  # 2 layers x 6 projections
    for name, layer in factored.items():
        mine = model.get_submodule(f"bert.{name}")
        assert isinstance(mine, DroneLinear) and mine.rank == layer.rank
        torch.testing.assert_close(mine.merged_weight(), layer.merged_weight(), rtol=1e-5, atol=1e-6)
    assert not model._forward_pre_hooks  # the one-choice feed is gone after compression
    with torch.no_grad():
        assert model(**_choices()).logits.shape == (2, 3)


@pytest.mark.parametrize("options", [dict(allocation="greedy"), dict(allocation="uniform", sequential="compensated"),
                                     dict(allocation="uniform", compress_attention=True)])
def test_allocation_and_calibration_modes_run_and_stay_close(dense, options):
    model = drone_hf.compress(copy.deepcopy(dense), _config(param_ratio=0.9, **options), show_progress=False)
    assert any(isinstance(m, DroneLinear) for m in model.modules())
    with torch.no_grad():
        got, want = model(**_choices()).logits, dense(**_choices()).logits
    assert got.shape == (2, 3)
    assert float((got - want).norm() / want.norm()) < 0.5


def test_from_pretrained_and_the_checkpoint_round_trip(dense, tmp_path):
    dense.save_pretrained(tmp_path / "dense")
    tokenizer().save_pretrained(tmp_path / "dense")
    model = BertForMultipleChoice.from_pretrained(tmp_path / "dense", drone_config=DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=8, allocation="uniform")).eval()
    model.save_pretrained(tmp_path / "drone")
    again = BertForMultipleChoice.from_pretrained(tmp_path / "drone").eval()
    assert sum(isinstance(m, DroneLinear) for m in again.modules()) == 12
    with torch.no_grad():
        assert torch.equal(again(**_choices(1)).logits, model(**_choices(1)).logits)


@pytest.mark.parametrize("options, message", [
    (dict(method="fwsvd"), "method='fwsvd' weighs layers by gradients of the model's loss"),
    (dict(method="drone-kfac"), "each text is one choice: the loss is constant"),
    (dict(eval_loss="logit_kl"), "eval_loss='logit_kl' compares the answer distribution of BertForMultipleChoice"),
])
def test_losses_that_need_answer_choices_are_refused(dense, options, message):
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        drone_hf.compress(model, _config(**options), show_progress=False)
    assert not any(isinstance(m, DroneLinear) for m in model.modules())


def test_the_feed_is_removed_when_compression_fails(dense):
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="matches no linear layer"):
        drone_hf.compress(model, _config(target_modules=["nope"]), show_progress=False)
    assert not model._forward_pre_hooks
