"""Build the second evaluation text (``prose.txt``) and the tuning split (``tune.txt``) of ``llmq_fx/data``.

    python3 tools/build_eval_texts.py --debs /tmp/llmq_debs

* ``prose.txt``: Ambrose Bierce's *The Devil's Dictionary* (1881-1906, public domain), from Debian 12's
  ``dict-devil`` package (its dictd database, entries in the order of the book). Literary satire and
  verse of a century ago: another domain than the software documentation that ``calib.txt`` and
  ``eval.txt`` hold. The dictd header entries (``00-database-*``) are dropped; entries are separated
  by a blank line, as in the book.
* ``tune.txt``: the documents of ``calib.txt`` after its first ``--calib-keep`` fraction of bytes (cut at a
  document boundary), removed from ``calib.txt``. Calibration takes its windows from the start of
  ``calib.txt``, so every calibration set up to the kept length is unchanged, and recipe choices can be
  made on text that neither evaluation text contains.

Running it twice does nothing the second time (``calib.txt`` is only cut when ``tune.txt`` is absent).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import subprocess
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "llmq_fx" / "data"
DOC_SEP = "\n\n\n"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64 with its own digit order, most significant first."""
    n = 0
    for ch in text:
        n = n * 64 + B64.index(ch)
    return n


def devils_dictionary(deb: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp) / "usr" / "share" / "dictd"
        data = gzip.decompress((root / "devil.dict.dz").read_bytes())
        index = (root / "devil.index").read_text(encoding="latin-1").splitlines()
    entries, seen = [], set()
    for line in index:
        word, offset, length = line.split("\t")
        if word.startswith("00database"):
            continue
        span = (_dictd_number(offset), _dictd_number(length))
        if span in seen:  # two headwords of one entry (BABE, BABY) share its text
            continue
        seen.add(span)
        entries.append(span)
    entries.sort()  # the book's order
    texts = [data[o:o + n].decode("latin-1").strip() for o, n in entries]
    return "\n\n".join(t for t in texts if t) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--debs", type=Path, default=Path("/tmp/llmq_debs"))
    p.add_argument("--calib-keep", type=float, default=0.6, help="fraction of calib.txt's bytes kept for calibration")
    args = p.parse_args()
    args.debs.mkdir(parents=True, exist_ok=True)
    if not list(args.debs.glob("dict-devil_*.deb")):
        subprocess.run(["apt-get", "download", "dict-devil"], cwd=args.debs, check=True)
    deb = sorted(args.debs.glob("dict-devil_*.deb"))[-1]
    (DATA / "prose.txt").write_text(devils_dictionary(deb), encoding="utf-8")

    tune = DATA / "tune.txt"
    if not tune.exists():
        calib = (DATA / "calib.txt").read_text(encoding="utf-8")
        docs = calib.split(DOC_SEP)
        kept, size = [], 0
        while docs and size < args.calib_keep * len(calib):
            kept.append(docs.pop(0))
            size += len(kept[-1]) + len(DOC_SEP)
        (DATA / "calib.txt").write_text(DOC_SEP.join(kept) + ("\n" if not kept[-1].endswith("\n") else ""), encoding="utf-8")
        tune.write_text(DOC_SEP.join(docs), encoding="utf-8")
    for name in ("calib", "tune", "eval", "prose"):
        text = (DATA / f"{name}.txt").read_text(encoding="utf-8")
        print(f"{name}.txt: {len(text.encode()):,} bytes, {len(text.split(DOC_SEP))} documents")


if __name__ == "__main__":
    main()
