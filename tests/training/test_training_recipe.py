"""The recipe script end to end on tiny models: classification and causal LM."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from tiny_models import CALIBRATION_TEXTS, save_tiny
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from drone_hf import DroneLinear
from drone_hf.training.recipe import RESULTS_FILE, RecipeConfig, evaluate_classifier, load_labelled, load_metric

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_after_compression.py"


def example_main():
    spec = importlib.util.spec_from_file_location("finetune_after_compression", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.main


def factored(folder: Path, cls) -> int:
    return sum(isinstance(m, DroneLinear) for m in cls.from_pretrained(folder).modules())


def test_packaged_accuracy_metric_loads_offline():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 0]) == {"accuracy": 0.5}


def test_sequence_classification_recipe(tmp_path, capsys):
    model_dir = save_tiny("bert-seq-cls", tmp_path / "dense")
    rows = [{"sentence": t + f" ({i})", "y": i % 3} for i, t in enumerate(CALIBRATION_TEXTS * 3)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    results = example_main()(
        [
            "sequence-classification",
            "--model",
            str(model_dir),
            "--train-file",
            str(data),
            "--text-column",
            "sentence",
            "--label-column",
            "y",
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--alpha",
            "0.5",
            "--hidden-weight",
            "0.1",
            "--calibration-samples",
            "8",
            "--max-length",
            "32",
            "--train",
            "factors",
        ]
    )
    assert results["metric"] == "accuracy"
    assert all(0.0 <= results[k] <= 1.0 for k in ("dense", "compressed_before", "compressed_after"))
    assert results["stats"]["drone/factored_layers"] == 12
    assert json.loads((out / RESULTS_FILE).read_text())["compressed_after"] == results["compressed_after"]
    assert capsys.readouterr().out.rstrip().endswith("}")  # the CLI prints the results last
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert sum(isinstance(m, DroneLinear) for m in reloaded.modules()) == 12
    evals = load_labelled(data, "sentence", "y")
    assert evals.column_names == ["text", "label"] and len(evals) == len(rows)
    from transformers import AutoTokenizer

    from drone_hf.training.recipe import split_dataset, tokenize_classification

    tok = AutoTokenizer.from_pretrained(out)
    _, test = split_dataset(evals, 0.2, 0)
    assert evaluate_classifier(reloaded, tokenize_classification(test, tok, 32), tok) == pytest.approx(
        results["compressed_after"]
    )


def test_causal_lm_recipe(tmp_path):
    model_dir = save_tiny("gpt2-lm", tmp_path / "dense")
    (tmp_path / "train.txt").write_text("\n".join(CALIBRATION_TEXTS * 4) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(reversed(CALIBRATION_TEXTS)) + "\n")
    out = tmp_path / "out"
    results = example_main()(
        [
            "causal-lm",
            "--model",
            str(model_dir),
            "--train-file",
            str(tmp_path / "train.txt"),
            "--eval-file",
            str(tmp_path / "eval.txt"),
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "16",
            "--calibration-samples",
            "8",
        ]
    )
    assert results["metric"] == "perplexity"
    assert all(math.isfinite(results[k]) and results[k] > 1 for k in ("dense", "compressed_before", "compressed_after"))
    assert factored(out, AutoModelForCausalLM) == results["stats"]["drone/factored_layers"] > 0


def test_recipe_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="use one of"):
        RecipeConfig(task="translation", model="m", output_dir="o")
    with pytest.raises(ValueError, match="needs labelled data"):
        RecipeConfig(task="sequence-classification", model="m", output_dir="o")
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"sentence": "a", "y": 1}\n')
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\]"):
        load_labelled(bad)
    with pytest.raises(SystemExit):
        example_main()(["sequence-classification", "--model", "m", "--output", str(tmp_path / "o")])


def test_class_names_as_labels_become_the_models_class_ids(tmp_path):
    """A labelled file may name classes as the model does (config.label2id), as drone-hf eval accepts;
    the recipe tokenized the names as they were and the first batch failed to become a tensor."""
    from drone_hf.training.recipe import _load

    model_dir = save_tiny("bert-seq-cls", tmp_path / "dense")  # label2id: LABEL_0, LABEL_1, LABEL_2
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', '')},LABEL_{i % 3}\n"
                                             for i, t in enumerate(CALIBRATION_TEXTS)))
    cfg = RecipeConfig(task="sequence-classification", model=str(model_dir), train_file=str(data), max_length=16,
                       output_dir=str(tmp_path / "out"))
    _, _, train, evals, _ = _load(cfg)
    labels = sorted(list(train["labels"]) + list(evals["labels"]))
    assert labels == sorted(i % 3 for i in range(len(CALIBRATION_TEXTS)))
    data.write_text("text,label\nA text.,LABEL_9\nAnother.,LABEL_0\nThird.,LABEL_1\nFourth.,LABEL_2\nFifth.,LABEL_0\n")
    with pytest.raises(ValueError, match=r"label 'LABEL_9' is neither an integer class id nor one of the model's"):
        _load(cfg)


def test_extra_overrides_the_recipes_own_training_arguments(tmp_path):
    """RecipeConfig.extra takes any TrainingArguments field, including those the recipe sets."""
    from drone_hf.training.recipe import training_arguments

    cfg = RecipeConfig(task="causal-lm", model="m", train_file="t.txt", output_dir=str(tmp_path),
                       extra={"save_strategy": "steps", "save_steps": 7, "use_cpu": True, "warmup_steps": 3})
    args = training_arguments(cfg)
    assert (args.save_strategy, args.save_steps, args.use_cpu, args.warmup_steps) == ("steps", 7, True, 3)
    plain = training_arguments(RecipeConfig(task="causal-lm", model="m", train_file="t.txt", output_dir=str(tmp_path)))
    assert plain.save_strategy == "no" and plain.learning_rate == cfg.learning_rate
