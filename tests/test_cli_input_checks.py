"""The drone-hf command line: folder permissions, and bad input refused with one line before any work."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from test_cli import last_error_line
from tiny_models import CALIBRATION_TEXTS, save_tiny
from transformers import AutoModel

from drone_hf.cli import main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- 1. output folders get the mode the umask gives, not mkdtemp's 0700 ------------------------------
def test_compress_and_merge_output_folders_follow_the_umask(ckpts, tmp_path, capsys, umask_022):
    """mkdtemp's 0700 was renamed into place: a checkpoint others could not read, unlike one from mkdir
    or save_pretrained."""
    src = save_tiny("bert", tmp_path / "dense")
    assert main(["compress", str(src), "--num-samples", "16", "--no-eval", "--output", str(tmp_path / "c")]) == 0
    assert mode(tmp_path / "c") == 0o755
    _, folder = ckpts["bert"]
    assert main(["merge", str(folder), "--output", str(tmp_path / "m")]) == 0
    assert mode(tmp_path / "m") == 0o755
    # --overwrite keeps the replaced folder's own mode
    os.chmod(tmp_path / "m", 0o750)
    assert main(["merge", str(folder), "--output", str(tmp_path / "m"), "--overwrite"]) == 0
    assert mode(tmp_path / "m") == 0o750
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "bert"


# --- 2. --max-length above the model's positions is capped, as calibration caps it ------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2-lm"])
def test_eval_max_length_above_the_positions_is_capped(ckpts, capsys, arch):
    """The held-out texts are longer than the tiny models' 128 positions: at --max-length 512 they
    indexed past the position table (a RuntimeError traceback)."""
    dense, folder = ckpts[arch]
    assert main(["eval", str(folder), "--dense", str(dense), "--num-texts", "8", "--max-length", "512",
                 "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    at_cap = main(["eval", str(folder), "--dense", str(dense), "--num-texts", "8", "--max-length", "128", "--json"])
    assert at_cap == 0 and json.loads(capsys.readouterr().out) == measured


def test_eval_warns_once_about_a_capped_max_length(ckpts, capsys, caplog):
    import logging

    dense, folder = ckpts["gpt2-lm"]  # fidelity and perplexity: two measurements, one warning
    with caplog.at_level(logging.WARNING):
        assert main(["eval", str(folder), "--dense", str(dense), "--num-texts", "4", "--max-length", "512",
                     "--json"]) == 0
    assert caplog.text.count("max_length=512 exceeds the model's") == 1


def test_compress_max_length_above_the_positions_saves_the_checkpoint(tmp_path, capsys):
    """Calibration capped the length, but the held-out fidelity step did not: it failed after the whole
    compression and nothing was saved."""
    src = save_tiny("bert", tmp_path / "dense")
    out = tmp_path / "out"
    assert main(["compress", str(src), "--num-samples", "16", "--eval-batches", "1", "--max-length", "512",
                 "--output", str(out)]) == 0
    assert "Held-out fidelity" in capsys.readouterr().out and (out / "model.safetensors").is_file()


# --- 3. bench --device other than cpu / an available cuda -----------------------------------------
@pytest.mark.parametrize(
    "device, message",
    [("mps", "latency is measured on cpu or cuda only"), ("xpu", "latency is measured on cpu or cuda only"),
     ("meta", "--device meta holds no data and runs nothing"), ("cpu:1", "there is one CPU device")],
)
def test_bench_refuses_devices_it_cannot_time(ckpts, capsys, monkeypatch, device, message):
    """timing_device checked only cuda: mps/xpu/meta went on to load both models and raised a traceback
    (or, where they ran, timed asynchronous launches and described the device as a CPU)."""
    import drone_hf.cli

    monkeypatch.setattr(drone_hf.cli, "_load_pair", lambda args: pytest.fail("loaded the models"))
    dense, folder = ckpts["bert"]
    assert main(["bench", str(folder), "--dense", str(dense), "--device", device, "--repeats", "1"]) == 2
    line = last_error_line(capsys)
    assert message in line and "use --device cpu" in line


def test_bench_refuses_a_cuda_index_this_machine_lacks(ckpts, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dense, folder = ckpts["bert"]
    assert main(["bench", str(folder), "--dense", str(dense), "--device", "cuda:3"]) == 2
    assert "--device cuda:3, but torch sees 1 CUDA device(s) here; use --device cuda:0" in last_error_line(capsys)


# --- 4. labelled datasets: every row checked, ids in range, line numbers, BOM -----------------------
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("oor.jsonl", '{"text": "we will win", "label": 7}\n',
         "label 7 is outside the model's 3 classes; give class ids 0 to 2"),
        ("neg.jsonl", '{"text": "we will win", "label": -1}\n', "label -1 is outside the model's 3 classes"),
        ("later.jsonl", '{"text": "a b", "label": 0}\n{"text": "the world is watching"}\n',
         "later.jsonl:2 has column(s) ['label'] missing or null; give every row a text and a label"),
        ("nulltext.jsonl", '{"text": "a b", "label": 0}\n{"text": null, "label": 1}\n',
         "nulltext.jsonl:2 has column(s) ['text'] missing or null"),
        ("numtext.jsonl", '{"text": 5, "label": 1}\n', "numtext.jsonl:1: 'text' is int 5, not a text"),
        # an empty text would be scored as a prediction on nothing (calibration drops such texts)
        ("empty.csv", "text,label\na b,0\n,1\n", "empty.csv:3: 'text' is empty; give the row its text, or remove"),
        ("blank.jsonl", '{"text": "a b", "label": 0}\n{"text": "  ", "label": 1}\n', "blank.jsonl:2: 'text' is empty"),
        ("broken.jsonl", '{"text": "a", "label": 0}\n\n{oops\n', "broken.jsonl:3 is not valid JSON ("),
        ("string.jsonl", '{"text": "a", "label": 0}\n"just a string"\n', "string.jsonl:2 is a JSON str, not an object"),
        ("short.csv", "text,label\nthe budget is strong,0\nwe will win\n",
         "short.csv:3 has column(s) ['label'] missing (the row has fewer fields)"),
        # a label refused for its value is named by file:line too, and every row is checked
        ("half.jsonl", '{"text": "a b", "label": 0}\n{"text": "c d", "label": 0.5}\n',
         "half.jsonl:2: label 0.5 is not a whole number, so it is no class id"),
        ("half.csv", "text,label\na b,0\nc d,0.5\n", "half.csv:3: label '0.5' is not a whole number"),
        ("nan.jsonl", '{"text": "a b", "label": NaN}\n', "nan.jsonl:1: label nan is not a whole number"),
        ("bool.jsonl", '{"text": "a b", "label": 0}\n{"text": "c d", "label": true}\n',
         "bool.jsonl:2: label True is a JSON boolean, not a class: the model names no class true/false and has 3 "
         "classes (only a 2-class head reads False as 0 and True as 1), so which class it means would be a guess; "
         "write class ids 0 to 2 or the model's labels"),
        ("bool.csv", "text,label\na b,False\n", "bool.csv:2: label 'False' is a boolean word, not a class"),
        ("name.tsv", "text\tlabel\na b\tLABEL_1\nc d\tpositive\n",
         "name.tsv:3: label 'positive' is neither an integer class id nor one of the model's labels"),
    ],
)
def test_eval_refuses_bad_labelled_rows(ckpts, tmp_path, capsys, monkeypatch, name, content, message):
    """Only row 0 was checked: a later row without the label was a KeyError traceback, a null text was
    measured as the string 'None', a broken line's error named neither file nor line, and ids outside the
    head's classes silently never matched (accuracy 0)."""
    import drone_hf.hub

    monkeypatch.setattr(drone_hf.hub, "measure_fidelity", lambda *a, **k: pytest.fail("measured"))
    dense, folder = ckpts["bert-seq-cls"]
    (tmp_path / name).write_text(content)
    assert main(["eval", str(folder), "--dense", str(dense), "--dataset", str(tmp_path / name),
                 "--label-column", "label"]) == 2
    assert message in last_error_line(capsys)


