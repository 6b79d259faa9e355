"""A shallower student (``shallow_student``): exact layer surgery, cache renumbering, save/load, and
distillation that aligns each kept layer with the teacher layer it came from."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny_models import CALIBRATION_TEXTS, gpt2_config, llama_config, sample_inputs
from trainer_helpers import classification_dataset, dense_classifier, snapshot, training_args
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorWithPadding

import drone_hf
from drone_hf.modules.low_rank_linear import DroneLinear
from drone_hf.training import DistillationLoss, distillation_trainer, shallow_student, spread_layers
from drone_hf.training.shallow import hidden_state_map


def test_spread_layers_keeps_the_last_layer_and_spreads_the_rest():
    assert spread_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert spread_layers(12, 4) == [2, 5, 8, 11]
    assert spread_layers(6, 3) == [1, 3, 5]
    assert spread_layers(3, 2) == [0, 2]
    assert spread_layers(5, 5) == [0, 1, 2, 3, 4]
    assert spread_layers(7, 1) == [6]
    with pytest.raises(ValueError, match="Cannot keep 0 of 4 layers"):
        spread_layers(4, 0)


def bert4(seed: int = 0):
    return dense_classifier(seed, num_hidden_layers=4)


def test_student_runs_exactly_the_kept_teacher_layers_and_leaves_the_teacher_alone(tok):
    teacher = bert4()
    before = snapshot(teacher)
    student = shallow_student(teacher, layers=[0, 2])
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert student.config.drone_teacher_layers == [0, 2]
    assert len(teacher.bert.encoder.layer) == 4 and teacher.config.num_hidden_layers == 4
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}  # a copy

    # the student is the teacher with layers 1 and 3 made identities: rebuild that by hand and compare
    inputs = tok(["A film that knows what it wants.", "Dull."], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = student(**inputs, output_hidden_states=True)
        by_hand = copy.deepcopy(teacher)
        by_hand.bert.encoder.layer = torch.nn.ModuleList([by_hand.bert.encoder.layer[i] for i in (0, 2)])
        by_hand.config.num_hidden_layers = 2
        want = by_hand(**inputs, output_hidden_states=True)
        full = teacher(**inputs, output_hidden_states=True)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.hidden_states[0], full.hidden_states[0])  # embeddings untouched
    assert torch.equal(got.hidden_states[1], full.hidden_states[1])  # layer 0 sees the same input
    assert not torch.allclose(got.logits, full.logits)  # two layers fewer: a different function

    same = shallow_student(teacher, num_layers=4)  # keeping everything is the teacher itself
    with torch.no_grad():
        assert torch.equal(same(**inputs).logits, full.logits)
    assert hidden_state_map(student) == {0: 0, 1: 1, 2: 3}
    assert hidden_state_map(teacher) is None


@pytest.mark.parametrize("make_config", [llama_config, gpt2_config], ids=["llama", "gpt2"])
def test_decoder_student_renumbers_its_cache_slots(make_config):
    """Generation with the KV cache must equal generation without it: each kept attention layer
    writes to its own (renumbered) cache slot."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cls = LlamaForCausalLM if make_config is llama_config else GPT2LMHeadModel
    torch.manual_seed(0)
    teacher = cls(make_config(**({"num_hidden_layers": 4} if cls is LlamaForCausalLM else {"n_layer": 4}))).eval()
    student = shallow_student(teacher, layers=[1, 3])
    indices = [m.layer_idx for m in student.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert indices and set(indices) == {0, 1}
    types = getattr(student.config, "layer_types", None)
    if types is not None:
        assert len(types) == 2
    prompt = torch.tensor([[101, 2023, 3185, 2003]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(prompt, use_cache=True, **settings)
        plain = student.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, plain)


def test_saved_student_reloads_exactly_dense_and_compressed(tok, tmp_path):
    teacher = bert4()
    student = shallow_student(teacher, num_layers=2)
    inputs = sample_inputs()
    student.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.drone_teacher_layers == [1, 3]
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, student(**inputs).logits)

    # uniform ranks factor every layer (greedy may keep some dense)
    cfg = drone_hf.DroneConfig(param_ratio=0.5, dataset=CALIBRATION_TEXTS, tokenizer=tok, allocation="uniform")
    compressed = drone_hf.compress(student, cfg, show_progress=False)
    assert sum(isinstance(m, DroneLinear) for m in compressed.modules()) == 2 * 6  # q k v o + 2 FFN per layer
    compressed.save_pretrained(tmp_path / "drone")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "drone").eval()
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, compressed(**inputs).logits)
    assert back.config.drone_teacher_layers == [1, 3]


