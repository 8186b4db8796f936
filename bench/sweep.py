"""Perplexity sweep: float, W8A8, W4A4 per-tensor and W4A4 with n clusters, with and without smoothing.

    python bench/sweep.py --model smollm2-135m --out bench/results/sweep_smollm2-135m

Writes ``<out>.json`` and ``<out>.md``. Same calibration tokens (first ``--calib-samples`` windows of
the built-in calibration text) and the same evaluation tokens (first ``--eval-windows`` windows of
the built-in ``tune`` text, the split kept for choosing recipes; ``--text eval`` or ``prose`` only to
report, never to choose) for every row.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import llmq_fx
from llmq_fx.corpus import calibration_set, load_text, tokenize
from llmq_fx.evaluate import perplexity
from llmq_fx.models import load_model


# The sweep is about static clusters x smoothing with round-to-nearest weights: pin the keys of the
# default recipe (rotation, GPTQ, dynamic activations, clipping) off, so that rows stay comparable.
STATIC = dict(rotate=False, gptq=False, a_dynamic=False, a_clip_ratio=1.0, w_clip=False)


def grid(clusters: list[int], alphas: list[float | None]) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = [("W8A8 per-tensor", dict(w_bits=8, a_bits=8, n_clusters=1, smooth_alpha=None))]
    for alpha in alphas:
        tag = "no smoothing" if alpha is None else f"alpha {alpha}"
        rows.append((f"W4A4 per-tensor, {tag}", dict(w_bits=4, a_bits=4, n_clusters=1, smooth_alpha=alpha)))
        for k in clusters:
            rows.append((f"W4A4 {k} clusters, {tag}", dict(w_bits=4, a_bits=4, n_clusters=k, smooth_alpha=alpha)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-mini")
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--text", default="tune", help="text scored (default tune: the split recipe choices are made on)")
    p.add_argument("--clusters", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--features", default="minmax")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    model, tok = load_model(args.model)
    gm = llmq_fx.trace(model)
    calib = calibration_set(tokenize(tok, load_text("calib")), args.calib_samples, args.seq_len)
    tokens = tokenize(tok, load_text(args.text))
    results = []
    t0 = time.perf_counter()
    fp = perplexity(gm, tokens, args.seq_len, args.eval_windows)
    results.append({"method": "float", "config": None, "ppl": fp.ppl, "seconds": time.perf_counter() - t0})
    print(f"float: {fp.ppl:.3f}", flush=True)
    for name, kw in grid(args.clusters, [None] + args.alphas):
        cfg = llmq_fx.QuantConfig(cluster_features=args.features, **{**STATIC, **kw})
        t0 = time.perf_counter()
        qgm = llmq_fx.quantize(gm, calib, cfg, progress=False)
        res = perplexity(qgm, tokens, args.seq_len, args.eval_windows)
        results.append({"method": name, "config": cfg.to_dict(), "ppl": res.ppl, "seconds": time.perf_counter() - t0})
        print(f"{name}: {res.ppl:.3f}", flush=True)
        del qgm

    meta = {
        "model": args.model, "seq_len": args.seq_len, "calib_tokens": int(calib.numel()), "eval_tokens": fp.tokens,
        "eval_windows": fp.windows, "features": args.features, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": torch.get_num_threads(),
        "command": "python bench/sweep.py " + " ".join(f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}" for k, v in vars(args).items()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# Perplexity sweep: {args.model}", "", f"`{meta['command']}`", "",
             f"seq {args.seq_len}, {meta['eval_windows']} eval windows ({meta['eval_tokens']} predicted tokens), "
             f"{meta['calib_tokens']} calibration tokens, k-means features {args.features}, torch {torch.__version__}, CPU",
             "", "| method | perplexity |", "|---|---|"]
    lines += [f"| {r['method']} | {r['ppl']:.2f} |" for r in results]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
