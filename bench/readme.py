"""The README's results tables, generated from ``bench/results/quality.json`` and ``deploy.json`` (never typed).

    python bench/readme.py            # rewrite the blocks between <!-- readme-results:... --> and <!-- readme-deploy:... -->
    python bench/readme.py --check    # exit 1 if README.md's blocks differ from what the JSON gives

``bench/quality.py`` calls ``splice_readme`` itself after a complete run written to its default
output. ``tests/test_bench_quality.py`` checks that the committed README block is what the committed
JSON gives, so a figure in the README cannot drift from the measurement behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["readme_block", "splice_readme", "QUALITY_JSON", "README"]

ROOT = Path(__file__).resolve().parents[1]
QUALITY_JSON = ROOT / "bench" / "results" / "quality.json"
DEPLOY_JSON = ROOT / "bench" / "results" / "deploy.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- readme-results:begin -->", "<!-- readme-results:end -->"
DEPLOY_BEGIN, DEPLOY_END = "<!-- readme-deploy:begin -->", "<!-- readme-deploy:end -->"

# (column heading, method row of the JSON); "ours" is the project default.
_COLUMNS = (("W4A16 RTN", "W4A16"), ("RTN W4A4", "RTN"), ("SmoothQuant W4A4", "SmoothQuant"), ("RPTQ-style W4A4", "RPTQ-style"))
_NAMES = {"smollm2-135m": "SmolLM2-135M", "opt-mini": "opt-mini"}


def _ppl(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}".replace("e+0", "e")


_TEXTS = {
    "eval": "software documentation, other documents than calibration; earlier recipe choices were made on it",
    "prose": "Ambrose Bierce's The Devil's Dictionary, literary English of 1881-1906; no choice has seen it",
}


def _text_figures(row: dict, text: str) -> dict:
    """A row's figures on one evaluation text (JSON written before per-text results: ``eval`` at the top level)."""
    if "texts" in row:
        return row["texts"].get(text) or {}
    return row if text == "eval" else {}


def readme_block(report: dict) -> str:
    """The Markdown between the README markers: command, table and the sentences the table supports."""
    rows = {(r["model"], r["method"]): r for r in report["rows"] if not r.get("error")}
    m, s = report["machine"], report["setup"]
    texts = s.get("texts", ["eval"])
    seeds = s.get("seeds", [])
    described = "; ".join(f"`{t}`: {_TEXTS[t]}" if t in _TEXTS else f"`{t}`" for t in texts)
    lines = [
        f"Measured with `{report['command'].strip()}` on {report['date'][:10]} ({m['cpu_count']} CPU cores, "
        f"torch {m['torch']}; calibration {s['calib_samples']} x {s['seq_len']} tokens of the built-in `calib` text, "
        f"evaluation {s['eval_windows']} x {s['seq_len']} tokens of each evaluation text ({described}), the same tokens "
        "for every row"
        + (f"; the default is the mean over seeds {', '.join(map(str, seeds))} (the rotation's random signs), its range in brackets"
           if len(seeds) > 1 else "")
        + "; full tables, machine and versions in [`bench/RESULTS.md`](bench/RESULTS.md)). This table is written by "
        "`python bench/readme.py` from `bench/results/quality.json`:",
        "",
        "| model | text | float | " + " | ".join(c for c, _ in _COLUMNS) + " | **default W4A4** | x float | ORT |",
        "|---|---|---:|" + "---:|" * len(_COLUMNS) + "---:|---:|---:|",
    ]
    notes = []
    for model in report["models"]:
        float_row, ours = rows.get((model, "float")), rows.get((model, "ours"))
        if float_row is None or ours is None:
            continue
        ratios = []
        for text in texts:
            f, o = _text_figures(float_row, text), _text_figures(ours, text)
            if not f.get("ppl_torch") or not o.get("ppl_torch"):
                continue
            cells = [_ppl(_text_figures(rows[(model, method)], text).get("ppl_torch")) if (model, method) in rows else "n/a"
                     for _, method in _COLUMNS]
            spread = f" ({_ppl(o['ppl_torch_min'])}–{_ppl(o['ppl_torch_max'])})" if o.get("ppl_torch_min") is not None else ""
            ratio = o["ppl_torch"] / f["ppl_torch"]
            ratios.append((text, ratio, o, f))
            lines.append(f"| {_NAMES.get(model, model)} | `{text}` | {_ppl(f['ppl_torch'])} | " + " | ".join(cells)
                         + f" | **{_ppl(o['ppl_torch'])}**{spread} | {ratio:.3f} | {_ppl(o.get('ppl_ort'))} |")
        if ratios:
            parts = []
            for text, ratio, o, f in ratios:
                part = f"{ratio:.3f}x float on `{text}`"
                if o.get("ppl_torch_min") is not None:
                    part += f" ({o['ppl_torch_min'] / f['ppl_torch']:.3f}–{o['ppl_torch_max'] / f['ppl_torch']:.3f} over seeds)"
                parts.append(part)
            refs = [(_text_figures(rows[(model, mm)], "eval").get("ppl_torch"), mm) for _, mm in _COLUMNS[1:] if (model, mm) in rows]
            refs = [(p, mm) for p, mm in refs if p]
            note = f"{_NAMES.get(model, model)}: the default is " + ", ".join(parts) + " in PyTorch"
            if refs:
                best_ppl, best = min(refs)
                note += f"; the best W4A4 reference on `eval` ({best}) is {best_ppl / _text_figures(float_row, 'eval')['ppl_torch']:.2f}x"
            notes.append(note + ".")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