def test_eval_reads_whole_number_float_labels_as_their_class(ckpts, tmp_path, capsys):
    """A JSON 1.0 or a CSV "1.0" (pandas writes an int column with a gap as floats) was refused as
    neither a class id nor a label name; it is the integer class, so accuracy matches the int file."""
    dense, folder = ckpts["bert-seq-cls"]
    texts = [t.replace(",", " ") for t in CALIBRATION_TEXTS[:6]]
    (tmp_path / "int.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n"
                                                for i, t in enumerate(texts)))
    (tmp_path / "float.jsonl").write_text("".join(json.dumps({"text": t, "label": float(i % 3)}) + "\n"
                                                  for i, t in enumerate(texts)))
    (tmp_path / "float.csv").write_text("text,label\n" + "".join(f"{t},{i % 3}.0\n" for i, t in enumerate(texts)))
    results = []
    for name in ("int.jsonl", "float.jsonl", "float.csv"):
        assert main(["eval", str(folder), "--dense", str(dense), "--dataset", str(tmp_path / name),
                     "--label-column", "label", "--json"]) == 0, last_error_line(capsys)
        m = json.loads(capsys.readouterr().out)
        results.append((m["accuracy_dense"], m["accuracy_compressed"]))
    assert results[1] == results[0] and results[2] == results[0]


