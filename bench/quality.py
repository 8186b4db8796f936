"""Quality against the reference methods: perplexity of RTN, SmoothQuant, RPTQ-style and ours, same pipeline.

    python bench/quality.py                                   # smollm2-135m and opt-mini, every recipe
    python bench/quality.py --models opt-mini --recipes RTN ours --extra 'ours-no-smooth={"smooth_alpha": null}'
    python bench/quality.py --device cuda --no-ort            # PyTorch side on the GPU, no ONNX

Every method is a ``QuantConfig`` of the one ``llmq_fx.quantize`` pipeline (``RECIPES`` below, each with
a description and a citation), so rows differ only in their config. For each model: the float graph
first, then every method, all calibrated on the same tokens (the first ``--calib-samples`` windows of
``--seq-len`` tokens of the built-in ``calib`` text) and scored on the same tokens (the first
``--eval-windows`` windows of the built-in ``eval`` text, ``llmq_fx.evaluate.perplexity``). Each row:

* quantize: wall time of ``llmq_fx.quantize`` (its graph copy included) on ``--device``;
* PyTorch perplexity of the quantized graph on ``--device``;
* unless ``--no-ort``: ``llmq_fx.export.to_onnx`` into a temporary folder, the file's size, and the
  perplexity of that file in onnxruntime (CPU, QDQ run as written). A row whose onnxruntime perplexity
  is more than 1% away from its PyTorch perplexity is flagged in the table.

``ours`` is ``QuantConfig()`` as it is when the script runs (the project default recipe); the resolved
config of every row is in the JSON. The baselines pin every method-defining key, so a change of the
project defaults moves the ``ours`` row only. ``--extra NAME=JSON`` adds a row: ``QuantConfig()``
defaults overridden by JSON, or, with ``"base": "<recipe>"`` in the JSON, that recipe overridden.

Output: ``<--out>.json`` (rows, recipes, command, machine, versions, date; rewritten after every row,
``complete`` false until the end), ``<--out>.md`` (the tables), and the same tables spliced into
``--results-md`` between ``<!-- quality:begin -->`` and ``<!-- quality:end -->`` (other content kept).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import llmq_fx
from llmq_fx.config import QuantConfig

__all__ = ["RECIPES", "resolve_recipe", "parse_extra", "evaluate_methods", "run_model", "markdown", "splice_results_md"]

BENCH = Path(__file__).resolve().parent
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
_DEFAULT_OUT = BENCH / "results" / "quality"
ORT_TOLERANCE = 0.01  # relative perplexity difference between onnxruntime and PyTorch that gets a row flagged
MIB = 2**20
_VERSIONED = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "scikit-learn", "numpy")

# Every key that changes *what* is computed, pinned for the baselines: if the project default turns
# on, say, rotation, RTN must stay RTN. Keys of convenience (seed, k-means restarts, batch size) come
# from QuantConfig() like everything else.
_PLAIN = dict(
    w_bits=4, a_bits=4, w_group_size=None, a_symmetric=False, a_dynamic=False, smooth_alpha=None,
    smooth_sites=["qkv", "fc1"], n_clusters=1, cluster_features="minmax", a_outlier_bits=None,
    rotate=False, gptq=False, gptq_act_aware=None, w_clip=False, a_clip_ratio=1.0, a_group_size=None,
    embed_bits=None, lm_head_bits=None, skip=["lm_head"],
)

# RPTQ4LLM (hahnyuan/RPTQ4LLM, commit 5d7a014, main.py lines 196-200): --R1_clusters 32, --R2_clusters 4,
# --R3_clusters 4, --R4_clusters 32, --R5_clusters 32, --reorder 12345. What each R_i reorders is in
# quantize/opt_reorder_quantize.py (opt_reorder_quantize's hooks and R1_reorder..R5_reorder):
#   R1: self_attn_layer_norm output = q/k/v input      -> qkv
#   R2: q_proj and k_proj outputs (the Q K^T matmul)    -> none: llmq_fx does not quantize attention matmuls
#   R3: out_proj input (the P V output)                 -> out_proj
#   R4: final_layer_norm output = fc1 input             -> fc1   (Llama: gate/up input)
#   R5: fc2 input (after ReLU)                          -> fc2   (Llama: down_proj input)
# lm_head (role other) is not quantized by RPTQ; here it is skipped anyway (skip=["lm_head"]).
RPTQ_CLUSTERS = {"qkv": 32, "out_proj": 4, "fc1": 32, "fc2": 32, "other": 1}

RECIPES: dict[str, dict] = {
    "W8A8": {
        "description": "SmoothQuant-style W8A8 for orientation: W8 per-channel, A8 per-tensor static, alpha 0.5 at norm -> linear sites",
        "citation": "Xiao et al. 2023, SmoothQuant, arXiv:2211.10438 (mit-han-lab/smoothquant)",
        "config": {**_PLAIN, "w_bits": 8, "a_bits": 8, "smooth_alpha": 0.5, "smooth_sites": ["qkv", "fc1"]},
    },
    "W4A16": {
        "description": "weight-only for orientation: W4 per-channel round-to-nearest, activations in float",
        "citation": "RTN weight-only baseline of Frantar et al. 2022, GPTQ, arXiv:2210.17323",
        "config": {**_PLAIN, "a_bits": None},
    },
    "RTN": {
        "description": "W4 per-channel round-to-nearest, A4 per-tensor static (asymmetric), no smoothing",
        "citation": "the round-to-nearest baseline of GPTQ (arXiv:2210.17323) and SmoothQuant (arXiv:2211.10438)",
        "config": dict(_PLAIN),
    },
    "SmoothQuant": {
        "description": "SmoothQuant alpha 0.5 folded into the norms (qkv and fc1 sites only), W4 per-channel, A4 per-tensor static",
        "citation": "Xiao et al. 2023, SmoothQuant, arXiv:2211.10438 (mit-han-lab/smoothquant)",
        "config": {**_PLAIN, "smooth_alpha": 0.5, "smooth_sites": ["qkv", "fc1"]},
    },
    "RPTQ-style": {
        "description": (
            "k-means on per-channel (min, max), one static scale per cluster, no smoothing, W4 per-channel GPTQ "
            "(act-order) as RPTQ4LLM's --w_quantizer gptq (L202-204); clusters per site = RPTQ4LLM defaults "
            "(main.py L196-200 at 5d7a014: R1 32 -> qkv, R3 4 -> out_proj, R4 32 -> fc1, R5 32 -> fc2; R2 reorders "
            "Q/K for QK^T, not quantized here). Unlike RPTQ4LLM: symmetric weights, min/max not EMA ranges, and A4 "
            "at qkv/fc1 where RPTQ4LLM quantizes LayerNorm outputs at max(8, abits) bits (L307-308)"
        ),
        "citation": "Yuan et al. 2023, RPTQ, arXiv:2304.01089 (hahnyuan/RPTQ4LLM)",
        "config": {**_PLAIN, "n_clusters": dict(RPTQ_CLUSTERS), "cluster_features": "minmax", "gptq": True},
    },
    "ours": {
        "description": "the project default recipe: QuantConfig() as resolved when this run started",
        "citation": "llmq_fx (this repository), llmq_fx/config.py",
        "config": None,  # None: QuantConfig() at run time
        "seeded": True,  # run once per --seeds value (the rotation's random signs), reported as mean and range
    },
}

logger = logging.getLogger(__name__)
_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[quality {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- recipes -----------------------------------------------------------------------------------
def resolve_recipe(recipe: dict) -> QuantConfig:
    """The ``QuantConfig`` of a recipe: QuantConfig() defaults overridden by ``recipe["config"]``."""
    return QuantConfig.from_dict({**QuantConfig().to_dict(), **(recipe["config"] or {})})


def parse_extra(text: str, recipes: dict[str, dict] = RECIPES) -> tuple[str, dict]:
    """``NAME=JSON`` -> ``(NAME, recipe)``: QuantConfig() defaults (or ``"base"``'s config) overridden by JSON."""
    name, sep, payload = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--extra takes NAME=JSON, got {text!r}")
    try:
        overrides = json.loads(payload)
    except json.JSONDecodeError as err:
        raise ValueError(f"--extra {name}: not JSON: {err}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--extra {name}: the JSON must be an object of config keys, got {payload!r}")
    base = overrides.pop("base", None)
    if base is not None and base not in recipes:
        raise ValueError(f"--extra {name}: unknown base recipe {base!r}; choose from {', '.join(recipes)}")
    config = {**((recipes[base]["config"] or {}) if base else {}), **overrides}
    recipe = {
        "description": f"{base or 'QuantConfig() defaults'} overridden by {json.dumps(overrides)}",
        "citation": "ad-hoc (--extra)",
        "config": config,
        "seeded": True,
    }
    resolve_recipe(recipe)  # unknown keys and bad values fail now, not after an hour of other rows
    return name, recipe


def config_short(cfg: dict | None) -> str:
    """One line saying what a resolved config does (for the methods list)."""
    if cfg is None:
        return "float"
    config = QuantConfig.from_dict(cfg)
    w = "float" if cfg["w_bits"] is None else f"W{cfg['w_bits']} " + (
        "per-channel" if cfg.get("w_group_size") is None else f"group {cfg['w_group_size']}") + (
        " GPTQ" if cfg.get("gptq") else " RTN") + (" clip-search" if cfg.get("w_clip") else "") + (
        (f" act-aware {cfg['gptq_act_aware']}" + (" sequential" if config.runs_sequential_gptq() else ""))
        if config.act_aware_unavailable() is None else "")
    if cfg["a_bits"] is None:
        a = "A16"
    elif cfg.get("a_dynamic"):
        a = f"A{cfg['a_bits']} per-token dynamic" + (f" in groups of {cfg['a_group_size']}" if cfg.get("a_group_size") else "")
    else:
        nc = cfg["n_clusters"]
        clusters = "per-tensor" if nc == 1 else (f"{nc} clusters" if isinstance(nc, int) else "clusters " + ", ".join(f"{k} {v}" for k, v in nc.items()))
        a = f"A{cfg['a_bits']} static {clusters} ({cfg.get('cluster_features')})" if nc != 1 else f"A{cfg['a_bits']} static per-tensor"
        if cfg.get("a_outlier_bits") is not None:
            a += f", {cfg.get('a_outlier_clusters')} outlier cluster(s) at {cfg['a_outlier_bits']} bits"
    a += ", symmetric" if cfg.get("a_symmetric") and cfg["a_bits"] is not None else ""
    if cfg["a_bits"] is not None and cfg.get("a_clip_search") and config.runs_sequential_gptq():
        a += f", ranges clipped per site (best of {', '.join(map(str, cfg['a_clip_search']))})"
    elif cfg["a_bits"] is not None and cfg.get("a_clip_ratio", 1.0) != 1.0:
        a += f", ranges clipped to {cfg['a_clip_ratio']}"
    s = "no smoothing" if cfg.get("smooth_alpha") is None or not cfg.get("smooth_sites") else (
        f"smooth alpha {cfg['smooth_alpha']} at {'/'.join(cfg['smooth_sites'])}")
    rotation = {True: ["Hadamard rotation"], "auto": ["Hadamard rotation (where the graph allows)"]}.get(cfg.get("rotate"), [])
    if rotation and config.residual_order() is not None:
        rotation[0] += (", residual channels in balanced k-means clusters of the activation group" if cfg["sort_residual"] == "kmeans"
                        else ", residual channels sorted by range")
    if rotation and cfg.get("learn_rotation_steps"):
        rotation[0] += f", a learned rotation ({cfg['learn_rotation_steps']} steps)"
    tables = []
    if cfg.get("embed_bits"):
        tables.append(f"embedding W{cfg['embed_bits']} groups of {cfg.get('embed_group_size')}")
    if cfg.get("lm_head_bits"):
        tables.append(f"lm_head W{cfg['lm_head_bits']} groups of {cfg.get('lm_head_group_size')}"
                      + (" (A8 input)" if cfg["lm_head_bits"] == 8 else " (float input)")
                      + (" by GPTQ" if cfg.get("lm_head_gptq") else "")
                      + (", one table with the embedding where the model ties them"
                         if (cfg.get("embed_bits"), cfg.get("embed_group_size")) == (cfg["lm_head_bits"], cfg.get("lm_head_group_size"))
                         else ""))
    parts = [w, a, s] + rotation + tables
    floats = [p for p in (cfg.get("skip") or []) if not (p == "lm_head" and cfg.get("lm_head_bits"))]
    return "; ".join(parts) + f"; float: {', '.join(floats) or 'none'}"


# -- measuring ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _ort_ppl(gm, path: Path, texts: dict[str, torch.Tensor], seq_len: int, n_windows: int, batch_size: int) -> tuple[dict, int, float, float]:
    """Export ``gm`` to ``path`` (to_onnx exports on the CPU and leaves ``gm`` where it is); onnxruntime
    perplexity per text, file bytes, export s, eval s."""
    from llmq_fx.evaluate import perplexity
    from llmq_fx.export import OnnxCausalLM, onnx_qdq_report, to_onnx

    t0 = time.perf_counter()
    to_onnx(gm, path)
    export_s = time.perf_counter() - t0
    report = onnx_qdq_report(path)
    t0 = time.perf_counter()
    runner = OnnxCausalLM(path)
    out = {}
    for name, tokens in texts.items():
        res = perplexity(runner, tokens, seq_len, n_windows, batch_size)
        out[name] = {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens}
    eval_s = time.perf_counter() - t0
    del runner
    return {"texts": out, "onnx": report}, report["file_bytes"], export_s, eval_s


def _aggregate(values: list[float | None]) -> dict:
    """Mean and range of one figure over seeds (None when any seed gave no finite value)."""
    if not values or any(v is None for v in values):
        return {"mean": None, "min": None, "max": None, "values": values}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def evaluate_methods(
    gm,
    calib: torch.Tensor,
    tokens: torch.Tensor,
    methods: dict[str, dict],
    *,
    model: str = "",
    seq_len: int = 512,
    eval_windows: int = 16,
    eval_batch_size: int = 1,
    device: str | torch.device = "cpu",
    ort: bool = True,
    fail_fast: bool = False,
    on_row=None,
    texts: dict[str, torch.Tensor] | None = None,
    seeds: tuple[int, ...] = (0,),
) -> list[dict]:
    """Float row, then one row per method (name -> recipe), all on the same calibration and evaluation tokens.

    Args:
        gm: the float graph (``llmq_fx.trace``), on ``device``; never modified.
        calib: ``[N, T]`` calibration ids; tokens: the 1-D stream of the primary evaluation text (``eval``).
        methods: name -> recipe (``{"description", "citation", "config"}``, config None = QuantConfig();
            ``"seeded": True`` runs it once per seed in ``seeds``).
        on_row: called with the list of rows after every row (to save progress).
        texts: further evaluation texts, name -> 1-D token stream, scored like ``tokens``.
        seeds: the ``seed`` values a seeded method runs with; its figures are the mean over them
            (``*_seeds`` keys hold each seed's value, ``texts[name]`` min/max).

    Returns:
        One dict per row; a failed row carries ``error`` (unless ``fail_fast``, which re-raises). The
        top-level ``ppl_torch``/``ppl_ort``/``ratio_to_float`` are the primary text's; ``texts`` holds
        every text's figures (the primary one under ``"eval"``).
    """
    import dataclasses

    from llmq_fx.evaluate import perplexity

    device = torch.device(device)
    all_texts = {"eval": tokens, **(texts or {})}
    rows: list[dict] = []
    float_row: dict = {}

    def finish(row: dict) -> None:
        for name, t in row.get("texts", {}).items():
            ft = float_row.get("texts", {}).get(name, {})
            if t.get("ppl_torch") is not None and ft.get("ppl_torch"):
                t["ratio_to_float"] = t["ppl_torch"] / ft["ppl_torch"]
            if t.get("ppl_ort") is not None and ft.get("ppl_ort"):
                t["ort_ratio_to_float"] = t["ppl_ort"] / ft["ppl_ort"]
            if t.get("ppl_torch") is not None and t.get("ppl_ort") is not None:
                t["ort_vs_torch"] = t["ppl_ort"] / t["ppl_torch"] - 1
        fp, fo = float_row.get("ppl_torch"), float_row.get("ppl_ort")
        p, o = row.get("ppl_torch"), row.get("ppl_ort")
        if p is not None and fp:
            row["ratio_to_float"], row["gap_to_float"] = p / fp, p - fp
        if o is not None and fo:
            row["ort_ratio_to_float"] = o / fo
        if p is not None and o is not None:
            row["ort_vs_torch"] = o / p - 1
            row["ort_flag"] = abs(row["ort_vs_torch"]) > ORT_TOLERANCE
        elif row.get("ppl_torch_raw") is not None or row.get("ppl_ort_raw") is not None:
            row["ort_flag"] = True  # a non-finite perplexity on either side is never silently fine
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    entries = [("float", {"description": "the float32 model, traced (llmq_fx.trace)", "citation": "", "config": None}, None)]
    entries += [(name, recipe, resolve_recipe(recipe)) for name, recipe in methods.items()]
    for name, recipe, config in entries:
        row = {"model": model, "method": name, "description": recipe["description"], "citation": recipe["citation"],
               "config": None if config is None else config.to_dict()}
        row["config_short"] = config_short(row["config"])
        run_seeds = list(seeds) if recipe.get("seeded") and config is not None else [None]
        if run_seeds != [None]:
            row["seeds"] = run_seeds
        _progress(f"{model} / {name}: {row['config_short']}" + (f" (seeds {run_seeds})" if run_seeds != [None] else ""))
        qgm = target = None
        try:
            per_seed = []
            for seed in run_seeds:
                got: dict = {"texts": {n: {} for n in all_texts}}
                if config is None:
                    target = gm
                else:
                    cfg = config if seed is None else dataclasses.replace(config, seed=seed)
                    _sync(device)
                    t0 = time.perf_counter()
                    qgm = llmq_fx.quantize(gm, calib.to(device), cfg, progress=False)
                    _sync(device)
                    got["quantize_s"] = time.perf_counter() - t0
                    got["quantize_stages_s"] = dict(qgm.meta["llmq_fx"].get("timings_s", {}))
                    target = qgm
                    _progress(f"{model} / {name}{'' if seed is None else f' seed {seed}'}: quantized in {got['quantize_s']:.1f} s")
                t0 = time.perf_counter()
                for text, toks in all_texts.items():
                    res = perplexity(target, toks, seq_len, eval_windows, eval_batch_size)
                    got["texts"][text].update(ppl_torch=_finite(res.ppl), ppl_torch_raw=None if math.isfinite(res.ppl) else str(res.ppl),
                                              nll_torch=_finite(res.nll), eval_tokens=res.tokens, eval_windows=res.windows)
                    _progress(f"{model} / {name}{'' if seed is None else f' seed {seed}'}: {text} PyTorch ppl {res.ppl:.3f}")
                got["eval_torch_s"] = time.perf_counter() - t0
                if ort:
                    with tempfile.TemporaryDirectory(prefix="llmq_quality_") as tmp:
                        out, nbytes, export_s, eval_s = _ort_ppl(target, Path(tmp) / "model.onnx", all_texts, seq_len, eval_windows, eval_batch_size)
                    for text, r in out["texts"].items():
                        got["texts"][text].update(ppl_ort=_finite(r["ppl"]), ppl_ort_raw=None if math.isfinite(r["ppl"]) else str(r["ppl"]),
                                                  nll_ort=_finite(r["nll"]))
                        _progress(f"{model} / {name}{'' if seed is None else f' seed {seed}'}: {text} onnxruntime ppl {r['ppl']:.3f}")
                    got.update(onnx_bytes=nbytes, export_s=export_s, eval_ort_s=eval_s, onnx=out["onnx"])
                per_seed.append(got)
                qgm = target = None
                _free(device)
            first = per_seed[0]
            for key in ("quantize_s", "quantize_stages_s", "eval_torch_s", "onnx_bytes", "export_s", "eval_ort_s", "onnx"):
                if key in first:
                    row[key] = first[key]
            if len(per_seed) > 1:
                row["quantize_s_seeds"] = [g.get("quantize_s") for g in per_seed]
            row["texts"] = {}
            for text in all_texts:
                t: dict = {}
                for key in ("ppl_torch", "nll_torch", "ppl_ort", "nll_ort"):
                    vals = [g["texts"][text].get(key) for g in per_seed]
                    if all(key not in g["texts"][text] for g in per_seed):
                        continue
                    agg = _aggregate(vals)
                    t[key] = agg["mean"]
                    if len(per_seed) > 1:
                        t[f"{key}_seeds"], t[f"{key}_min"], t[f"{key}_max"] = vals, agg["min"], agg["max"]
                for key in ("ppl_torch_raw", "ppl_ort_raw", "eval_tokens", "eval_windows"):
                    vals = [g["texts"][text].get(key) for g in per_seed if g["texts"][text].get(key) is not None]
                    if vals:
                        t[key] = vals[0]
                row["texts"][text] = t
            row.update({k: v for k, v in row["texts"]["eval"].items()})
            if config is None:
                float_row = row
        except Exception as err:  # a failed row is a result too; the run goes on to the next one
            if fail_fast:
                raise
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
            _progress(f"{model} / {name}: FAILED {row['error']}\n{traceback.format_exc()}")
        finally:
            qgm = target = None  # nothing of this row outlives it
            _free(device)
        row["loadavg_end"] = os.getloadavg()  # wall times mean little on a loaded machine; say how loaded it was
        finish(row)
    return rows


def run_model(name: str, methods: dict[str, dict], args, on_row=None) -> tuple[list[dict], dict]:
    """Load, trace and evaluate one model with every method; returns its rows and its setup facts."""
    from llmq_fx.corpus import calibration_set, load_text, tokenize
    from llmq_fx.models import load_model

    device = torch.device(args.device)
    _progress(f"{name}: loading")
    t0 = time.perf_counter()
    model, tokenizer = load_model(name)
    model.to(device)
    load_s = time.perf_counter() - t0
    calib = calibration_set(tokenize(tokenizer, load_text("calib")), args.calib_samples, args.seq_len)
    tokens = tokenize(tokenizer, load_text("eval"))
    others = {text: tokenize(tokenizer, load_text(text)) for text in args.texts if text != "eval"}
    t0 = time.perf_counter()
    gm = llmq_fx.trace(model)
    trace_s = time.perf_counter() - t0
    setup = {"model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
             "load_s": load_s, "trace_s": trace_s,
             "calibration": {"text": "calib", "samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "tokens": int(calib.numel())},
             "evaluation": {"text": "eval", "seq_len": args.seq_len, "windows_asked": args.eval_windows, "stream_tokens": int(tokens.numel())},
             "other_texts": {t: {"stream_tokens": int(v.numel())} for t, v in others.items()}}
    _progress(f"{name}: {setup['parameters'] / 1e6:.1f} M parameters, traced in {trace_s:.1f} s, "
              f"calibration {calib.shape[0]} x {calib.shape[1]}")
    rows = evaluate_methods(gm, calib, tokens, methods, model=name, seq_len=args.seq_len, eval_windows=args.eval_windows,
                            eval_batch_size=args.eval_batch_size, device=device, ort=not args.no_ort,
                            fail_fast=args.fail_fast, on_row=on_row, texts=others, seeds=tuple(args.seeds))
    del gm, model
    _free(device)
    return rows, setup


# -- machine -----------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device), "gpu": None,
            "loadavg_start": os.getloadavg()}
    for pkg in _VERSIONED:
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    info["git"] = _git_state()
    return info


def _git_state() -> dict | None:
    """Commit and whether the tree has local changes (read-only git calls; None outside a checkout)."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=BENCH, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


# -- output ------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _cell(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    """The tables (one per model) with the command, machine, versions and method descriptions."""
    m = report["machine"]
    git = m.get("git") or {}
    hw = (f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads, load average "
          f"{m['loadavg_start'][0]:.2f} at start" + (f", {m['loadavg_finish'][0]:.2f} at the end)" if m.get("loadavg_finish") else ")"))
    if m.get("gpu"):
        hw = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']}); host {hw}"
    s = report["setup"]
    lines = [
        f"## {report.get('title', 'Quality against the reference methods')}", "",
        f"Written by `bench/quality.py` on {report['date']}" + (" — **incomplete run** (interrupted or still running)" if not report["complete"] else "") + ":", "",
        f"    {report['command']}", "",
        f"- Machine: {hw}; PyTorch side on `{m['device']}`, onnxruntime on the CPU (QDQ run as written, no fusion).",
        f"- Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, onnx {m['onnx']}, "
        f"onnxruntime {m['onnxruntime']}, scikit-learn {m['scikit-learn']}"
        + (f"; llmq_fx at {git['commit'][:10]}{' with local changes' if git.get('dirty') else ''}" if git.get("commit") else "") + ".",
        f"- Same tokens for every row: calibration = first {s['calib_samples']} windows x {s['seq_len']} of the built-in `calib` "
        f"text; evaluation = first {s['eval_windows']} windows x {s['seq_len']} of each evaluation text ("
        + ", ".join(f"`{t}`" for t in s.get("texts", ["eval"])) + "; each window scored alone). `x float` = PyTorch "
        "perplexity / float PyTorch perplexity of the same text; `quantize s` = wall time of `llmq_fx.quantize` (first seed). "
        + (f"Seeded rows (ours) ran with seeds {s['seeds']}: their figures are means, with the range over seeds in brackets. "
           if len(s.get("seeds", [])) > 1 else "")
        + f"⚠ marks an onnxruntime perplexity more than {ORT_TOLERANCE:.0%} away from PyTorch's.",
        "", "Methods (one pipeline, one `QuantConfig` each; resolved configs in the JSON):", "",
    ]
    for name, rec in report["recipes"].items():
        cite = f" — {rec['citation']}" if rec.get("citation") else ""
        lines.append(f"- **{name}**: {rec['description']}{cite}.  \n  `{config_short(rec['resolved'])}`")
    for model in report["models"]:
        rows = [r for r in report["rows"] if r["model"] == model]
        info = report["model_setup"].get(model, {})
        title = f"### {model}"
        if info:
            title += f" ({info['model_class']}, {info['parameters'] / 1e6:.1f} M parameters"
            ev = next((r for r in rows if r.get("eval_tokens")), None)
            title += f", {ev['eval_tokens']} predicted tokens)" if ev else ")"
        texts = s.get("texts", ["eval"])
        head = " | ".join(f"{t}: PyTorch ppl | {t}: ORT ppl | {t}: x float" for t in texts)
        lines += ["", title, "", f"| method | {head} | quantize s | ONNX MiB |", "|---|" + "---:|" * (3 * len(texts) + 2)]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['method']} | failed: {r['error'].replace('|', '/')} |" + " |" * (3 * len(texts) + 1))
                continue
            cells = []
            for t in texts:
                tr = r.get("texts", {}).get(t) or ({k: r.get(k) for k in ("ppl_torch", "ppl_torch_raw", "ppl_ort", "ppl_ort_raw", "ratio_to_float")}
                                                   if t == "eval" else {})
                if "ppl_ort" in r and t == "eval" and "ort_vs_torch" in r:
                    tr = {**tr, "ort_vs_torch": r["ort_vs_torch"]}
                torch_cell = _fmt_ppl(tr.get("ppl_torch")) if tr.get("ppl_torch_raw") is None else tr["ppl_torch_raw"]
                if tr.get("ppl_torch_min") is not None:
                    torch_cell += f" ({_fmt_ppl(tr['ppl_torch_min'])}–{_fmt_ppl(tr['ppl_torch_max'])})"
                if "ppl_ort" in tr:
                    ort_cell = _fmt_ppl(tr.get("ppl_ort")) if tr.get("ppl_ort_raw") is None else tr["ppl_ort_raw"]
                    diff = tr.get("ort_vs_torch")
                    if diff is None or abs(diff) > ORT_TOLERANCE:
                        ort_cell += " ⚠ " + (f"{diff:+.1%} vs PyTorch" if diff is not None else "non-finite")
                else:
                    ort_cell = "not run"
                cells += [torch_cell, ort_cell, _cell(tr.get("ratio_to_float"), ".3f")]
            onnx = "" if r.get("onnx_bytes") is None else f"{r['onnx_bytes'] / MIB:.2f}"
            lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {_cell(r.get('quantize_s'), '.1f')} | {onnx} |")
    return "\n".join(lines) + "\n"


def splice_results_md(path: Path, block: str, title: str = "# llmq_fx benchmark results", section: str = "quality") -> None:
    """Put ``block`` between the ``<!-- {section}:begin/end -->`` markers of ``path`` (appended if
    absent; the file created if missing), so several runs (quality, ablation) share one file."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{block.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else f"{title}\n"
    i, j = text.find(begin), text.find(end)
    if i != -1 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    _write_atomic(path, text)


# -- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="recipes:\n" + "\n".join(f"  {n}: {r['description'][:110]}" for n, r in RECIPES.items()))
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "opt-mini"], help="built-in names or HF folders")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="NAME", help=f"subset of {', '.join(RECIPES)}")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                   help='extra row: QuantConfig() overridden by JSON, e.g. \'ours-no-rotate={"rotate": false}\'; '
                        '"base": "<recipe>" in the JSON starts from that recipe instead')
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of --seq-len tokens")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of --seq-len tokens")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward when scoring (PyTorch and ORT)")
    p.add_argument("--texts", nargs="+", default=["eval", "prose"],
                   help="evaluation texts (built-in names or files); `eval` is always the first and primary one")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of the seeded rows (ours and --extra): each is quantized once per seed, figures are means")
    p.add_argument("--device", default="cpu", help="PyTorch side (trace, quantize, eval): cpu or cuda; ORT is always CPU")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX export and the onnxruntime perplexity")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing row instead of recording it")
    p.add_argument("--out", type=Path, default=_DEFAULT_OUT,
                   help="output path without suffix (.json, .md); a complete run to the default also rewrites README.md's table")
    p.add_argument("--results-md", type=Path, default=BENCH / "RESULTS.md", help="Markdown file whose section is replaced")
    p.add_argument("--section", default="quality", help="name of that section's markers (<!-- NAME:begin -->), e.g. ablation")
    p.add_argument("--title", default="Quality against the reference methods", help="heading of the section")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    known = {n.lower(): n for n in RECIPES}
    unknown = [n for n in args.recipes if n.lower() not in known]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    methods = {known[n.lower()]: RECIPES[known[n.lower()]] for n in args.recipes}
    for text in args.extra:
        try:
            name, recipe = parse_extra(text)
        except (ValueError, llmq_fx.ConfigError) as err:
            p.error(str(err))
        if name in methods or name == "float":
            p.error(f"--extra {name}: a row of that name exists already")
        methods[name] = recipe
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch.onnx", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    json_path, md_path = args.out.with_name(args.out.name + ".json"), args.out.with_name(args.out.name + ".md")
    report = {
        "command": "python bench/quality.py " + " ".join(shlex.quote(a) for a in argv),
        "title": args.title,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "setup": {"seq_len": args.seq_len, "calib_samples": args.calib_samples, "eval_windows": args.eval_windows,
                  "texts": ["eval"] + [t for t in args.texts if t != "eval"], "seeds": list(args.seeds),
                  "eval_batch_size": args.eval_batch_size, "ort": not args.no_ort, "ort_tolerance": ORT_TOLERANCE},
        "recipes": {n: {**r, "resolved": resolve_recipe(r).to_dict()} for n, r in methods.items()},
        "models": list(args.models),
        "model_setup": {},
        "rows": [],
        "complete": False,
    }
    _progress(f"{len(args.models)} model(s) x (float + {len(methods)} methods); writing {json_path}")

    def save() -> None:
        _write_atomic(json_path, json.dumps(report, indent=2, default=str))
        block = markdown(report)
        _write_atomic(md_path, f"# llmq_fx: {args.title[0].lower() + args.title[1:]}\n\n" + block.split("\n", 2)[2])
        splice_results_md(args.results_md, block, section=args.section)

    done: list[dict] = []
    for name in args.models:
        def on_row(rows, _done=list(done)):
            report["rows"] = _done + rows
            save()

        rows, setup = run_model(name, methods, args, on_row=on_row)
        report["model_setup"][name] = setup
        done += rows
        report["rows"] = list(done)
        save()
    report["complete"] = True
    report["machine"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["machine"]["loadavg_finish"] = os.getloadavg()
    save()
    if args.out == _DEFAULT_OUT and not any(r.get("error") for r in done):
        from readme import splice_readme  # bench/readme.py: the README table comes from this JSON only

        splice_readme(report)
        _progress("README.md results block rewritten from the JSON")
    _progress(f"done: {json_path}, {md_path}, {args.results_md}")
    print(md_path.read_text())
    return 1 if any(r.get("error") for r in done) else 0


if __name__ == "__main__":
    sys.exit(main())
