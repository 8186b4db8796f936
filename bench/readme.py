"""The README's results table, generated from ``bench/results/quality.json`` (never typed by hand).

    python bench/readme.py            # rewrite the block between <!-- readme-results:begin/end --> in README.md
    python bench/readme.py --check    # exit 1 if README.md's block differs from what the JSON gives

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
README = ROOT / "README.md"
BEGIN, END = "<!-- readme-results:begin -->", "<!-- readme-results:end -->"

# (column heading, method row of the JSON); "ours" is the project default.
_COLUMNS = (("W4A16 RTN", "W4A16"), ("RTN W4A4", "RTN"), ("SmoothQuant W4A4", "SmoothQuant"), ("RPTQ-style W4A4", "RPTQ-style"))
_NAMES = {"smollm2-135m": "SmolLM2-135M", "opt-mini": "opt-mini"}


def _ppl(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}".replace("e+0", "e")


def readme_block(report: dict) -> str:
    """The Markdown between the README markers: command, table and the sentences the table supports."""
    rows = {(r["model"], r["method"]): r for r in report["rows"] if not r.get("error")}
    m, s = report["machine"], report["setup"]
    lines = [
        f"Measured with `{report['command'].strip()}` on {report['date'][:10]} ({m['cpu_count']} CPU cores, "
        f"torch {m['torch']}; calibration {s['calib_samples']} x {s['seq_len']} tokens of the built-in `calib` text, "
        f"evaluation {s['eval_windows']} x {s['seq_len']} tokens of the built-in `eval` text, the same tokens for every "
        "row; full tables, machine and versions in [`bench/RESULTS.md`](bench/RESULTS.md)). This table is written by "
        "`python bench/readme.py` from `bench/results/quality.json`:",
        "",
        "| model | float | " + " | ".join(c for c, _ in _COLUMNS) + " | **default W4A4** (ORT) |",
        "|---|---:|" + "---:|" * len(_COLUMNS) + "---:|",
    ]
    notes = []
    for model in report["models"]:
        float_row, ours = rows.get((model, "float")), rows.get((model, "ours"))
        if float_row is None or ours is None:
            continue
        cells = [_ppl(rows[(model, method)]["ppl_torch"]) if (model, method) in rows else "n/a" for _, method in _COLUMNS]
        ort = f" ({_ppl(ours.get('ppl_ort'))})" if ours.get("ppl_ort") is not None else ""
        lines.append(f"| {_NAMES.get(model, model)} | {_ppl(float_row['ppl_torch'])} | " + " | ".join(cells)
                     + f" | **{_ppl(ours['ppl_torch'])}**{ort} |")
        refs = [(rows[(model, m)]["ppl_torch"], m) for _, m in _COLUMNS[1:] if (model, m) in rows and rows[(model, m)].get("ppl_torch")]
        best_ppl, best = min(refs) if refs else (None, None)
        ratio = ours["ppl_torch"] / float_row["ppl_torch"]
        ort_ratio = ours["ppl_ort"] / float_row["ppl_ort"] if ours.get("ppl_ort") and float_row.get("ppl_ort") else None
        note = (f"{_NAMES.get(model, model)}: the default is {ratio:.3f}x float in PyTorch"
                + (f" ({ort_ratio:.3f}x in onnxruntime)" if ort_ratio else "")
                + f", a gap of {ours['ppl_torch'] - float_row['ppl_torch']:.2f} perplexity points")
        if best is not None:
            note += f" against {best_ppl - float_row['ppl_torch']:.2f} for the best W4A4 reference ({best})"
        notes.append(note + ".")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def splice_readme(report: dict, readme: Path = README) -> None:
    """Replace the block between the README markers with ``readme_block(report)``."""
    text = readme.read_text()
    i, j = text.find(BEGIN), text.find(END)
    if i == -1 or j < i:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block")
    new = text[: i + len(BEGIN)] + "\n" + readme_block(report) + text[j:]
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new)
    tmp.replace(readme)


def current_block(readme: Path = README) -> str:
    text = readme.read_text()
    i, j = text.find(BEGIN), text.find(END)
    return text[i + len(BEGIN) + 1: j] if i != -1 and j > i else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=QUALITY_JSON)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the README block is stale")
    args = p.parse_args(argv)
    report = json.loads(args.json.read_text())
    if args.check:
        same = current_block(args.readme) == readme_block(report)
        print("README results block is up to date" if same else "README results block differs from the JSON")
        return 0 if same else 1
    splice_readme(report, args.readme)
    print(f"wrote the results block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