def test_label_ids_reads_floats_and_booleans_deliberately():
    """Whole-number floats are their class, other numbers are refused; booleans are the class the model
    names true/false, else False = 0 / True = 1 on a 2-class head, else refused (which of 3 is True?)."""
    from types import SimpleNamespace

    from drone_hf.hub.measure import label_ids

    default = SimpleNamespace(num_labels=3, label2id={f"LABEL_{i}": i for i in range(3)})
    assert label_ids([1.0, 0.0, "2.0", " 1.0 ", "+1", 2], default) == [1, 0, 2, 1, 1, 2]
    for bad, message in [(0.5, "label 0.5 is not a whole number"), ("2.5", "label '2.5' is not a whole number"),
                         (float("inf"), "label inf is not a whole number"), (3.0, "label 3.0 is outside the model's 3"),
                         (True, "label True is a JSON boolean"), ("true", "label 'true' is a boolean word")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            label_ids([bad], default)
    with pytest.raises(ValueError, match=re.escape("dev.jsonl:4: label 0.5 is not")):
        label_ids([0, 0.5], default, where=["dev.jsonl:3", "dev.jsonl:4"])
    boolq = SimpleNamespace(num_labels=2, label2id={"False": 0, "True": 1})
    assert label_ids([True, False, "true", "FALSE", "True"], boolq) == [1, 0, 1, 0, 1]
    reversed_names = SimpleNamespace(num_labels=2, label2id={"true": 0, "false": 1})
    assert label_ids([True, False], reversed_names) == [0, 1]  # the model's names decide, not int(True)
    # a 2-class head naming neither: False = 0, True = 1, as datasets and BoolQ-style scripts read them
    fresh_head = SimpleNamespace(num_labels=2, label2id={"LABEL_0": 0, "LABEL_1": 1})
    assert label_ids([True, False, "true", " False "], fresh_head) == [1, 0, 1, 0]
    one_named = SimpleNamespace(num_labels=2, label2id={"True": 0, "other": 1})
    with pytest.raises(ValueError, match=re.escape("label False is a JSON boolean")):
        label_ids([False], one_named)  # names "True" only: False is no convention's class here


def test_eval_reads_a_csv_with_a_byte_order_mark(ckpts, tmp_path, capsys):
    """Excel's UTF-8 CSV starts with a BOM: the first column read as '\\ufefftext' and was refused."""
    dense, folder = ckpts["bert-seq-cls"]
    rows = "".join(f"{t.replace(',', ' ')},{i % 3}\n" for i, t in enumerate(CALIBRATION_TEXTS[:6]))
    (tmp_path / "plain.csv").write_text("text,label\n" + rows, encoding="utf-8")
    (tmp_path / "bom.csv").write_text("text,label\n" + rows, encoding="utf-8-sig")
    results = []
    for name in ("plain.csv", "bom.csv"):
        assert main(["eval", str(folder), "--dense", str(dense), "--dataset", str(tmp_path / name),
                     "--label-column", "label", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["accuracy_compressed"] == results[0]["accuracy_compressed"]
    assert results[1]["accuracy_dense"] == results[0]["accuracy_dense"]


# --- 5. a --model-class whose head the checkpoint lacks is refused, not given a random head -------
@pytest.mark.parametrize("command", ["eval", "bench", "merge"])
def test_a_model_class_without_its_head_in_the_checkpoint_is_refused(ckpts, tmp_path, capsys, command):
    """--model-class causal-lm on a BertModel checkpoint loaded BertLMHeadModel with a random LM head
    (a different one for dense and compressed): eval measured noise, merge saved it, exit code 0."""
    dense, folder = ckpts["bert"]
    extra = {"eval": ["--dense", str(dense)], "bench": ["--dense", str(dense), "--repeats", "1"],
             "merge": ["--output", str(tmp_path / "merged")]}[command]
    assert main([command, str(folder), "--model-class", "causal-lm", *extra]) == 2
    line = last_error_line(capsys)
    assert "has no weights for cls.predictions" in line and "of BertLMHeadModel, which would be random" in line
    assert "the checkpoint records BertModel: drop --model-class causal-lm" in line
    assert not (tmp_path / "merged").exists()


def test_a_dense_model_without_the_checkpoints_head_is_refused(ckpts, capsys):
    """A base encoder as --dense of a classifier checkpoint: the dense accuracy came from a random head."""
    base, _ = ckpts["bert"]
    _, folder = ckpts["bert-seq-cls"]
    assert main(["eval", str(folder), "--dense", str(base)]) == 2
    line = last_error_line(capsys)
    assert f"--dense {base} has no weights for classifier.bias, classifier.weight" in line
    assert "give --dense the dense BertForSequenceClassification the checkpoint was compressed from" in line


def test_compress_refuses_a_model_class_whose_head_is_missing_before_compressing(tmp_path, capsys):
    """Greedy allocation measured the output KL of a random classifier head, and the checkpoint saved it."""
    src = save_tiny("bert", tmp_path / "dense")
    out = tmp_path / "out"
    assert main(["compress", str(src), "--model-class", "sequence-classification", "--num-samples", "16",
                 "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert "layers factored" not in captured.out and not out.exists()
    line = captured.err.strip().split("\n")[-1]
    assert "has no weights for classifier.bias, classifier.weight of BertForSequenceClassification" in line
    assert "use --model-class auto (the base model)" in line


# --- 6. a --dense of another model type than the checkpoint's base ------------------------------
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_a_dense_model_of_another_type_is_refused_before_loading(ckpts, capsys, monkeypatch, command):
    """The checkpoint's concrete class reads any config: bench timed a random BertModel built from a
    GPT-2 folder (0.08x, exit code 0)."""
    import transformers

    gpt2, _ = ckpts["gpt2-lm"]
    _, folder = ckpts["bert"]
    real = transformers.BertModel.from_pretrained.__func__

    def loads(cls, path, *a, **k):
        assert str(path) != str(gpt2), "loaded the mismatched dense model"
        return real(cls, path, *a, **k)

    monkeypatch.setattr(transformers.BertModel, "from_pretrained", classmethod(loads))
    extra = ["--repeats", "1", "--seq-len", "8"] if command == "bench" else []
    assert main([command, str(folder), "--dense", str(gpt2), *extra]) == 2
    line = last_error_line(capsys)
    assert f"--dense {gpt2} is a 'gpt2' model but {folder} was compressed from a 'bert' model" in line
    assert "pass --dense the dense model it was compressed from" in line


# --- 7. eval --json names datasets without local paths ---------------------------------------------
def test_eval_json_names_a_local_dataset_without_its_path(ckpts, tmp_path, capsys):
    """fidelity_data / accuracy_data held the dataset's full local path, which reached a model card
    rendered from the JSON (Measurements.from_json)."""
    dense, folder = ckpts["bert-seq-cls"]
    data = tmp_path / "private-dir" / "dev.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(CALIBRATION_TEXTS)))
    assert main(["eval", str(folder), "--dense", str(dense), "--dataset", str(data), "--label-column", "label",
                 "--json"]) == 0
    out = capsys.readouterr().out
    m = json.loads(out)
    assert "private-dir" not in out and str(tmp_path) not in out
    assert m["fidelity_data"].endswith("texts of <local path: dev.jsonl>")
    assert m["accuracy_data"].endswith("labelled examples of <local path: dev.jsonl>")
    assert main(["eval", str(folder), "--dense", str(dense), "--num-texts", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity_data"] == "4 texts of sotu-heldout"  # a corpus name stays


# --- 8. --base-model must be a Hub id ----------------------------------------------------------------
@pytest.mark.parametrize(
    "base, message",
    [("LOCAL", "is a local path, not a Hub model id"), ("a/b/c", "is a local path, not a Hub model id"),
     ("org/bad name", "is not a Hub model id: use 'name' or"), ("../up", "is a local path, not a Hub model id")],
)
def test_compress_refuses_a_base_model_that_is_not_a_hub_id_before_compressing(tmp_path, capsys, base, message):
    """A local path was written into config.json's drone_checkpoint.base_model and the card's YAML and
    link (https://huggingface.co//work/...)."""
    src = save_tiny("bert", tmp_path / "dense")
    base = str(src) if base == "LOCAL" else base
    capsys.readouterr()
    assert main(["compress", str(src), "--no-eval", "--base-model", base, "--output", str(tmp_path / "out"),
                 "--model-card", str(tmp_path / "card")]) == 2
    captured = capsys.readouterr()
    assert "Compressing" not in captured.out and not (tmp_path / "out").exists() and not (tmp_path / "card").exists()
    line = captured.err.strip().split("\n")[-1]
    assert line.startswith(f"drone-hf: error: --base-model: base_model {base!r}") and message in line


def test_a_hub_id_is_accepted_beside_a_folder_of_the_same_name(tmp_path, monkeypatch):
    """A clone of a Hub model in the working directory (`git clone .../gpt2`, then `--base-model gpt2`)
    is what set_base_model is for: the id is judged by its spelling, not by whether a folder exists."""
    from drone_hf.hub.checkpoint import check_base_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "openai-community" / "gpt2").mkdir(parents=True)
    assert check_base_model("gpt2") == "gpt2"
    assert check_base_model("openai-community/gpt2") == "openai-community/gpt2"
    for local in (str(tmp_path / "gpt2"), "./gpt2", "~/models/gpt2"):
        with pytest.raises(ValueError, match="is a local path, not a Hub model id"):
            check_base_model(local)


def test_set_base_model_refuses_a_local_path(ckpts):
    from drone_hf.hub import set_base_model

    _, folder = ckpts["bert"]
    model = AutoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="is a local path, not a Hub model id"):
        set_base_model(model, str(folder))
    set_base_model(model, "org/tiny-bert")
    assert model.config.drone_checkpoint["base_model"] == "org/tiny-bert"


# --- 9. an --output under an existing file is refused before the work ------------------------------
@pytest.mark.parametrize("flag", ["--output", "--model-card"])
def test_compress_output_under_a_file_is_refused_before_compressing(tmp_path, capsys, flag):
    """--output somefile.txt/ck compressed first, then failed to create the folder (raw errno message)."""
    src = save_tiny("bert", tmp_path / "dense")
    (tmp_path / "notes.txt").write_text("user data")
    capsys.readouterr()
    assert main(["compress", str(src), "--no-eval", flag, str(tmp_path / "notes.txt" / "ck")]) == 2
    captured = capsys.readouterr()
    assert "Compressing" not in captured.out and (tmp_path / "notes.txt").read_text() == "user data"
    line = captured.err.strip().split("\n")[-1]
    assert f"{flag} {tmp_path / 'notes.txt' / 'ck'} lies under {tmp_path / 'notes.txt'}, which is a file" in line


def test_merge_output_under_a_file_is_refused(ckpts, tmp_path, capsys):
    _, folder = ckpts["bert"]
    (tmp_path / "notes.txt").write_text("user data")
    assert main(["merge", str(folder), "--output", str(tmp_path / "notes.txt" / "a" / "b")]) == 2
    assert "which is a file, not a folder; choose a folder path" in last_error_line(capsys)


# --- 10. inspect on damaged folders: one line naming the damaged file / field ----------------------
def _damage(folder, how):
    import struct

    config = folder / "config.json"
    weights = folder / "model.safetensors"

    def edit(change):
        c = json.loads(config.read_text())
        change(c["quantization_config"])
        config.write_text(json.dumps(c))

    def header(value):
        h = json.dumps(value).encode()
        weights.write_bytes(struct.pack("<Q", len(h)) + h)

    if how == "config-list":
        config.write_text("[1, 2]")
    elif how == "config-truncated":
        config.write_text(config.read_text()[:40])
    elif how == "index-without-weight-map":
        weights.rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif how == "index-missing-shard":
        weights.unlink()
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "header-without-shape":
        header({"a.down.weight": {"dtype": "F32", "data_offsets": [0, 0]}})
    elif how == "header-list":
        header([1])
    elif how == "header-truncated":
        weights.write_bytes(weights.read_bytes()[:20])
    elif how == "data-truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "ranks-list":
        edit(lambda q: q.update(ranks=[1, 2]))
    elif how == "rank-string":
        edit(lambda q: q["ranks"].update({next(iter(q["ranks"])): "8"}))
    elif how == "calibration-string":
        edit(lambda q: q.update(calibration="x"))


@pytest.mark.parametrize(
    "how, message",
    [
        ("config-list", "config.json holds a JSON list, not an object"),
        ("config-truncated", "config.json is not valid JSON ("),
        ("index-without-weight-map", "model.safetensors.index.json has no weight_map (tensor name -> shard file)"),
        ("index-missing-shard", "names model-00001-of-00002.safetensors, missing from"),
        ("header-without-shape", "model.safetensors: tensor 'a.down.weight' has no valid dtype / shape / data_offsets"),
        ("header-list", "model.safetensors has a header that is a JSON list, not an object"),
        ("header-truncated", "model.safetensors is truncated: its header is"),
        ("data-truncated", "model.safetensors is truncated: its header describes"),
        ("ranks-list", "config.json: quantization_config.ranks is a list, not an object"),
        ("rank-string", "is '8', not a positive integer rank"),
        ("calibration-string", "config.json: quantization_config.calibration is a str, not an object"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_names_the_damage(ckpts, tmp_path, capsys, how, message, as_json):
    """Tracebacks (KeyError, AttributeError), raw JSON errors without a file name, a confusing
    'rank 8 but its factors have rank 8/8', and a model.safetensors cut in half reported healthy."""
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(ckpts["bert"][1], folder)
    _damage(folder, how)
    assert main(["inspect", str(folder), *(["--json"] if as_json else [])]) == 2
    line = last_error_line(capsys)
    assert message in line and str(folder) in line
    assert "again" in line or "restore" in line


# --- 11. bench counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [(["--warmup", "-2"], "argument --warmup: -2 must be at least 0"),
                                            (["--warmup", "x"], "argument --warmup: 'x' is not an integer")])
def test_bench_refuses_a_negative_warmup(ckpts, capsys, extra, message):
    """--warmup -2 with --repeats 5 timed 3 runs (the loop runs warmup + repeats passes); with
    --repeats 1 it ended in 'no median for empty data'."""
    dense, folder = ckpts["bert"]
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(folder), "--dense", str(dense), "--repeats", "5", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{"warmup": -1}, {"repeats": 0}, {"seq_len": 0}, {"batch_size": 2.5}])
def test_measure_speed_refuses_bad_counts(ckpts, kw):
    from drone_hf.hub import measure_speed

    dense, folder = ckpts["bert"]
    model = AutoModel.from_pretrained(folder)
    name, value = next(iter(kw.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r} must be an integer >= "):
        measure_speed(model, model, **kw)


# --- 12. --private / --license without what they apply to ------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [(["--private"], "--private applies to the Hub repository --push-to-hub creates, and nothing is pushed"),
     (["--private", "--model-card", "CARD"], "add --push-to-hub REPO_ID, or drop --private"),
     (["--license", "mit"], "--license is written into the model card only, and no card is written")],
)
def test_card_options_without_a_card_or_push_are_refused_before_compressing(tmp_path, capsys, extra, message):
    """Accepted and ignored: the user believed the result private or licensed."""
    src = save_tiny("bert", tmp_path / "dense")
    extra = [str(tmp_path / "card") if x == "CARD" else x for x in extra]
    capsys.readouterr()
    assert main(["compress", str(src), "--no-eval", "--output", str(tmp_path / "out"), *extra]) == 2
    captured = capsys.readouterr()
    assert "Compressing" not in captured.out and not (tmp_path / "out").exists()
    assert message in captured.err.strip().split("\n")[-1]


def test_license_with_only_a_model_card_is_written_into_it(tmp_path, capsys):
    src = save_tiny("bert", tmp_path / "dense")
    assert main(["compress", str(src), "--no-eval", "--num-samples", "16", "--license", "mit", "--base-model",
                 "org/tiny-bert", "--model-card", str(tmp_path / "card")]) == 0
    assert "license: mit" in (tmp_path / "card" / "README.md").read_text()


def test_label_names_made_of_digits_are_read_as_names():
    """A star-rating head names its classes "1".."5" (ids 0..4): "1" is the name, id 0; read as an id
    it was silently off by one, and "5" was refused with a message listing "5" as a valid label."""
    from types import SimpleNamespace

    from drone_hf.hub.measure import label_ids

    stars = SimpleNamespace(num_labels=5, label2id={str(i + 1): i for i in range(5)})
    assert label_ids(["1", "3", "5"], stars) == [0, 2, 4]
    assert label_ids([0, 4], stars) == [0, 4]  # JSON integers stay class ids
    default = SimpleNamespace(num_labels=3, label2id={f"LABEL_{i}": i for i in range(3)})
    assert label_ids(["0", "2", "LABEL_1"], default) == [0, 2, 1]  # CSV digits: ids when no name matches
    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        label_ids(["3"], default)


def test_compress_with_a_head_class_holds_one_model_while_it_compresses(tmp_path, monkeypatch):
    """The --model-class completeness check loaded the full model and kept it as the dense reference,
    so compression ran beside a second dense copy (an LLM's peak memory doubled)."""
    import gc
    import importlib

    import transformers

    compress_mod = importlib.import_module("drone_hf.compress")  # the module, not the function drone_hf.compress

    src = save_tiny("bert-seq-cls", tmp_path / "dense")
    others = []
    real = compress_mod._compress_in_place

    def spy(model, *args, **kwargs):
        inside = {id(m) for m in model.modules()}
        others.extend(type(o).__name__ for o in gc.get_objects()
                      if isinstance(o, transformers.PreTrainedModel) and id(o) not in inside)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(compress_mod, "_compress_in_place", spy)
    assert main(["compress", str(src), "--model-class", "sequence-classification", "--allocation", "uniform",
                 "--num-samples", "8", "--eval-batches", "1", "--output", str(tmp_path / "out")]) == 0
    assert others == []
