"""The drone-hf command line: the demo, saving, pushing, inspect / eval / bench / merge, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hub.fake_hub import FakeHub
from tiny_models import CALIBRATION_TEXTS, sample_inputs, save_tiny
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import drone_hf
from drone_hf import DroneConfig, DroneLinear
from drone_hf.cli import main


def test_compress_saves_a_reloadable_checkpoint(tmp_path, capsys):
    src = save_tiny("bert", tmp_path / "dense")
    out = tmp_path / "out"
    code = main(["compress", str(src), "--param-ratio", "0.3", "--num-samples", "16", "--eval-batches", "1",
                 "--output", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "layers factored" in text and "Held-out fidelity" in text and "speedup" in text
    model = AutoModel.from_pretrained(out)
    assert any(isinstance(m, DroneLinear) for m in model.modules())
    assert (out / "tokenizer.json").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())  # no temporary left behind
    with torch.no_grad():
        model(**sample_inputs())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--param-ratio", "1.5"], "param_ratio=1.5 must be a number in (0, 1]"),
        (["--target-modules", "nope"], "target_modules entry 'nope' matches no linear layer"),
        (["--dataset", "missing.txt"], "neither a built-in corpus"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, extra, message):
    src = save_tiny("bert", tmp_path / "dense")
    capsys.readouterr()  # drop the progress bars of building the fixture
    assert main(["compress", str(src), "--no-eval", *extra]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]  # progress bars of loading may precede it
    assert last.startswith("drone-hf: error:") and message in last


@pytest.mark.parametrize("count", ["0", "-2"])
def test_eval_batches_must_be_positive_before_anything_loads(tmp_path, capsys, count):
    """0 measured nothing and failed after the whole compression, with nothing saved; -2 measured most
    of the corpus. argparse refuses both before the model is read."""
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tmp_path / "no-such-model"), "--eval-batches", count])
    assert exit_info.value.code == 2
    assert f"argument --eval-batches: {int(count)} must be at least 1" in capsys.readouterr().err


def test_output_must_be_new_and_not_the_source(tmp_path, capsys):
    src = save_tiny("bert", tmp_path / "dense")
    assert main(["compress", str(src), "--no-eval", "--output", str(src)]) == 2
    assert "is the source model folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert main(["compress", str(src), "--no-eval", "--output", str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "user data"


def test_allocation_option_reaches_the_config_and_bad_choices_are_refused(tmp_path, capsys):
    src = save_tiny("bert", tmp_path / "dense")
    assert main(["compress", str(src), "--allocation", "uniform", "--num-samples", "16", "--no-eval"]) == 0
    text = capsys.readouterr().out
    # uniform ranks factor every one of the tiny BERT's 12 targets (greedy may keep some dense)
    assert "param_ratio=0.5 (uniform)" in text and "12 layers factored" in text and "allocation greedy" not in text
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit status 2
        main(["compress", str(src), "--allocation", "drone", "--no-eval"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'drone' (choose from" in capsys.readouterr().err


def test_eval_loss_option_reaches_the_allocation(tmp_path, capsys):
    src = save_tiny("bert-seq-cls", tmp_path / "dense")
    args = ["compress", str(src), "--model-class", "sequence-classification", "--num-samples", "24", "--no-eval"]
    assert main([*args, "--eval-loss", "distortion"]) == 0
    assert "evaluation loss distortion" in capsys.readouterr().out
    assert main(args) == 0
    assert "evaluation loss logit_kl" in capsys.readouterr().out  # auto: the classifier's output distribution


def test_compress_prune_mlp_writes_pruned_widths(tmp_path, capsys):
    src = save_tiny("llama-gqa-lm", tmp_path / "dense")
    out = tmp_path / "pruned"
    args = ["compress", str(src), "--model-class", "causal-lm", "--num-samples", "24", "--param-ratio", "0.6",
            "--method", "drone-kfac", "--prune-mlp", "--no-eval", "--output", str(out)]
    assert main(args) == 0
    assert "MLP blocks width-pruned" in capsys.readouterr().out
    widths = json.loads((out / "config.json").read_text())["quantization_config"]["mlp_widths"]
    assert widths and all(w["width"] < w["original"] for w in widths.values())
    assert main(["inspect", str(out)]) == 0
    assert "mlp widths:" in capsys.readouterr().out


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "drone_hf", "compress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--param-ratio", "--allocation", "--eval-loss", "--dataset", "--method", "--damp", "--output",
                   "--target-modules", "--no-eval", "--prune-mlp"):
        assert option in out.stdout


@pytest.mark.slow
def test_builtin_demo_runs_end_to_end(capsys):
    assert main(["compress", "--eval-batches", "1", "--num-samples", "32"]) == 0
    text = capsys.readouterr().out
    factored = int(re.search(r"(\d+) layers factored", text).group(1))  # greedy (the default) may keep some dense
    assert 0 < factored <= 36 and "speedup" in text and "embedding cosine" in text and "(greedy)" in text


# --- compress --push-to-hub / --model-card, inspect, eval, bench, merge ----------------------------
def last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().split("\n")[-1]  # progress bars may precede it
    assert err.startswith("drone-hf: error:")
    return err


def test_compress_push_to_hub_commits_the_checkpoint_and_a_measured_card(tmp_path, capsys, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    src = save_tiny("bert", tmp_path / "dense")
    code = main(["compress", str(src), "--num-samples", "16", "--eval-batches", "1", "--push-to-hub", "me/tiny-drone",
                 "--base-model", "org/tiny-bert", "--private", "--model-card", str(tmp_path / "card")])
    assert code == 0
    assert "Pushed to the Hub: me/tiny-drone" in capsys.readouterr().out
    assert hub.repos == [{"repo_id": "me/tiny-drone", "private": True, "exist_ok": True}]
    files = hub.commits[0]["files"]
    assert {"config.json", "model.safetensors", "drone_hf_checkpoint.py", "tokenizer.json", "README.md",
            "rank_per_layer.png"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["model_type"] == "drone" and config["drone_checkpoint"]["base_model"] == "org/tiny-bert"
    card = files["README.md"].decode()
    assert "base_model: org/tiny-bert" in card and "embedding cosine" in card and "x (" in card and "on CPU" in card
    # --model-card wrote the very card that was pushed
    assert (tmp_path / "card" / "README.md").read_text() == card
    assert (tmp_path / "card" / "rank_per_layer.png").read_bytes() == files["rank_per_layer.png"]


def test_bad_repo_id_fails_before_compressing(tmp_path, capsys, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    src = save_tiny("bert", tmp_path / "dense")
    capsys.readouterr()
    assert main(["compress", str(src), "--no-eval", "--push-to-hub", "a/b/c"]) == 2
    assert "is not a valid Hub model id" in last_error_line(capsys)
    assert not hub.repos and not hub.commits


def test_inspect_prints_ranks_sizes_and_settings(ckpts, capsys):
    _, folder = ckpts["bert-seq-cls"]
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    rep = drone_hf.hub.summarize_checkpoint(folder).report
    assert "BertForSequenceClassification" in text and "method=drone" in text and "MB on disk" in text
    for row in rep:
        assert row.name in text
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["marked"] and len(data["layers"]) == len(rep) and data["quantization_config"]["quant_method"] == "drone"
    assert data["model_params"] == rep.model_params


@pytest.mark.parametrize("architecture", ["BertModel", "BertForSequenceClassification"])
def test_inspect_lists_layers_in_the_models_order(tmp_path, capsys, architecture):
    """inspect sorted the layers by name: within a block attention.output.dense came before
    attention.self.query, and key before query, and the JSON's ranks put layer.10 before layer.2.
    They are listed now as the model holds them, the order compress printed; a task model too, whose
    modules carry the base-model prefix (bert.) that the recorded layer names do not."""
    import transformers
    from tiny_models import CALIBRATION_TEXTS, bert_config, tokenizer

    torch.manual_seed(0)
    dense = getattr(transformers, architecture)(bert_config(num_hidden_layers=11)).eval()
    model = drone_hf.compress(dense, DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=4, tokenizer=tokenizer(), allocation="uniform",
        target_modules=["query", "key", "output.dense"]), show_progress=False)
    model.save_pretrained(tmp_path / "drone")
    in_model = [r.name for r in drone_hf.report(model)]
    assert in_model.index("encoder.layer.2.attention.self.query") < in_model.index("encoder.layer.10.output.dense")
    assert main(["inspect", str(tmp_path / "drone")]) == 0
    table = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("encoder.")]
    assert table == in_model
    assert main(["inspect", str(tmp_path / "drone"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in data["layers"]] == in_model
    assert list(data["quantization_config"]["ranks"]) == in_model
    assert list(data["quantization_config"]["relative_errors"]) == in_model


def test_inspect_orders_by_layer_index_when_the_architecture_cannot_be_built():
    """A class transformers lacks (remote code), or one that does not hold every recorded layer (not the
    model that was compressed), gives no module order: layers are then in name order with the indices
    compared as numbers, block 10 after block 2."""
    from tiny_models import bert_config

    from drone_hf.hub.summary import _layer_order

    names = ["encoder.layer.10.output.dense", "encoder.layer.2.attention.self.query",
             "encoder.layer.2.attention.output.dense"]
    by_index = [names[2], names[1], names[0]]
    remote = bert_config().to_dict() | {"architectures": ["RemoteCodeBertModel"]}
    assert sorted(names, key=_layer_order(remote, names)) == by_index
    two_blocks = bert_config().to_dict() | {"architectures": ["BertModel"]}  # it has no encoder.layer.10
    assert sorted(names, key=_layer_order(two_blocks, names)) == by_index
    held = ["encoder.layer.1.attention.output.dense", "encoder.layer.1.attention.self.query"]
    assert sorted(held, key=_layer_order(two_blocks, held)) == held[::-1]  # all held: the model's order


@pytest.mark.parametrize("which, message", [("dense", "is a dense checkpoint"), ("missing", "is not a folder")])
def test_inspect_errors(ckpts, tmp_path, capsys, which, message):
    path = ckpts["bert"][0] if which == "dense" else tmp_path / "nope"
    assert main(["inspect", str(path)]) == 2
    assert message in last_error_line(capsys)


def test_merge_exports_a_dense_checkpoint_that_loads_without_drone_hf(ckpts, tmp_path, capsys):
    _, folder = ckpts["bert"]
    out = tmp_path / "merged"
    assert main(["merge", str(folder), "--output", str(out)]) == 0
    assert "Merged 12 factored layers" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and "quantization_config" not in config and "drone_checkpoint" not in config
    assert not (out / "drone_hf_checkpoint.py").exists() and (out / "tokenizer.json").exists()
    torch.save(dict(sample_inputs()), tmp_path / "inputs.pt")
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(sys.argv[1])
        with torch.no_grad():
            torch.save(model(**torch.load(sys.argv[2])).last_hidden_state, sys.argv[3])
        assert "drone_hf" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "inputs.pt"), str(tmp_path / "o.pt")],
                   check=True, capture_output=True)
    with torch.no_grad():
        expected = AutoModel.from_pretrained(folder)(**sample_inputs()).last_hidden_state
    torch.testing.assert_close(torch.load(tmp_path / "o.pt"), expected, rtol=1e-4, atol=1e-5)


def test_merge_keeps_a_head_no_auto_class_suffix_names(tmp_path, capsys):
    """BertForPreTraining has no entry in the suffix table: merge must load (and save) that class, not
    AutoModel, which would drop its prediction heads."""
    from tiny_models import bert_config, tokenizer
    from transformers import BertForPreTraining

    torch.manual_seed(0)
    model = drone_hf.compress(BertForPreTraining(bert_config()).eval(), DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tokenizer(), allocation="uniform"), show_progress=False)
    model.save_pretrained(tmp_path / "drone")
    assert main(["merge", str(tmp_path / "drone"), "--output", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    merged = BertForPreTraining.from_pretrained(tmp_path / "merged").eval()
    inputs = sample_inputs()
    with torch.no_grad():
        want, got = model(**inputs), merged(**inputs)
    torch.testing.assert_close(got.seq_relationship_logits, want.seq_relationship_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.prediction_logits, want.prediction_logits, rtol=1e-4, atol=1e-4)


def test_eval_and_bench_measure_the_recorded_class_with_its_heads(tmp_path, capsys, monkeypatch):
    """BertForPreTraining has no entry in the suffix table: eval and bench must load that class (as
    merge does), not AutoModel, whose bare encoder would be timed and measured without the heads."""
    from tiny_models import bert_config, tokenizer
    from transformers import BertForPreTraining

    import drone_hf.hub

    torch.manual_seed(0)
    dense = BertForPreTraining(bert_config()).eval()
    dense.save_pretrained(tmp_path / "dense")
    tokenizer().save_pretrained(tmp_path / "dense")
    model = drone_hf.compress(BertForPreTraining.from_pretrained(tmp_path / "dense").eval(), DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tokenizer(), allocation="uniform"), show_progress=False)
    model.save_pretrained(tmp_path / "drone")
    seen: list[tuple[str, str]] = []
    for name in ("measure_fidelity", "measure_speed"):
        real = getattr(drone_hf.hub, name)

        def spy(dense_model, compressed_model, *a, _real=real, **kw):
            seen.append((type(dense_model).__name__, type(compressed_model).__name__))
            return _real(dense_model, compressed_model, *a, **kw)

        monkeypatch.setattr(drone_hf.hub, name, spy)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "drone"), "--dense", str(tmp_path / "dense"), "--num-texts", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity_cosine"] > 0.5
    assert main(["bench", str(tmp_path / "drone"), "--dense", str(tmp_path / "dense"), "--seq-len", "16",
                 "--repeats", "2", "--warmup", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compressed_latency_ms"] > 0
    assert seen == [("BertForPreTraining", "BertForPreTraining")] * 2


@pytest.mark.parametrize("where", ["parent", "inside"])
def test_output_around_the_source_is_refused_and_the_source_kept(tmp_path, capsys, where):
    """--output above the source with --overwrite would replace the folder holding the source (the
    swap deletes the old folder): the source model was lost. One inside it would modify the source."""
    src = save_tiny("bert", tmp_path / "models" / "bert")
    before = sorted(p.name for p in src.iterdir())
    out = tmp_path / "models" if where == "parent" else src / "drone"
    capsys.readouterr()
    assert main(["compress", str(src), "--output", str(out), "--overwrite", "--no-eval"]) == 2
    assert "the source model folder" in last_error_line(capsys)
    assert sorted(p.name for p in src.iterdir()) == before


def test_merge_never_overwrites(ckpts, tmp_path, capsys):
    _, folder = ckpts["bert"]
    assert main(["merge", str(folder), "--output", str(folder)]) == 2
    assert "is the source model folder" in last_error_line(capsys)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert main(["merge", str(folder), "--output", str(busy)]) == 2
    assert "exists and is not empty" in last_error_line(capsys)
    assert (busy / "keep.txt").read_text() == "user data"


def test_eval_against_its_own_merge_is_exact(ckpts, tmp_path, capsys):
    """Fidelity against a dense model that computes the same function: error ~0, cosine 1."""
    _, folder = ckpts["bert"]
    main(["merge", str(folder), "--output", str(tmp_path / "merged")])
    capsys.readouterr()
    assert main(["eval", str(folder), "--dense", str(tmp_path / "merged"), "--num-texts", "8", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["fidelity_relative_error"] < 1e-5 and m["fidelity_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["fidelity_tokens"] > 0 and "perplexity_compressed" not in m


def test_eval_against_the_original_dense_model(ckpts, capsys):
    dense, folder = ckpts["bert"]
    assert main(["eval", str(folder), "--dense", str(dense), "--num-texts", "8"]) == 0
    text = capsys.readouterr().out
    assert "Fidelity (8 texts of sotu-heldout" in text and "embedding cosine" in text


def test_eval_reports_perplexity_for_causal_lms(ckpts, capsys):
    dense, folder = ckpts["gpt2-lm"]
    assert main(["eval", str(folder), "--dense", str(dense), "--num-texts", "4", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    # random tiny models: perplexity near the vocabulary size, finite for both
    assert 1 < m["perplexity_dense"] < 1e6 and 1 < m["perplexity_compressed"] < 1e6


def test_eval_reports_accuracy_on_a_labelled_set(ckpts, tmp_path, capsys):
    dense, folder = ckpts["bert-seq-cls"]
    data = tmp_path / "dev.jsonl"
    rows = [{"sentence": t, "y": ["LABEL_0", "LABEL_1", "LABEL_2"][i % 3]} for i, t in enumerate(CALIBRATION_TEXTS)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", str(folder), "--dense", str(dense), "--dataset", str(data), "--text-column", "sentence",
                 "--label-column", "y", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    # the dense accuracy equals an independent count
    model = AutoModelForSequenceClassification.from_pretrained(dense)
    tok = AutoTokenizer.from_pretrained(dense)
    with torch.no_grad():
        preds = [int(model(**tok(r["sentence"], return_tensors="pt")).logits.argmax()) for r in rows]
    assert m["accuracy_dense"] == sum(p == i % 3 for i, p in enumerate(preds)) / len(rows)
    assert 0 <= m["accuracy_compressed"] <= 1


def test_eval_draws_the_labelled_rows_by_seed_for_fidelity_and_accuracy(ckpts, tmp_path, capsys, monkeypatch):
    """Fidelity measured the first --num-texts labelled texts whatever --seed said, and accuracy every row,
    ignoring both options. Now both measure the same rows: every row by default, a seeded draw by
    load_texts' rule with --num-texts, named with its count."""
    import drone_hf.hub
    from drone_hf.calibration import load_texts

    seen: dict[str, list] = {}

    def recording(name, measure):
        def run(dense, compressed, data, tokenizer, **kw):
            seen[name] = list(data)
            return measure(dense, compressed, data, tokenizer, **kw)
        return run

    monkeypatch.setattr(drone_hf.hub, "measure_fidelity", recording("fidelity", drone_hf.hub.measure_fidelity))
    monkeypatch.setattr(drone_hf.hub, "measure_accuracy", recording("accuracy", drone_hf.hub.measure_accuracy))
    dense, folder = ckpts["bert-seq-cls"]
    data = tmp_path / "dev.jsonl"
    rows = [(t, i % 3) for i, t in enumerate(CALIBRATION_TEXTS)]
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    base = ["eval", str(folder), "--dense", str(dense), "--dataset", str(data), "--label-column", "label", "--json"]
    draws = {}
    for seed in ("1", "2"):
        assert main([*base, "--num-texts", "3", "--seed", seed]) == 0
        m = json.loads(capsys.readouterr().out)
        expected = load_texts(str(data), 3, int(seed))  # the unlabelled path's draw of the same file
        assert seen["fidelity"] == expected
        assert seen["accuracy"] == [r for r in rows if r[0] in expected]  # the same rows, with their labels
        assert m["fidelity_data"] == "3 texts of <local path: dev.jsonl>"
        assert m["accuracy_data"] == f"3 of 8 labelled examples of <local path: dev.jsonl>, drawn with seed {seed}"
        draws[seed] = expected
    assert draws["1"] != draws["2"] and draws["1"] != list(CALIBRATION_TEXTS[:3])  # not the first rows
    # the default: accuracy on the whole file (no draw, so no seed to name)
    assert main(base) == 0
    m = json.loads(capsys.readouterr().out)
    assert seen["accuracy"] == rows and seen["fidelity"] == [t for t, _ in rows]
    assert m["accuracy_data"] == "8 labelled examples of <local path: dev.jsonl>"


