"""Distillation loss against hand computations, and inside a stock Trainer run."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import classification_dataset, compressed_classifier, snapshot, training_args
from transformers import DataCollatorWithPadding

from drone_hf.training import DistillationLoss, distillation_trainer
from drone_hf.training.distill import infer_task


def softmax(row: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kd_by_hand(s: list[float], t: list[float], T: float) -> float:
    """T² · Σ_c p_t(c) · log(p_t(c) / p_s(c)) with plain floats."""
    ps, pt = softmax(s, T), softmax(t, T)
    return T * T * sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))


def ce_by_hand(s: list[float], y: int) -> float:
    return -math.log(softmax(s, 1.0)[y])


def out(logits, hidden=None):
    return SimpleNamespace(logits=torch.tensor(logits, dtype=torch.float64), hidden_states=hidden)


S = [[1.0, -0.5, 0.25], [0.2, 0.1, -1.5], [-0.3, 2.0, 0.4]]
T_ = [[0.5, 0.0, 1.0], [1.2, -0.7, 0.3], [0.0, 1.5, -0.2]]
Y = [2, 0, 1]


def test_classification_loss_matches_the_hand_computation():
    loss = DistillationLoss(torch.nn.Linear(1, 1), temperature=2.0, alpha=0.3, task="sequence_classification")
    got = loss.compute(out(S), out(T_), torch.tensor(Y))
    expected = sum(0.3 * kd_by_hand(s, t, 2.0) + 0.7 * ce_by_hand(s, y) for s, t, y in zip(S, T_, Y, strict=True)) / 3
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Trainer's gradient-accumulation accounting: the sum over this batch's items / items of the whole step
    scaled = loss.compute(out(S), out(T_), torch.tensor(Y), num_items_in_batch=torch.tensor(7))
    assert float(scaled) == pytest.approx(expected * 3 / 7, rel=1e-6)
    # ignored rows (-100) are not items; without labels the loss is the KL alone
    masked = loss.compute(out(S), out(T_), torch.tensor([Y[0], -100, Y[2]]))
    assert float(masked) == pytest.approx(
        sum(0.3 * kd_by_hand(S[i], T_[i], 2.0) + 0.7 * ce_by_hand(S[i], Y[i]) for i in (0, 2)) / 2, rel=1e-6
    )
    assert float(loss.compute(out(S), out(T_), None)) == pytest.approx(
        sum(map(kd_by_hand, S, T_, [2.0] * 3)) / 3, rel=1e-6
    )


def test_alpha_extremes_and_identical_models():
    pure_kd = DistillationLoss(torch.nn.Linear(1, 1), temperature=3.0, alpha=1.0, task="sequence_classification")
    assert float(pure_kd.compute(out(T_), out(T_), torch.tensor(Y))) == pytest.approx(0.0, abs=1e-12)
    task_only = DistillationLoss(torch.nn.Linear(1, 1), alpha=0.0, task="sequence_classification")
    got = task_only.compute(out(S), out(T_), torch.tensor(Y))
    assert float(got) == pytest.approx(float(torch.nn.functional.cross_entropy(torch.tensor(S), torch.tensor(Y))))


def test_causal_lm_shifts_and_skips_ignored_tokens():
    """Position i predicts token i+1; labels of -100 (and the last position) are not items."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[3, 1, 4, -100], [-100, 2, 0, 1]])
    loss = DistillationLoss(torch.nn.Linear(1, 1), temperature=1.5, alpha=0.6, task="causal_lm")
    got = loss.compute(out(s.tolist()), out(t.tolist()), labels)
    items = []
    for b in range(2):
        for i in range(3):
            y = int(labels[b, i + 1])
            if y != -100:
                items.append(
                    0.6 * kd_by_hand(s[b, i].tolist(), t[b, i].tolist(), 1.5) + 0.4 * ce_by_hand(s[b, i].tolist(), y)
                )
    assert len(items) == 5
    assert float(got) == pytest.approx(sum(items) / 5, rel=1e-6)


