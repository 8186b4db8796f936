#!/usr/bin/env python3
"""Build the built-in English text corpora of llmq_fx from Debian documentation packages.

Sources (all Debian bookworm ``main``, permissive licenses, English prose plus
the code examples that are part of the documents):

* ``python3.11-doc``    -- the CPython 3.11 documentation (PSF License Version 2)
* ``postgresql-doc-15`` -- the PostgreSQL 15 manual (PostgreSQL License, BSD-like)
* ``python-django-doc`` -- the Django 3.2 documentation (BSD-3-Clause)
* ``sphinx-doc`` (BSD-2-Clause), ``python-pytest-doc`` (MIT), ``python-flask-doc``
  (BSD-3-Clause), ``python-werkzeug-doc`` (BSD-3-Clause), ``python-setuptools-doc`` (MIT),
  ``python-sympy-doc`` (BSD-3-Clause) -- further Sphinx documentation sets

Each HTML page is one *document*.  Documents are converted to plain text with the
standard-library HTML parser (only the main content area is kept; navigation,
sidebars, footers, header links and index/search pages are dropped), then split
at document level with a fixed seed into three disjoint sets:

* ``llmq_fx/data/eval.txt``   (~300 KB) held-out evaluation text
* ``llmq_fx/data/calib.txt``  (~300 KB) calibration text
* ``<out>/train.txt``         everything else (tokenizer + LM training)

Usage (exact command used to build the shipped files)::

    python3 tools/build_corpus.py --debs /tmp/llmq_debs --train-out /tmp/llmq_corpus

It downloads the .deb files with ``apt-get download`` into ``--debs``
(skipped when they are already there) and unpacks them with ``dpkg-deb -x``.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from html.parser import HTMLParser

PACKAGES = {
    # package: (doc root inside the package, license)
    "python3.11-doc": ("usr/share/doc/python3.11/html", "PSF-2.0 (Python Software Foundation License Version 2)"),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html", "PostgreSQL License (BSD-style)"),
    "python-django-doc": ("usr/share/doc/python-django-doc/html", "BSD-3-Clause"),
    "sphinx-doc": ("usr/share/doc/sphinx-doc/html", "BSD-2-Clause"),
    "python-pytest-doc": ("usr/share/doc/python-pytest-doc/html", "MIT (Expat)"),
    "python-flask-doc": ("usr/share/doc/python-flask-doc/html", "BSD-3-Clause"),
    "python-werkzeug-doc": ("usr/share/doc/python-werkzeug-doc/html", "BSD-3-Clause"),
    "python-setuptools-doc": ("usr/share/doc/python-setuptools-doc/html", "MIT"),
    "python-sympy-doc": ("usr/share/doc/python-sympy-doc/html", "BSD-3-Clause"),
}

# pages that are indexes, generated listings, or huge changelogs rather than prose
SKIP_PATH_RE = re.compile(
    r"(^|/)(_sources|_modules|_static|_images|genindex[^/]*|search|py-modindex|modindex|"
    r"bookindex|changelog|objects\.inv|searchindex)(\.html)?(/|$)"
)

BLOCK_TAGS = {
    "p", "div", "section", "article", "br", "li", "ul", "ol", "dl", "dt", "dd", "table",
    "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "figure", "caption",
    "hr", "title", "tbody", "thead",
}
SKIP_TAGS = {"script", "style", "head", "noscript", "form", "button", "select", "textarea"}
SKIP_CLASSES = {
    "headerlink", "navheader", "navfooter", "sphinxsidebar", "related", "footer", "nav",
    "c-content-win", "sphinxsidebarwrapper", "toc", "breadcrumbs", "navigation", "copyright",
}
SKIP_IDS = {"hd", "ft", "global-nav", "searchbox", "sidebar", "footer"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed",
             "source", "track", "wbr", "param"}


class _Extractor(HTMLParser):
    """Collect the text of the main content area of a documentation page."""

    def __init__(self, content_pred):
        super().__init__(convert_charrefs=True)
        self.content_pred = content_pred  # (tag, attrs) -> bool: start of main content
        self.stack = []  # list of (tag, in_content, skipping, in_pre)
        self.out = []

    def _state(self):
        if self.stack:
            return self.stack[-1][1:]
        return (False, False, False)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        in_content, skipping, in_pre = self._state()
        classes = set((a.get("class") or "").split())
        if not in_content and self.content_pred(tag, a):
            in_content = True
        if tag in SKIP_TAGS or classes & SKIP_CLASSES or a.get("id") in SKIP_IDS:
            skipping = True
        if tag == "pre":
            in_pre = True
        if in_content and not skipping and tag in BLOCK_TAGS:
            self.out.append("\n\n" if tag not in ("br", "li", "tr", "dt", "dd") else "\n")
        if tag in VOID_TAGS:
            return
        self.stack.append((tag, in_content, skipping, in_pre))

    def handle_startendtag(self, tag, attrs):
        in_content, skipping, _ = self._state()
        if in_content and not skipping and tag in ("br", "hr"):
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        # pop to the matching tag (tolerate sloppy HTML)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                in_content, skipping, _ = self.stack[i][1:]
                del self.stack[i:]
                if in_content and not skipping and tag in BLOCK_TAGS:
                    self.out.append("\n\n")
                return

    def handle_data(self, data):
        in_content, skipping, in_pre = self._state()
        if not in_content or skipping:
            return
        if in_pre:
            self.out.append("\x00PRE" + data.replace("\n", "\x00NL") + "\x00END")
        else:
            self.out.append(data)


def _normalize(raw: str) -> str:
    # inside <pre>, newlines are protected by markers; outside, collapse whitespace
    raw = raw.replace("\xa0", " ").replace("\u00b6", "")
    parts = re.split(r"\x00PRE|\x00END", raw)
    buf = []
    for i, p in enumerate(parts):
        if i % 2 == 1:  # pre content
            buf.append(p.replace("\x00NL", "\x00N"))
        else:
            p = re.sub(r"[ \t\r\f\v]+", " ", p)
            p = re.sub(r" *\n *", "\n", p)
            buf.append(p)
    text = "".join(buf)
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = text.replace("\x00N", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    # drop stray non-printing control characters
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or ch >= " ")
    return text


def _content_pred(pkg):
    if pkg not in ("python-django-doc", "postgresql-doc-15"):  # Sphinx themes
        return lambda tag, a: a.get("role") == "main" or "body" in (a.get("class") or "").split()
    if pkg == "python-django-doc":
        return lambda tag, a: a.get("id") == "yui-main"
    return lambda tag, a: tag == "body"  # PostgreSQL DocBook pages: body minus nav header/footer


def html_to_text(path, pkg):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        src = f.read()
    p = _Extractor(_content_pred(pkg))
    p.feed(src)
    p.close()
    return _normalize("".join(p.out))


def ensure_debs(deb_dir):
    os.makedirs(deb_dir, exist_ok=True)
    versions = {}
    for pkg in PACKAGES:
        found = glob.glob(os.path.join(deb_dir, f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=deb_dir, check=True)
            found = glob.glob(os.path.join(deb_dir, f"{pkg}_*.deb"))
        deb = sorted(found)[-1]
        ver = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True,
                             text=True, check=True).stdout.strip()
        root = os.path.join(deb_dir, "root")
        marker = os.path.join(root, f".{pkg}.unpacked")
        if not os.path.exists(marker):
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
            open(marker, "w").close()
        sha = hashlib.sha256(open(deb, "rb").read()).hexdigest()
        versions[pkg] = {"version": ver, "deb": os.path.basename(deb), "sha256": sha}
    return versions


def collect_docs(deb_dir, min_chars=400):
    root = os.path.join(deb_dir, "root")
    docs = []
    for pkg, (sub, _lic) in PACKAGES.items():
        base = os.path.join(root, sub)
        for path in sorted(glob.glob(os.path.join(base, "**", "*.html"), recursive=True)):
            rel = os.path.relpath(path, base)
            if SKIP_PATH_RE.search(rel) or rel in ("index.html", "contents.html"):
                continue
            text = html_to_text(path, pkg)
            if len(text) < min_chars:
                continue
            docs.append({"pkg": pkg, "path": rel, "text": text})
    return docs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debs", default="/tmp/llmq_debs", help="folder for the downloaded/unpacked .deb files")
    ap.add_argument("--train-out", default="/tmp/llmq_corpus", help="folder for train.txt (outside the repo)")
    ap.add_argument("--data-out", default=os.path.join(os.path.dirname(__file__), "..", "llmq_fx", "data"))
    ap.add_argument("--eval-bytes", type=int, default=300_000)
    ap.add_argument("--calib-bytes", type=int, default=300_000)
    ap.add_argument("--max-doc-bytes", type=int, default=40_000,
                    help="only documents at most this big go to eval/calib (more, smaller documents)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    versions = ensure_debs(args.debs)
    docs = collect_docs(args.debs)
    # exact-duplicate removal (some pages are repeated verbatim)
    seen, uniq = set(), []
    for d in docs:
        h = hashlib.sha1(d["text"].encode()).hexdigest()
        if h not in seen:
            seen.add(h)
            uniq.append(d)
    docs = uniq
    rng = random.Random(args.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)

    evl, cal, trn = [], [], []
    ev_b = ca_b = 0
    for i in order:
        d = docs[i]
        nb = len(d["text"].encode())
        if nb <= args.max_doc_bytes and ev_b < args.eval_bytes:
            evl.append(d); ev_b += nb + 3
        elif nb <= args.max_doc_bytes and ca_b < args.calib_bytes:
            cal.append(d); ca_b += nb + 3
        else:
            trn.append(d)

    def write(path, ds):
        with open(path, "w", encoding="utf-8") as f:
            # documents are separated by a blank line *pair* ("\n\n\n"); inside a
            # document there is never more than one blank line in a row
            f.write("\n\n\n".join(d["text"] for d in ds) + "\n")

    os.makedirs(args.data_out, exist_ok=True)
    os.makedirs(args.train_out, exist_ok=True)
    write(os.path.join(args.data_out, "eval.txt"), evl)
    write(os.path.join(args.data_out, "calib.txt"), cal)
    write(os.path.join(args.train_out, "train.txt"), trn)

    def stats(ds):
        by = {}
        for d in ds:
            s = by.setdefault(d["pkg"], [0, 0])
            s[0] += 1
            s[1] += len(d["text"].encode())
        return {k: {"docs": v[0], "bytes": v[1]} for k, v in sorted(by.items())}

    manifest = {
        "packages": {k: dict(v, license=PACKAGES[k][1]) for k, v in versions.items()},
        "seed": args.seed,
        "splits": {"eval": stats(evl), "calib": stats(cal), "train": stats(trn)},
        "eval_docs": [f'{d["pkg"]}:{d["path"]}' for d in evl],
        "calib_docs": [f'{d["pkg"]}:{d["path"]}' for d in cal],
    }
    with open(os.path.join(args.train_out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    # sanity: document-level disjointness
    ids = lambda ds: {(d["pkg"], d["path"]) for d in ds}
    assert not (ids(evl) & ids(cal)) and not (ids(evl) & ids(trn)) and not (ids(cal) & ids(trn))
    json.dump({k: manifest[k] for k in ("packages", "splits")}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
