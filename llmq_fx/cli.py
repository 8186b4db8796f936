"""``llmq-fx`` command line: quantize, inspect, eval.

    llmq-fx quantize --model opt-mini --calib calib --out runs/opt-mini --eval eval
    llmq-fx inspect runs/opt-mini
    llmq-fx eval --model opt-mini --text eval
    llmq-fx eval --onnx runs/opt-mini/model.onnx --text eval
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from llmq_fx.errors import LlmqError

__all__ = ["main"]

logger = logging.getLogger("llmq_fx")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _cmd_quantize(args) -> int:
    import llmq_fx
    from llmq_fx.corpus import calibration_set, load_text, tokenize
    from llmq_fx.evaluate import perplexity
    from llmq_fx.models import load_model

    config = llmq_fx.QuantConfig.from_file(args.config) if args.config else llmq_fx.QuantConfig()
    if args.cluster_sweep and (config.a_dynamic or config.a_bits is None):
        raise llmq_fx.ConfigError(
            "--cluster-sweep varies n_clusters of static activations, but the config has "
            + ("a_bits: null" if config.a_bits is None else "a_dynamic: true (per-token ranges, no clusters)")
            + "; pass --config with a_dynamic: false"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    timings["load"] = time.perf_counter() - t0
    calib_tokens = tokenize(tokenizer, load_text(args.calib))
    calib = calibration_set(calib_tokens, args.calib_samples, args.seq_len)

    t0 = time.perf_counter()
    gm = llmq_fx.trace(model)
    timings["trace"] = time.perf_counter() - t0
    qgm = llmq_fx.quantize(gm, calib.to(args.device), config, progress=not args.quiet)
    timings.update(qgm.meta["llmq_fx"]["timings_s"])
    rows = llmq_fx.summary(qgm)
    (out / "graph.txt").write_text(str(qgm.graph))
    _write_site_stats(qgm, out / "stats.safetensors")

    report = {
        "model": args.model,
        "model_class": type(model).__name__,
        "config": config.to_dict(),
        "calibration": {"text": args.calib, "samples": int(calib.shape[0]), "seq_len": args.seq_len, "tokens": int(calib.numel())},
        "summary": rows,
        "smoothing": qgm.meta["llmq_fx"].get("smoothing", {}),
        "rotation": qgm.meta["llmq_fx"].get("rotation"),
        "rotation_skipped": qgm.meta["llmq_fx"].get("rotation_skipped"),
        "gptq": qgm.meta["llmq_fx"].get("gptq"),
        "gptq_act_aware_skipped": qgm.meta["llmq_fx"].get("gptq_act_aware_skipped"),
        "gptq_sequential": qgm.meta["llmq_fx"].get("gptq_sequential"),
        "timings_s": timings,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
                    "cpu_threads": torch.get_num_threads()},
    }

    onnx_path = None
    if not args.no_onnx:
        from llmq_fx.export import onnx_qdq_report, to_onnx

        t0 = time.perf_counter()
        onnx_path = to_onnx(qgm.to("cpu"), out / "model.onnx")
        timings["export"] = time.perf_counter() - t0
        report["onnx"] = onnx_qdq_report(onnx_path)
        float_path = to_onnx(gm.to("cpu"), out / "model_float.onnx")
        report["onnx_float"] = onnx_qdq_report(float_path)
        report["onnx"]["size_ratio_to_float"] = report["onnx"]["file_bytes"] / report["onnx_float"]["file_bytes"]
        if args.latency_runs:
            report["latency_ms_per_window"] = _latencies(
                {"pytorch_float": gm, "pytorch_quantized": qgm, "onnxruntime_float": float_path, "onnxruntime_w4a4": onnx_path},
                calib[:1, : args.seq_len].cpu(), args.latency_runs,
            )

    if args.eval:
        tokens = tokenize(tokenizer, load_text(args.eval))
        ev = {"text": args.eval, "seq_len": args.seq_len, "windows": args.eval_windows}
        t0 = time.perf_counter()
        ev["float"] = perplexity(gm, tokens, args.seq_len, args.eval_windows).to_dict()
        ev["float"]["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev["quantized"] = perplexity(qgm, tokens, args.seq_len, args.eval_windows).to_dict()
        ev["quantized"]["seconds"] = time.perf_counter() - t0
        if onnx_path is not None:
            from llmq_fx.export import OnnxCausalLM

            t0 = time.perf_counter()
            ev["onnxruntime"] = perplexity(OnnxCausalLM(onnx_path), tokens, args.seq_len, args.eval_windows).to_dict()
            ev["onnxruntime"]["seconds"] = time.perf_counter() - t0
        report["eval"] = ev
        if args.cluster_sweep:
            import dataclasses

            sweep = []
            for k in args.cluster_sweep:
                qk = llmq_fx.quantize(gm, calib.to(args.device), dataclasses.replace(config, n_clusters=k), progress=False)
                sweep.append({"n_clusters": k, "ppl": perplexity(qk, tokens, args.seq_len, args.eval_windows).ppl})
                del qk
            report["cluster_sweep"] = sweep

    report["peak_rss_mb"] = _peak_rss_mb()
    if args.device.startswith("cuda"):
        report["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    _write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    _print_result(report, out)
    return 0


def _write_site_stats(qgm, path: Path) -> None:
    """Per-site channel statistics (after smoothing), smoothing scales and cluster labels, for plots."""
    from safetensors.torch import save_file

    tensors = {}
    for site, rec in qgm.meta["llmq_fx"].get("site_stats", {}).items():
        for key, t in rec.items():
            tensors[f"{site}/{key}"] = t.contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _latencies(models: dict, window: torch.Tensor, runs: int) -> dict:
    """Median wall time (ms) of one forward over a ``[1, seq_len]`` window, after one warm-up run."""
    from llmq_fx.export import OnnxCausalLM

    result = {}
    for name, m in models.items():
        runner = OnnxCausalLM(m) if isinstance(m, Path) else m
        times = []
        with torch.no_grad():
            for i in range(runs + 1):
                t0 = time.perf_counter()
                runner(window)
                if i:
                    times.append((time.perf_counter() - t0) * 1000)
        result[name] = sorted(times)[len(times) // 2]
    result["runs"] = runs
    result["window_tokens"] = int(window.numel())
    return result


def _print_result(report: dict, out: Path) -> None:
    cfg = report["config"]
    gptq = "GPTQ" + ("" if report.get("gptq_act_aware_skipped") or cfg.get("gptq_act_aware") is None
                     else f" act-aware {cfg['gptq_act_aware']}" + (" sequential" if report.get("gptq_sequential") else ""))
    parts = [gptq if cfg.get("gptq") and cfg["w_bits"] else "RTN" if cfg["w_bits"] else None]
    if cfg["a_bits"]:
        parts.append(f"per-token/{cfg['a_group_size']}" if cfg.get("a_dynamic") and cfg.get("a_group_size")
                     else "per-token" if cfg.get("a_dynamic") else f"n_clusters={cfg['n_clusters']}")
        if report.get("gptq_sequential") and cfg.get("a_clip_search"):
            parts.append("clip per site (search)")
        elif cfg.get("a_clip_ratio", 1.0) != 1.0:
            parts.append(f"clip {cfg['a_clip_ratio']}")
    rotated = cfg.get("rotate") and not report.get("rotation_skipped")
    parts += ["rotated" if rotated else None, f"smooth_alpha={cfg['smooth_alpha']}" if cfg["smooth_alpha"] is not None else None]
    print(f"\nllmq_fx: {report['model']} W{cfg['w_bits'] or 16}A{cfg['a_bits'] or 16}, " + ", ".join(p for p in parts if p))
    lines = [("", "value")]
    ev = report.get("eval")
    if ev:
        lines.append(("perplexity float (PyTorch)", f"{ev['float']['ppl']:.3f}"))
        lines.append(("perplexity quantized (PyTorch)", f"{ev['quantized']['ppl']:.3f}"))
        if "onnxruntime" in ev:
            lines.append(("perplexity quantized (onnxruntime)", f"{ev['onnxruntime']['ppl']:.3f}"))
        lines.append(("eval tokens", f"{ev['float']['tokens']} ({ev['windows']} x {ev['seq_len']})"))
    if "onnx" in report:
        lines.append(("ONNX size W4A4 / float", f"{report['onnx']['file_bytes'] / 2**20:.2f} MiB / "
                      f"{report['onnx_float']['file_bytes'] / 2**20:.2f} MiB"))
    for k, v in report.get("latency_ms_per_window", {}).items():
        if k not in ("runs", "window_tokens"):
            lines.append((f"latency {k}", f"{v:.1f} ms / {report['latency_ms_per_window']['window_tokens']} tokens"))
    for k, v in report["timings_s"].items():
        lines.append((f"time {k}", f"{v:.2f} s"))
    lines.append(("peak RSS", f"{report['peak_rss_mb']:.0f} MiB"))
    w = max(len(a) for a, _ in lines)
    for a, b in lines:
        print(f"  {a.ljust(w)}  {b}")
    print(f"  written: {out / 'report.json'}, {out / 'graph.txt'}" + (f", {out / 'model.onnx'}" if "onnx" in report else ""))


def _cmd_inspect(args) -> int:
    from llmq_fx.summary import format_summary

    from llmq_fx.errors import CheckpointError

    path = Path(args.dir) / "report.json"
    if not path.is_file():
        raise CheckpointError(f"no report.json in {args.dir}: run `llmq-fx quantize --out {args.dir}` first")
    report = json.loads(path.read_text())
    print(format_summary(report["summary"]))
    skipped = {k: v["reason"] for k, v in report.get("smoothing", {}).items() if not v.get("smoothed")}
    if skipped:
        print("\nsmoothing skipped:")
        for k, v in skipped.items():
            print(f"  {k}: {v}")
    if args.plots:
        from llmq_fx.plots import write_plots

        for p in write_plots(Path(args.dir)):
            print(f"wrote {p}")
    return 0


def _cmd_eval(args) -> int:
    from llmq_fx.corpus import load_text, tokenize
    from llmq_fx.errors import CheckpointError
    from llmq_fx.evaluate import perplexity
    from llmq_fx.models import load_model

    if args.onnx:
        from llmq_fx.export import OnnxCausalLM

        onnx_path = Path(args.onnx)
        if not onnx_path.is_file():
            raise CheckpointError(f"ONNX model not found: {onnx_path}")
        model_name = args.model
        report = onnx_path.parent / "report.json"
        if model_name is None and report.is_file():
            model_name = json.loads(report.read_text())["model"]
        if model_name is None:
            raise CheckpointError("--onnx needs --model (for the tokenizer) when no report.json lies beside it")
        _, tokenizer = load_model(model_name)
        runner = OnnxCausalLM(onnx_path)
        label = str(onnx_path)
    else:
        if args.model is None:
            raise CheckpointError("eval needs --model or --onnx")
        runner, tokenizer = load_model(args.model)
        label = args.model
    tokens = tokenize(tokenizer, load_text(args.text))
    t0 = time.perf_counter()
    res = perplexity(runner, tokens, args.seq_len, args.windows, progress=not args.quiet)
    print(json.dumps({"model": label, "text": args.text, **res.to_dict(), "seconds": time.perf_counter() - t0}, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmq-fx", description="W4A4 quantization of LLMs as torch.fx graph passes")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model, write report.json, graph.txt and model.onnx")
    q.add_argument("--model", default="opt-mini", help="built-in name (opt-mini, smollm2-135m, opt-tiny-random) or HF folder")
    q.add_argument("--calib", default="calib", help="built-in corpus (calib) or a text file")
    q.add_argument("--config", help="YAML/TOML/JSON QuantConfig (default: W4A4, alpha 0.5, 8 clusters)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--eval", help="built-in corpus (eval) or text file: add float and quantized perplexity")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--calib-samples", type=int, default=32, help="calibration windows of --seq-len tokens")
    q.add_argument("--eval-windows", type=int, default=16)
    q.add_argument("--cluster-sweep", type=int, nargs="+", metavar="K",
                   help="with --eval: also quantize with each n_clusters K and record perplexity (for plots)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    q.add_argument("--latency-runs", type=int, default=5, help="timed runs per model for the latency table (0: none)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_cmd_quantize)

    i = sub.add_parser("inspect", help="print the per-Linear summary of a quantize output folder")
    i.add_argument("dir")
    i.add_argument("--plots", action="store_true", help="write PNG plots next to the report")
    i.set_defaults(func=_cmd_inspect)

    e = sub.add_parser("eval", help="perplexity of a model or an exported ONNX file")
    e.add_argument("--model")
    e.add_argument("--onnx")
    e.add_argument("--text", default="eval")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        warnings.filterwarnings("ignore")
        for noisy in ("torch.onnx", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (LlmqError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as err:
        if args.debug:
            raise
        print(f"llmq-fx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
