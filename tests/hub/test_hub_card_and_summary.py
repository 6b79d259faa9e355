"""The model card, the rank plot and the file-level checkpoint summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import drone_hf
from drone_hf.hub import Measurements, plot_ranks, render_model_card, summarize_checkpoint
from drone_hf.hub.card import auto_class_and_task

EXAMPLES = Path(__file__).resolve().parents[2] / "model_cards" / "examples"


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize(
    "arch, auto, task",
    [("bert", "AutoModel", "feature-extraction"),
     ("bert-seq-cls", "AutoModelForSequenceClassification", "text-classification"),
     ("llama-gqa-lm", "AutoModelForCausalLM", "text-generation")],
)
def test_card_states_what_was_done_and_how_to_load(compressed, arch, auto, task):
    model, _ = compressed(arch)
    card = str(render_model_card(model, "me/x"))
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == task
    assert "drone-hf" in meta["tags"] and "base_model" not in meta  # local source: no base_model claimed
    rep = drone_hf.report(model)
    assert meta["drone"]["layers_factored"] == len(rep)
    assert meta["drone"]["targeted_param_ratio"] == pytest.approx(rep.targeted_param_ratio, abs=1e-4)
    assert f"{auto}.from_pretrained(\"me/x\")" in card and f'pipeline("{task}"' in card
    dense, factored = rep.dense_targeted_params, rep.factored_targeted_params
    assert f"| weights of the factored layers | {dense:,} | {factored:,} |" in card
    assert f"| all parameters | {rep.dense_model_params:,} | {rep.model_params:,} |" in card
    table = [line for line in card.splitlines() if re.match(r"\| `[^`]+` \| \d+x\d+ \| \d+ \|", line)]
    assert len(table) == len(rep)
    qc = model.config.quantization_config
    assert f"{qc.calibration['num_texts']} texts from `{qc.calibration['dataset']}`" in card
    assert "not measured" in card and "NeurIPS 2021" in card


def test_card_shows_measurements_only_when_given(compressed):
    model, _ = compressed("bert")
    m = Measurements(dense_latency_ms=30.0, compressed_latency_ms=20.0, latency_device="GPU X",
                     accuracy_dense=0.9, accuracy_compressed=0.85, accuracy_data="dev.jsonl")
    card = str(render_model_card(model, measurements=m, rank_plot=None))
    assert "1.50x" in card and "on GPU X" in card and "0.9000 dense -> 0.8500 compressed" in card
    assert "Perplexity" not in card and "![" not in card


def test_measurements_speedup_and_round_trip(tmp_path):
    m = Measurements(dense_latency_ms=3.0, compressed_latency_ms=2.0)
    assert m.speedup == pytest.approx(1.5) and Measurements().speedup is None
    (tmp_path / "m.json").write_text(json.dumps(m.to_dict()))
    assert Measurements.from_json(tmp_path / "m.json") == m


def test_auto_class_and_task_by_architecture():
    assert auto_class_and_task("GPT2LMHeadModel") == ("AutoModelForCausalLM", "text-generation")
    assert auto_class_and_task("BertForMaskedLM") == ("AutoModelForMaskedLM", "fill-mask")
    assert auto_class_and_task(None) == ("AutoModel", "feature-extraction")


def test_rank_plot_is_a_reproducible_png(compressed, tmp_path):
    model, _ = compressed("bert")
    rep = drone_hf.report(model)
    plot_ranks(rep, tmp_path / "a.png")
    plot_ranks(rep, tmp_path / "b.png")
    a = (tmp_path / "a.png").read_bytes()
    assert a.startswith(b"\x89PNG") and a == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("arch", ["bert-seq-cls", "gpt2-lm"])
def test_summary_from_files_matches_the_in_memory_report(compressed, tmp_path, arch):
    model, _ = compressed(arch)
    model.save_pretrained(tmp_path / "drone")
    summary = summarize_checkpoint(tmp_path / "drone")
    rep = drone_hf.report(model)
    assert summary.marked and summary.base_model_type == model.config.model_type
    assert summary.architecture == type(model).__name__
    by_name = lambda rows: sorted(rows, key=lambda r: r.name)  # noqa: E731
    assert by_name(summary.report.rows) == by_name(rep.rows)  # names, shapes, ranks, errors
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied weights are stored once
    assert summary.report.model_params == sum(unique.values())
    assert summary.weight_bytes == (tmp_path / "drone" / "model.safetensors").stat().st_size
    text = str(summary)
    assert "DRONE checkpoint" in text and rep.summary().split(";")[0] in text
    assert json.dumps(summary.to_dict())  # JSON-serialisable for `drone-hf inspect --json`


def test_summary_errors_name_the_problem(compressed, tmp_path):
    from tiny_models import save_tiny

    with pytest.raises(ValueError, match="is not a folder"):
        summarize_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        summarize_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="dense checkpoint.*drone-hf compress"):
        summarize_checkpoint(save_tiny("bert", tmp_path / "dense"))
    model, _ = compressed("bert")
    model.save_pretrained(tmp_path / "drone")
    cfg = json.loads((tmp_path / "drone" / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["ranks"]))
    cfg["quantization_config"]["ranks"][name] += 1
    (tmp_path / "drone" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="recorded with rank"):
        summarize_checkpoint(tmp_path / "drone")


def test_committed_example_card_is_complete():
    card = (EXAMPLES / "all-MiniLM-L6-v2-drone" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    factored = meta["drone"]["layers_factored"]  # greedy keeps some of MiniLM's 36 linear layers dense
    assert 0 < factored <= 36 and re.search(rf"drone-hf: {factored} linear\s+layers", card)  # metadata = body
    for heading in ("## How to load", "## Compression", "## Size", "## Measured results", "## Calibration data",
                    "## Rank per layer", "## Citation"):
        assert heading in card
    assert re.search(r"\*\*Speed\*\*: \d+\.\d\dx .* on CPU", card)  # measured, with the device
    assert "embedding cosine 0." in card
    assert (EXAMPLES / "all-MiniLM-L6-v2-drone" / "rank_per_layer.png").read_bytes().startswith(b"\x89PNG")


def test_summary_reports_query_key_compression(compressed, tmp_path):
    model, _ = compressed("bert", compress_attention=True)
    model.save_pretrained(tmp_path / "drone")
    summary = summarize_checkpoint(tmp_path / "drone")
    attention = model.config.quantization_config.attention_ranks
    assert attention and f"query-key compressed in {len(attention)} attention modules" in str(summary)
    assert summary.to_dict()["quantization_config"]["attention_ranks"] == attention


def test_card_states_query_key_compression_and_its_settings(compressed):
    model, _ = compressed("bert", compress_attention=True, attention_rank=4)
    card = str(render_model_card(model, "me/x"))
    rep = drone_hf.report(model)
    assert "| `compress_attention` | `True` |" in card and "| `attention_rank` | `4` |" in card
    assert f"{len(rep.attention_rows)} self-attention modules compute their scores" in card
    section = card.split("## Query-key attention")[1].split("## Citation")[0]
    row = re.compile(r"\| `[^`]+` \| \d+x\d+ \| 4 \| [\d,]+ \| [\d,]+ \|")
    rows = [line for line in section.splitlines() if row.match(line)]
    assert len(rows) == len(rep.attention_rows) > 0
    assert f"({rep.attention_param_ratio * 100:.1f}% kept)" in " ".join(card.split())
    plain = str(render_model_card(compressed("bert")[0], "me/x"))
    assert "Query-key attention" not in plain and "compress_attention" not in plain


@pytest.mark.parametrize("arch, targets", [("bert", ["value"]), ("gpt2", ["c_fc"]), ("bert", ["query", "key"])],
                         ids=["bert", "gpt2", "bert-attention-only"])
def test_attention_compressed_checkpoints_count_like_the_live_model(arch, targets, tmp_path):
    """inspect (from the files) and the training stats must count the narrowed query/key projections
    back at their dense width, as report(model) does: the dense total is the dense model's own."""
    from tiny_models import CALIBRATION_TEXTS, bert_config, gpt2_config, tokenizer
    from transformers import BertModel, GPT2Model

    from drone_hf.training import compression_stats

    cls, cfg = (BertModel, bert_config()) if arch == "bert" else (GPT2Model, gpt2_config())
    torch.manual_seed(0)
    dense = cls(cfg).eval()
    dense_count = sum(p.numel() for p in dense.parameters())
    model = drone_hf.compress(dense, drone_hf.DroneConfig(
        dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tokenizer(), allocation="uniform",
        compress_attention=True, target_modules=targets), show_progress=False)
    model.save_pretrained(tmp_path)
    live, files = drone_hf.report(model), summarize_checkpoint(tmp_path).report
    assert files.attention_rows == live.attention_rows and len(files.attention_rows) == 2
    assert files.dense_model_params == live.dense_model_params == dense_count
    assert files.model_params == live.model_params == sum(p.numel() for p in model.parameters())
    stats = compression_stats(model)
    assert stats["drone/params_dense"] == dense_count and stats["drone/compressed_attention_layers"] == 2
    assert ("drone/rank_mean" in stats) == (targets != ["query", "key"])