def test_shallow_student_of_a_compressed_teacher_keeps_its_factors(tok):
    teacher = bert4()
    cfg = drone_hf.DroneConfig(param_ratio=0.5, dataset=CALIBRATION_TEXTS, tokenizer=tok)
    compressed = drone_hf.compress(copy.deepcopy(teacher), cfg, show_progress=False)
    student = shallow_student(compressed, num_layers=1)
    assert student.config.drone_teacher_layers == [3]
    factored = [n for n, m in student.named_modules() if isinstance(m, DroneLinear)]
    assert len(factored) == 6 and all(n.startswith("bert.encoder.layer.0.") for n in factored)
    with torch.no_grad():
        assert student(**sample_inputs()).logits.shape == (2, 3)


def test_shallow_student_of_a_compressed_teacher_saves_and_reloads(tok, tmp_path):
    """The records name layers by the teacher's numbers; the student's layer 0 is teacher layer 1, so
    they are renumbered (cut layers dropped) or the reload rebuilds layer 0 at teacher layer 0's rank."""
    from transformers import AutoModelForSequenceClassification

    cfg = drone_hf.DroneConfig(param_ratio=0.5, dataset=CALIBRATION_TEXTS, tokenizer=tok, allocation="uniform",
                               ranks={"encoder.layer.0.attention.self.query": 2})  # layer 0 unlike layers 1 and 3
    compressed = drone_hf.compress(bert4(), cfg, show_progress=False)
    student = shallow_student(compressed, layers=[1, 3])
    record = student.config.quantization_config
    teacher_record = compressed.config.quantization_config
    kept = [k for k in teacher_record.ranks if k.startswith(("encoder.layer.1.", "encoder.layer.3."))]
    assert set(record.ranks) == {k.replace("layer.1.", "layer.0.").replace("layer.3.", "layer.1.") for k in kept}
    assert record.ranks["encoder.layer.0.attention.self.query"] == teacher_record.ranks[
        "encoder.layer.1.attention.self.query"] != 2
    assert teacher_record.ranks["encoder.layer.0.attention.self.query"] == 2  # the teacher's record is untouched
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**sample_inputs()).logits, student(**sample_inputs()).logits)


def test_bad_input_names_the_fix():
    teacher = bert4()
    with pytest.raises(ValueError, match="exactly one of num_layers"):
        shallow_student(teacher)
    with pytest.raises(ValueError, match="exactly one of num_layers"):
        shallow_student(teacher, 2, layers=[0, 1])
    with pytest.raises(ValueError, match="Cannot keep 5 of 4 layers"):
        shallow_student(teacher, 5)
    with pytest.raises(ValueError, match=r"num_layers=2.0 must be an integer"):
        shallow_student(teacher, 2.0)
    with pytest.raises(ValueError, match=r"strictly increasing indices in \[0, 3\]"):
        shallow_student(teacher, layers=[2, 1])
    with pytest.raises(ValueError, match=r"strictly increasing indices in \[0, 3\]"):
        shallow_student(teacher, layers=[0, 4])
    with pytest.raises(ValueError, match="non-empty list of integer layer indices"):
        shallow_student(teacher, layers=[])
    with pytest.raises(ValueError, match="non-empty list of integer layer indices"):
        shallow_student(teacher, layers=[0, 1.5])
    with pytest.raises(ValueError, match="no integer num_hidden_layers"):
        shallow_student(torch.nn.Linear(2, 2), 1)

    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        shallow_student(t5, 1)