def test_label_free_causal_lm_keeps_the_positions_whose_next_token_is_real():
    """Pure distillation on raw text (no labels): position i is an item when token i+1 is real, as the
    attention mask says; without a mask every shifted position is one."""
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss = DistillationLoss(torch.nn.Linear(1, 1), temperature=1.5, task="causal_lm")
    got = loss.compute(out(s.tolist()), out(t.tolist()), None, attention_mask=mask)
    items = [kd_by_hand(s[b, i].tolist(), t[b, i].tolist(), 1.5) for b in range(2) for i in range(3)
             if mask[b, i + 1]]
    assert len(items) == 5
    assert float(got) == pytest.approx(sum(items) / 5, rel=1e-6)
    unmasked = loss.compute(out(s.tolist()), out(t.tolist()), None)
    every = [kd_by_hand(s[b, i].tolist(), t[b, i].tolist(), 1.5) for b in range(2) for i in range(3)]
    assert float(unmasked) == pytest.approx(sum(every) / 6, rel=1e-6)


def test_hidden_state_mse_over_real_tokens_and_layers():
    h_s = [torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])]
    h_t = [torch.tensor([[[0.0, 2.0], [0.0, 0.0]]]), torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])]
    mask = torch.tensor([[1, 0]])  # the second token is padding: its (large) errors must not count
    loss = DistillationLoss(torch.nn.Linear(1, 1), alpha=1.0, hidden_weight=0.5, task="sequence_classification")
    logits = [[0.0, 1.0]]
    got = loss.compute(out(logits, h_s), out(logits, h_t), None, attention_mask=mask)
    layer0 = ((1 - 0) ** 2 + (2 - 2) ** 2) / 2
    layer1 = ((0 - 1) ** 2 + (0 - 1) ** 2) / 2
    assert float(got) == pytest.approx(0.5 * (layer0 + layer1) / 2)
    assert float(loss.last["hidden"]) == pytest.approx((layer0 + layer1) / 2)


def test_regression_uses_squared_differences():
    loss = DistillationLoss(torch.nn.Linear(1, 1), alpha=0.25, task="regression")
    got = loss.compute(out([[1.0], [2.0]]), out([[0.5], [3.0]]), torch.tensor([1.5, 1.0]))
    expected = (0.25 * (0.25 + 1.0) + 0.75 * (0.25 + 1.0)) / 2
    assert float(got) == pytest.approx(expected)


def test_multi_label_is_one_binary_kl_and_cross_entropy_per_label_entry():
    """problem_type="multi_label_classification": independent yes/no per label, averaged over the
    (row, label) entries Trainer counts; the softmax form flattened the logits and failed."""
    from transformers import BertConfig, BertForSequenceClassification

    def bern_kl(s: float, t: float, T: float) -> float:
        ps, pt = 1 / (1 + math.exp(-s / T)), 1 / (1 + math.exp(-t / T))
        return T * T * (pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))

    def bce(s: float, y: float) -> float:
        p = 1 / (1 + math.exp(-s))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    labels = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    loss = DistillationLoss(torch.nn.Linear(1, 1), temperature=2.0, alpha=0.3, task="multi_label_classification")
    got = loss.compute(out(S), out(T_), torch.tensor(labels, dtype=torch.float64))
    pairs = [(S[i][c], T_[i][c], labels[i][c]) for i in range(3) for c in range(3)]
    expected = sum(0.3 * bern_kl(s, t, 2.0) + 0.7 * bce(s, y) for s, t, y in pairs) / 9
    assert float(got) == pytest.approx(expected, rel=1e-6)
    scaled = loss.compute(out(S), out(T_), torch.tensor(labels), num_items_in_batch=torch.tensor(18))
    assert float(scaled) == pytest.approx(expected / 2, rel=1e-6)  # half of the step's 18 label entries
    assert float(loss.compute(out(T_), out(T_), None)) == pytest.approx(0.0, abs=1e-12)  # KL of a model to itself
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=3,
                                                     problem_type="multi_label_classification"))
    assert infer_task(model) == "multi_label_classification"


def test_bad_input_names_the_fix(tok):
    dense, student = compressed_classifier(tok)
    with pytest.raises(ValueError, match="temperature=0 must be a number > 0"):
        DistillationLoss(dense, temperature=0)
    with pytest.raises(ValueError, match=r"alpha=1.5 must be a number in \[0, 1\]"):
        DistillationLoss(dense, alpha=1.5)
    with pytest.raises(ValueError, match="task='ner'"):
        DistillationLoss(dense, task="ner")
    with pytest.raises(ValueError, match="compress a copy"):
        DistillationLoss(student).attach(student)
    shared = copy.deepcopy(student)
    shared.classifier = student.classifier
    with pytest.raises(ValueError, match="shares 2 parameter tensor"):
        DistillationLoss(shared).attach(student)
    assert all(p.requires_grad for p in student.parameters())  # a refused attach froze nothing
    with pytest.raises(ValueError, match=r"call \.attach\(student\)"):
        DistillationLoss(dense)(SimpleNamespace(logits=torch.zeros(1, 3)), None)
    with pytest.raises(ValueError, match="compute_loss_func itself"):
        distillation_trainer(student, dense, compute_loss_func=lambda *a, **k: 0)