def test_eval_help_states_what_num_texts_draws(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "texts drawn (seeded by --seed, kept in file order) from the dataset (default 32)" in text
    assert "With --label-column the default is every labelled row" in text
    assert "fidelity and accuracy always measure the same rows" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "records no base model; pass --dense"),
        (["--label-column", "y"], "--label-column needs --dataset"),
        (["--dense", "DENSE", "--dataset", "missing.jsonl", "--label-column", "y"], "does not exist"),
    ],
)
def test_eval_errors(ckpts, capsys, extra, message):
    dense, folder = ckpts["bert"]
    extra = [str(dense) if x == "DENSE" else x for x in extra]
    assert main(["eval", str(folder), *extra]) == 2
    assert message in last_error_line(capsys)


def test_eval_accuracy_needs_a_classifier(ckpts, tmp_path, capsys):
    dense, folder = ckpts["bert"]
    (tmp_path / "d.jsonl").write_text('{"text": "a b c", "label": 0}\n')
    assert main(["eval", str(folder), "--dense", str(dense), "--dataset", str(tmp_path / "d.jsonl"),
                 "--label-column", "label"]) == 2
    assert "accuracy needs a sequence-classification checkpoint" in last_error_line(capsys)


def test_bench_reports_interleaved_latency_with_the_device(ckpts, capsys):
    dense, folder = ckpts["bert"]
    assert main(["bench", str(folder), "--dense", str(dense), "--batch-size", "2", "--seq-len", "16",
                 "--repeats", "3", "--warmup", "1", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["dense_latency_ms"] > 0 and m["compressed_latency_ms"] > 0
    assert m["latency_inputs"] == "batch 2 x 16 tokens" and m["latency_device"].startswith("CPU")
    if sys.platform != "win32":
        assert m["latency_page_faults"] >= 0  # per forward pass, both models
    assert main(["bench", str(folder), "--dense", str(dense), "--seq-len", "16", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "page faults per forward pass" not in out  # tiny activations: no note


def test_bench_notes_page_faults_per_pass(ckpts, capsys, monkeypatch):
    """An allocator that re-faults activations every pass lowers the speedup: bench says so, with the
    setting that avoids it. The counter advances 10**6 per reading: (2 + 3 passes) x 2 models."""
    import drone_hf.utils.page_faults as page_faults_mod

    readings = iter(range(0, 10**8, 10**6))
    monkeypatch.setattr(page_faults_mod, "minor_page_faults", lambda: next(readings))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    dense, folder = ckpts["bert"]
    assert main(["bench", str(folder), "--dense", str(dense), "--seq-len", "16", "--repeats", "3", "--warmup", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_page_faults"] == 10**6 / 10
    args = ["bench", str(folder), "--dense", str(dense), "--seq-len", "16", "--repeats", "3", "--warmup", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "100,000 page faults per forward pass" in out and "GLIBC_TUNABLES=glibc.malloc" in out
    monkeypatch.setenv("GLIBC_TUNABLES", page_faults_mod.GLIBC_REUSE_TUNABLES)  # advice already followed
    assert main(args) == 0
    assert "page faults per forward pass" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [(["--seq-len", "1000"], "exceeds the model's 128 positions"), (["--device", "nope"], "is not a device"),
     (["--repeats", "0"], None)],
)
def test_bench_errors(ckpts, capsys, extra, message):
    dense, folder = ckpts["bert"]
    if message is None:  # argparse rejects it: exit code 2 as well
        with pytest.raises(SystemExit) as exc:
            main(["bench", str(folder), "--dense", str(dense), *extra])
        assert exc.value.code == 2
        return
    assert main(["bench", str(folder), "--dense", str(dense), *extra]) == 2
    assert message in last_error_line(capsys)


@pytest.mark.parametrize("command", ["compress", "inspect", "eval", "bench", "merge"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: drone-hf " + command)
    options = {"compress": ["--push-to-hub", "--model-card", "--base-model"], "inspect": ["--json"],
               "eval": ["--dense", "--label-column", "--num-texts"], "bench": ["--seq-len", "--repeats", "--device"],
               "merge": ["--output", "--overwrite"]}[command]
    for option in options:
        assert option in text


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "drone-hf")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("compress", "inspect", "eval", "bench", "merge"))