def test_hidden_state_pairs_by_hand():
    """A dict pairs student and teacher hidden states explicitly; the MSE is averaged over pairs."""
    h_s = [torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[2.0, 0.0]]])]
    h_t = [torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[9.0, 9.0]]]), torch.tensor([[[2.0, 2.0]]])]
    loss = DistillationLoss(
        torch.nn.Linear(1, 1),
        alpha=1.0,
        hidden_weight=1.0,
        hidden_layers={0: 0, 1: 2},
        task="sequence_classification",
    )
    logits = SimpleNamespace(logits=torch.zeros(1, 2), hidden_states=h_s)
    teacher = SimpleNamespace(logits=torch.zeros(1, 2), hidden_states=h_t)
    got = loss.compute(logits, teacher, None)
    assert float(loss.last["hidden"]) == pytest.approx(((1.0 + 0.0) / 2 + (0.0 + 4.0) / 2) / 2)
    assert float(got) == pytest.approx(float(loss.last["hidden"]))
    bad = DistillationLoss(
        torch.nn.Linear(1, 1), hidden_weight=1.0, hidden_layers={0: 5}, task="sequence_classification"
    )
    with pytest.raises(ValueError, match="teacher hidden state 5, but the student returns 2 and the teacher 3"):
        bad.compute(logits, teacher, None)
    with pytest.raises(ValueError, match=r"a dict \{student index: teacher index\}"):
        DistillationLoss(torch.nn.Linear(1, 1), hidden_layers={0: "a"})


def test_distillation_aligns_a_shallow_student_with_its_teacher_layers(tok, tmp_path):
    teacher = bert4()
    student = shallow_student(teacher, num_layers=2)  # teacher layers 1 and 3
    data = classification_dataset(tok, n=8)
    batch = DataCollatorWithPadding(tok)([data[i] for i in range(8)])
    labels = batch.pop("labels")
    with torch.no_grad():
        s_out, t_out = student(**batch, output_hidden_states=True), teacher(**batch, output_hidden_states=True)
    explicit = DistillationLoss(teacher, alpha=0.5, hidden_weight=0.5, hidden_layers={0: 0, 1: 2, 2: 4})
    expected = float(explicit.compute(s_out, t_out, labels, attention_mask=batch["attention_mask"]))
    # same-index pairing would be a different (wrong) number: the map matters
    naive = DistillationLoss(teacher, alpha=0.5, hidden_weight=0.5, hidden_layers=[0, 1, 2])
    assert float(naive.compute(s_out, t_out, labels, attention_mask=batch["attention_mask"])) != pytest.approx(expected)

    trainer = distillation_trainer(
        student,
        teacher,
        training_args(tmp_path, per_device_train_batch_size=8),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tok),
        alpha=0.5,
        hidden_weight=0.5,
    )
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(expected, rel=1e-3)

    # distilling from a model it was not cut from is refused with the fix
    wrong = DistillationLoss(shallow_student(teacher, num_layers=1), hidden_weight=1.0).attach(student)
    with pytest.raises(ValueError, match="distil it from the model shallow_student"):
        wrong.compute(s_out, SimpleNamespace(logits=t_out.logits, hidden_states=t_out.hidden_states[:2]), labels)


def test_causal_lm_student_loads_through_auto_class(tmp_path):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM(llama_config(num_hidden_layers=3)).eval()
    student = shallow_student(teacher, num_layers=2)
    student.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[101, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, student(ids).logits)
    assert back.config.drone_teacher_layers == [0, 2]


@pytest.mark.parametrize("make_config", [llama_config, gpt2_config], ids=["llama", "gpt2"])
def test_a_decoder_students_normed_last_state_is_compared_with_the_teachers_normed_state(make_config):
    """Decoders return their last hidden state after the final norm. A student cut as the teacher's
    first layers is, before training, exactly those layers: the hidden-state term must be 0, so the
    teacher's state after the student's last kept layer goes through the teacher's final norm."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cls = LlamaForCausalLM if make_config is llama_config else GPT2LMHeadModel
    torch.manual_seed(0)
    teacher = cls(make_config(**({"num_hidden_layers": 4} if cls is LlamaForCausalLM else {"n_layer": 4}))).eval()
    student = shallow_student(teacher, layers=[0, 1])
    loss = DistillationLoss(teacher, hidden_weight=1.0, task="causal_lm").attach(student)
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        s_out = student(input_ids=ids, output_hidden_states=True)
        t_out = teacher(input_ids=ids, output_hidden_states=True)
        assert float(loss._hidden_mse(s_out, t_out, None)) < 1e-10
        assert not torch.allclose(s_out.hidden_states[2], t_out.hidden_states[2], atol=1e-3)  # normed vs not
    loss.detach()


def test_layer_index_scaled_attention_is_refused():
    from transformers import GPT2LMHeadModel

    teacher = GPT2LMHeadModel(gpt2_config(n_layer=4, scale_attn_by_inverse_layer_idx=True)).eval()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True: each layer's attention is scaled"):
        shallow_student(teacher, layers=[0, 3])