def test_trainer_step_loss_is_the_distillation_loss_and_the_teacher_stays_put(tok, tmp_path):
    dense, student = compressed_classifier(tok)
    dense.train()  # the loss must switch it to eval (dropout is off here, the mode is what is checked)
    data = classification_dataset(tok, n=8)
    teacher_before = snapshot(dense)
    batch = DataCollatorWithPadding(tok)([data[i] for i in range(8)])
    labels = batch.pop("labels")
    with torch.no_grad():
        s_out, t_out = student(**batch, output_hidden_states=True), dense.eval()(**batch, output_hidden_states=True)
    loss = DistillationLoss(dense, temperature=2.0, alpha=0.7, hidden_weight=0.5)
    expected = float(loss.compute(s_out, t_out, labels, attention_mask=batch["attention_mask"]))
    dense.train()

    trainer = distillation_trainer(
        student,
        dense,
        training_args(tmp_path, per_device_train_batch_size=8),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tok),
        temperature=2.0,
        alpha=0.7,
        hidden_weight=0.5,
    )  # one batch = the whole set: step 1 sees exactly `batch`
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(expected, rel=1e-3)
    loss_obj = trainer.compute_loss_func
    assert loss_obj.task == "sequence_classification" and set(loss_obj.last) == {"kd", "task", "hidden", "loss"}
    assert not dense.training and not any(p.requires_grad for p in dense.parameters())
    assert all(torch.equal(teacher_before[n], p) for n, p in dense.named_parameters())
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not held & {id(p) for p in dense.parameters()}
    assert held == {id(p) for p in student.parameters()}
    # evaluation: the hidden term is training-only, so predictions stay plain logits
    prediction = trainer.predict(data)
    assert prediction.predictions.shape == (8, 3) and math.isfinite(prediction.metrics["test_loss"])
    loss_obj.detach()  # done distilling: the dense model is trainable again, the student's hook is gone
    assert all(p.requires_grad for p in dense.parameters()) and not student._forward_pre_hooks


def test_label_free_distillation_loss_does_not_grow_with_gradient_accumulation(tok, tmp_path):
    """Without labels Trainer counts no items, so each micro-batch's loss is its own mean, and it does
    not divide a compute_loss_func's loss by the accumulation steps: 2 x 4 rows must log the loss of
    1 x 8 rows, not twice it."""
    dense, student = compressed_classifier(tok)
    with torch.no_grad():  # a student visibly unlike its teacher: a loss well above round-off
        student.classifier.weight.add_(torch.randn(student.classifier.weight.shape, generator=torch.Generator()
                                                   .manual_seed(0)))
    rows = classification_dataset(tok, n=8).remove_columns("labels")
    logged = {}
    for accumulation, batch in ((1, 8), (2, 4)):
        trainer = distillation_trainer(
            copy.deepcopy(student), dense,
            training_args(tmp_path / str(accumulation), per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation, max_steps=1),
            train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
        )
        trainer.train()
        logged[accumulation] = trainer.state.log_history[0]["loss"]
    assert logged[1] > 1e-3 and logged[2] == pytest.approx(logged[1], rel=1e-3)


def test_multi_label_distillation_trains_in_a_trainer(tok, tmp_path):
    dense, student = compressed_classifier(tok, problem_type="multi_label_classification")
    rows = classification_dataset(tok, n=8)
    rows = rows.map(lambda r: {"labels": [float(r["labels"] == c) for c in range(3)]})
    trainer = distillation_trainer(student, dense, training_args(tmp_path, per_device_train_batch_size=8),
                                   train_dataset=rows, data_collator=DataCollatorWithPadding(tok))
    assert trainer.compute_loss_func.task == "multi_label_classification"
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"]) and trainer.state.log_history[0]["loss"] > 0