_DEPLOY_ROWS = {"float": "float32", "ort-matmulnbits": "onnxruntime `MatMulNBitsQuantizer` W4",
                "genai-builder-int4": "onnxruntime-genai builder int4", "ours-w4a4": "**ours W4A4**",
                "ours-w4a4-acc0": "ours W4A4, accuracy level 0", "ours-w4a4-int4-table": "ours W4A4, int4 table (GPTQ)",
                "ours-w4a16": "ours W4A16 (weight-only, int4 table)"}


def deploy_block(report: dict) -> str:
    """The README's deployment table: size, prefill, decode and onnxruntime perplexity per row, ratios to float."""
    s = report["setup"]
    lines = [
        f"Measured with `{report['command'].strip()}` on {report['date'][:10]} ({report['machine']['cpu_count']} CPU cores, "
        f"{s['threads']} onnxruntime threads for every row; prefill = {s['prompt_tokens']} prompt tokens, decode = "
        f"{s['new_tokens']} new tokens after them, medians of {s['runs']} runs; perplexity on {s['eval_windows']} x "
        f"{s['seq_len']} `eval` tokens; every folder loaded and run by onnxruntime-genai; the full table, with RSS, "
        "load and op counts, is in `bench/RESULTS.md`). Written by `python bench/readme.py` from `bench/results/deploy.json`:",
        "",
        "| model | row | MiB (x float) | prefill ms (x float) | decode tok/s (x float) | ORT ppl (PyTorch) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model in report["models"]:
        rows = [r for r in report["rows"] if r["model"] == model]
        base = next((r for r in rows if r["row"] == "float" and "mib" in r), None)
        for r in rows:
            if "mib" not in r or base is None:
                continue

            def cell(key, fmt):
                return f"{r[key]:{fmt}} ({r[key] / base[key]:.2f}x)"

            torch_ppl = f" ({r['ppl_torch']:.3f})" if r.get("ppl_torch") and r["row"] != "float" else ""
            lines.append(f"| {_NAMES.get(model, model)} | {_DEPLOY_ROWS.get(r['row'], r['row'])} | {cell('mib', '.1f')} | "
                         f"{cell('prefill_ms', '.0f')} | {cell('decode_tokens_per_s', '.1f')} | {r['ppl']:.3f}{torch_ppl} |")
    return "\n".join(lines) + "\n"


def _splice(text: str, begin: str, end: str, block: str, readme: Path) -> str:
    i, j = text.find(begin), text.find(end)
    if i == -1 or j < i:
        raise ValueError(f"{readme} has no {begin} ... {end} block")
    return text[: i + len(begin)] + "\n" + block + text[j:]


def splice_readme(report: dict | None = None, readme: Path = README, deploy: dict | None = None) -> None:
    """Replace the README blocks with ``readme_block(report)`` and ``deploy_block(deploy)`` (either may be None)."""
    text = readme.read_text()
    if report is not None:
        text = _splice(text, BEGIN, END, readme_block(report), readme)
    if deploy is not None:
        text = _splice(text, DEPLOY_BEGIN, DEPLOY_END, deploy_block(deploy), readme)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text)
    tmp.replace(readme)


def current_block(readme: Path = README, begin: str = BEGIN, end: str = END) -> str:
    text = readme.read_text()
    i, j = text.find(begin), text.find(end)
    return text[i + len(begin) + 1: j] if i != -1 and j > i else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=QUALITY_JSON)
    p.add_argument("--deploy-json", type=Path, default=DEPLOY_JSON)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the README block is stale")
    args = p.parse_args(argv)
    report = json.loads(args.json.read_text())
    deploy = json.loads(args.deploy_json.read_text()) if args.deploy_json.is_file() else None
    if args.check:
        same = current_block(args.readme) == readme_block(report) and (
            deploy is None or current_block(args.readme, DEPLOY_BEGIN, DEPLOY_END) == deploy_block(deploy))
        print("README result blocks are up to date" if same else "README result blocks differ from the JSON")
        return 0 if same else 1
    splice_readme(report, args.readme, deploy)
    print(f"wrote the result blocks of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
