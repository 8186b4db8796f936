"""``llmq-fx`` command line: quantize, recipe, inspect, eval, export.

    llmq-fx quantize --model opt-mini --calib calib --out runs/opt-mini --eval eval
    llmq-fx recipe --config my.yaml          # the passes a config runs, before running anything
    llmq-fx inspect runs/opt-mini
    llmq-fx eval --model opt-mini --text eval
    llmq-fx eval --graph runs/opt-mini --text eval    # the saved quantized graph (graph.pt2)
    llmq-fx eval --onnx runs/opt-mini/model.onnx --text eval
    llmq-fx export runs/opt-mini             # graph.pt2 -> model.onnx, without recalibrating

Every error a user can act on prints one line naming the file, key or node and exits with 2. A
``quantize`` run writes into a temporary folder beside ``--out`` and renames it into place at the
end: a run that fails leaves nothing behind (and an earlier result in ``--out`` untouched).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
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


@contextlib.contextmanager
def _staged_folder(out: Path):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it is removed
    (with any parent folders this created), so a failed run leaves nothing behind."""
    out = out.expanduser().absolute()
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as err:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise LlmqError(f"cannot create the output folder {out}: {err.strerror or err}") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    if out.exists() and not out.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise LlmqError(f"--out {out} exists and is not a folder")
    for f in staging.iterdir():  # some writers (safetensors, mkstemp) make private files; these are results
        f.chmod(0o666 & ~_umask())
    old = None
    if out.exists():  # keep the previous result until the new one is in place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tokens(source: str, tokenizer, model, two_d: bool) -> torch.Tensor:
    """Token ids of ``--calib``/``--eval``/``--text``: a token-id file, or text tokenized by the model's tokenizer."""
    from llmq_fx.corpus import is_token_file, load_text, load_token_ids, tokenize

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if is_token_file(source):
        return load_token_ids(source, vocab, two_d=two_d)
    return tokenize(tokenizer, load_text(source))


def _cmd_quantize(args) -> int:
    import llmq_fx
    from llmq_fx.corpus import calibration_set, is_token_file
    from llmq_fx.evaluate import perplexity
    from llmq_fx.models import load_model

    config = llmq_fx.QuantConfig.from_file(args.config) if args.config else llmq_fx.QuantConfig()
    if args.cluster_sweep and (config.a_dynamic or config.a_bits is None):
        raise llmq_fx.ConfigError(
            "--cluster-sweep varies n_clusters of static activations, but the config has "
            + ("a_bits: null" if config.a_bits is None else "a_dynamic: true (per-token ranges, no clusters)")
            + "; pass --config with a_dynamic: false"
        )
    walk = [d.strip() for d in args.device.split(",")]  # "cuda:0,cuda:1": the GPTQ walk spread over both
    args.device = walk[0]  # where the model, the passes and the evaluation run
    if args.weights_dtype == "bfloat16" and args.float_onnx:
        raise llmq_fx.ConfigError("--float-onnx exports the float model, which --weights-dtype bfloat16 stores narrower "
                                  "than it computes: drop one of them")
    if args.host_weights and args.device == "cpu":
        raise llmq_fx.ConfigError("--host-weights keeps the model on the host and quantizes it on --device: pass --device cuda")
    passes = llmq_fx.recipe(config)
    out = Path(args.out)
    timings: dict[str, float] = {}

    # Everything that can fail on the user's inputs fails here, before any file is written.
    t0 = time.perf_counter()
    if args.weights_dtype:  # a checkpoint folder read tensor by tensor into host memory; the model only on meta
        from llmq_fx.models import checkpoint_folder, load_model_on_meta

        model, tokenizer = load_model_on_meta(args.model)
        gm = llmq_fx.trace_checkpoint(checkpoint_folder(args.model), getattr(torch, args.weights_dtype), model=model)
    else:
        model, tokenizer = load_model(args.model)
    if not (args.host_weights or args.weights_dtype):
        model.to(args.device)
    timings["load"] = time.perf_counter() - t0
    if is_token_file(args.calib):
        calib = _tokens(args.calib, tokenizer, model, two_d=True)
        calib_info = {"ids": args.calib, "samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}
    else:
        calib = calibration_set(_tokens(args.calib, tokenizer, model, two_d=False), args.calib_samples, args.seq_len)
        calib_info = {"text": args.calib, "samples": int(calib.shape[0]), "seq_len": args.seq_len}
    calib_info["tokens"] = int(calib.numel())
    eval_tokens = _tokens(args.eval, tokenizer, model, two_d=False).reshape(-1) if args.eval else None

    with _staged_folder(out) as stage:
        t0 = time.perf_counter()
        if not args.weights_dtype:  # else captured with the load
            gm = llmq_fx.trace(model)
        timings["trace"] = time.perf_counter() - t0
        qgm = llmq_fx.quantize(gm, calib, config, progress=not args.quiet, device=walk if len(walk) > 1 else args.device)
        timings.update(qgm.meta["llmq_fx"]["timings_s"])
        (stage / "graph.txt").write_text(str(qgm.graph))
        _write_site_stats(qgm, stage / "stats.safetensors")
        t0 = time.perf_counter()
        llmq_fx.save(qgm, stage / llmq_fx.serialize.GRAPH_FILE)
        timings["save"] = time.perf_counter() - t0

        meta = qgm.meta["llmq_fx"]
        report = {
            "model": args.model,
            "model_class": type(model).__name__,
            "llmq_fx_version": llmq_fx.__version__,
            "config": config.to_dict(),
            "recipe": meta["recipe"],
            "calibration": calib_info,
            "summary": llmq_fx.summary(qgm),
            "smoothing": meta.get("smoothing", {}),
            "rotation": meta.get("rotation"),
            "rotation_skipped": meta.get("rotation_skipped"),
            "gptq": meta.get("gptq"),
            "gptq_act_aware_skipped": meta.get("gptq_act_aware_skipped"),
            "gptq_sequential": meta.get("gptq_sequential"),
            "timings_s": timings,
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": ",".join(walk),
                        "cpu_threads": torch.get_num_threads()},
        }

        onnx_path = None
        report["float_weight_bytes"] = sum(p.numel() * 4 for p in model.parameters())
        if not args.no_onnx:
            from llmq_fx.export import onnx_qdq_report, to_genai

            t0 = time.perf_counter()
            _genai_into(stage, qgm, model, tokenizer, args.onnx_format, args.accuracy_level)
            onnx_path = stage / "model.onnx"
            timings["export"] = time.perf_counter() - t0
            report["onnx"] = {**onnx_qdq_report(onnx_path), "format": args.onnx_format, "accuracy_level": args.accuracy_level}
            report["onnx"]["size_ratio_to_float_weights"] = report["onnx"]["file_bytes"] / report["float_weight_bytes"]
            runners = {"pytorch_float": gm, "pytorch_quantized": qgm, "onnxruntime_quantized": onnx_path}
            if args.weights_dtype not in (None, "float32"):
                del runners["pytorch_float"]  # stored narrower than it computes: only the quantize walk widens it
            if args.float_onnx:
                t0 = time.perf_counter()
                to_genai(gm, model, tokenizer, stage / "float", format=args.onnx_format)
                timings["export_float"] = time.perf_counter() - t0
                report["onnx_float"] = onnx_qdq_report(stage / "float" / "model.onnx")
                report["onnx"]["size_ratio_to_float"] = report["onnx"]["file_bytes"] / report["onnx_float"]["file_bytes"]
                runners["onnxruntime_float"] = stage / "float" / "model.onnx"
            if args.latency_runs:
                report["latency_ms_per_window"] = _latencies(runners, calib[:1, : args.seq_len].cpu(), args.latency_runs)

        if eval_tokens is not None:
            ev = {"text": args.eval, "seq_len": args.seq_len, "windows": args.eval_windows}
            for name, runner in (("float", gm), ("quantized", qgm)):
                if name == "float" and args.weights_dtype not in (None, "float32"):
                    ev[name] = None  # its weights are stored narrower than it computes: only the quantize walk widens them
                    continue
                t0 = time.perf_counter()
                ev[name] = perplexity(runner, eval_tokens, args.seq_len, args.eval_windows).to_dict()
                ev[name]["seconds"] = time.perf_counter() - t0
            if onnx_path is not None:
                from llmq_fx.export import OnnxCausalLM

                t0 = time.perf_counter()
                ev["onnxruntime"] = perplexity(OnnxCausalLM(onnx_path), eval_tokens, args.seq_len, args.eval_windows).to_dict()
                ev["onnxruntime"]["seconds"] = time.perf_counter() - t0
            report["eval"] = ev
            if args.cluster_sweep:
                import dataclasses

                sweep = []
                for k in args.cluster_sweep:
                    qk = llmq_fx.quantize(gm, calib.to(args.device), dataclasses.replace(config, n_clusters=k), progress=False)
                    sweep.append({"n_clusters": k, "ppl": perplexity(qk, eval_tokens, args.seq_len, args.eval_windows).ppl})
                    del qk
                report["cluster_sweep"] = sweep

        report["peak_rss_mb"] = _peak_rss_mb()
        if args.device.startswith("cuda"):
            report["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        _write_atomic(stage / "report.json", json.dumps(report, indent=2, default=str))
    _print_result(report, out, passes.summary())
    return 0


def _write_site_stats(qgm, path: Path) -> None:
    """Per-site channel statistics (after smoothing), smoothing scales and cluster labels, for plots."""
    from safetensors.torch import save_file

    tensors = {}
    for site, rec in qgm.meta["llmq_fx"].get("site_stats", {}).items():
        for key, t in rec.items():
            tensors[f"{site}/{key}"] = t.contiguous()
    save_file(tensors, str(path))  # inside the staged output folder: complete or not there at all


def _latencies(models: dict, window: torch.Tensor, runs: int) -> dict:
    """Median wall time (ms) of one forward over a ``[1, seq_len]`` window, after one warm-up run."""
    from llmq_fx.export import OnnxCausalLM

    result = {}
    for name, m in models.items():
        runner = OnnxCausalLM(m) if isinstance(m, Path) else m
        device = next((p.device for p in getattr(m, "parameters", lambda: iter(()))()), torch.device("cpu"))
        times = []
        with torch.no_grad():
            for i in range(runs + 1):
                t0 = time.perf_counter()
                runner(window.to(device))
                if i:
                    times.append((time.perf_counter() - t0) * 1000)
        result[name] = sorted(times)[len(times) // 2]
    result["runs"] = runs
    result["window_tokens"] = int(window.numel())
    return result


def _print_result(report: dict, out: Path, recipe_line: str) -> None:
    cfg = report["config"]
    print(f"\nllmq_fx: {report['model']} W{cfg['w_bits'] or 16}A{cfg['a_bits'] or 16}: {recipe_line}")
    if report.get("rotation_skipped"):
        print(f"  (not rotated: {report['rotation_skipped']})")
    lines = [("", "value")]
    ev = report.get("eval")
    if ev:
        lines.append(("perplexity float (PyTorch)", f"{ev['float']['ppl']:.3f}" if ev["float"] else "not run (weights stored narrow)"))
        lines.append(("perplexity quantized (PyTorch)", f"{ev['quantized']['ppl']:.3f}"))
        if "onnxruntime" in ev:
            lines.append(("perplexity quantized (onnxruntime)", f"{ev['onnxruntime']['ppl']:.3f}"))
        lines.append(("eval tokens", f"{ev['quantized']['tokens']} ({ev['windows']} x {ev['seq_len']})"))
    if "onnx" in report:
        bits = f"W{cfg['w_bits'] or 16}A{cfg['a_bits'] or 16}"
        if "onnx_float" in report:
            lines.append((f"ONNX size {bits} / float", f"{report['onnx']['file_bytes'] / 2**20:.2f} MiB / "
                          f"{report['onnx_float']['file_bytes'] / 2**20:.2f} MiB"))
        else:
            lines.append((f"ONNX size {bits} / float32 weights", f"{report['onnx']['file_bytes'] / 2**20:.2f} MiB / "
                          f"{report['float_weight_bytes'] / 2**20:.2f} MiB"))
    for k, v in report.get("latency_ms_per_window", {}).items():
        if k not in ("runs", "window_tokens"):
            lines.append((f"latency {k}", f"{v:.1f} ms / {report['latency_ms_per_window']['window_tokens']} tokens"))
    for k, v in report["timings_s"].items():
        lines.append((f"time {k}", f"{v:.2f} s"))
    lines.append(("peak RSS", f"{report['peak_rss_mb']:.0f} MiB"))
    w = max(len(a) for a, _ in lines)
    for a, b in lines:
        print(f"  {a.ljust(w)}  {b}")
    written = ["report.json", "graph.txt", "graph.pt2", "stats.safetensors"]
    if "onnx" in report:
        written += ["model.onnx", "genai_config.json", "tokenizer files (an onnxruntime-genai folder: llmq-fx generate)"]
    print(f"  written to {out}: {', '.join(written)}")


def _cmd_recipe(args) -> int:
    import llmq_fx

    config = llmq_fx.QuantConfig.from_file(args.config) if args.config else llmq_fx.QuantConfig()
    passes = llmq_fx.recipe(config)
    if args.json:
        print(json.dumps(passes.to_dict(), indent=2))
    else:
        print(passes)
        print(f"\n{passes.summary()}")
    return 0


def _cmd_inspect(args) -> int:
    from llmq_fx.errors import CheckpointError
    from llmq_fx.summary import format_summary

    path = Path(args.dir) / "report.json"
    if not path.is_file():
        raise CheckpointError(f"no report.json in {args.dir}: run `llmq-fx quantize --out {args.dir}` first")
    report = json.loads(path.read_text())
    if report.get("recipe"):
        print("recipe:")
        for p in report["recipe"]:
            options = ", ".join(f"{k}={v!r}" for k, v in p["options"].items())
            print(f"  {p['stage']:<9} {p['pass']}({options})")
        print()
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


def _report_model(folder: Path, given: str | None, what: str) -> str:
    """The model (for its tokenizer) named by ``--model``, else by the report.json in ``folder``."""
    from llmq_fx.errors import CheckpointError

    if given is not None:
        return given
    report = folder / "report.json"
    if report.is_file():
        return json.loads(report.read_text())["model"]
    raise CheckpointError(f"{what} needs --model (for the tokenizer) when no report.json lies in {folder}")


def _cmd_eval(args) -> int:
    from llmq_fx.errors import CheckpointError
    from llmq_fx.evaluate import perplexity
    from llmq_fx.models import load_model

    if args.onnx:
        from llmq_fx.export import OnnxCausalLM

        onnx_path = Path(args.onnx)
        if not onnx_path.is_file():
            raise CheckpointError(f"ONNX model not found: {onnx_path}")
        model, tokenizer = load_model(_report_model(onnx_path.parent, args.model, "--onnx"))
        runner, label = OnnxCausalLM(onnx_path), str(onnx_path)
    elif args.graph:
        import llmq_fx

        folder = Path(args.graph)
        graph_file = folder / llmq_fx.serialize.GRAPH_FILE if folder.is_dir() else folder
        runner, label = llmq_fx.load(graph_file), str(graph_file)
        model, tokenizer = load_model(_report_model(graph_file.parent, args.model, "--graph"))
    elif args.model:
        runner, tokenizer = load_model(args.model)
        model, label = runner, args.model
    else:
        raise CheckpointError("eval needs --model, --graph or --onnx")
    tokens = _tokens(args.text, tokenizer, model, two_d=False).reshape(-1)
    t0 = time.perf_counter()
    res = perplexity(runner, tokens, args.seq_len, args.windows, progress=not args.quiet)
    print(json.dumps({"model": label, "text": args.text, **res.to_dict(), "seconds": time.perf_counter() - t0}, indent=2))
    return 0


def _genai_into(folder: Path, qgm, model, tokenizer, onnx_format: str, accuracy_level: int) -> None:
    """Write the onnxruntime-genai files (model.onnx, genai_config.json, tokenizer) into ``folder``
    itself, beside what is there (each file replaced whole)."""
    from llmq_fx.export import to_genai

    tmp = Path(tempfile.mkdtemp(prefix=".genai.", dir=folder))
    try:
        to_genai(qgm, model, tokenizer, tmp / "genai", format=onnx_format, accuracy_level=accuracy_level)
        for f in (tmp / "genai").iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cmd_export(args) -> int:
    import llmq_fx
    from llmq_fx.export import onnx_qdq_report
    from llmq_fx.models import load_model

    folder = Path(args.dir)
    graph_file = folder / llmq_fx.serialize.GRAPH_FILE if folder.is_dir() else folder
    qgm = llmq_fx.load(graph_file)
    model, tokenizer = load_model(_report_model(graph_file.parent, args.model, "export"))
    out = Path(args.out) if args.out else graph_file.parent
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _genai_into(out, qgm, model, tokenizer, args.onnx_format, args.accuracy_level)
    report = onnx_qdq_report(out / "model.onnx")
    print(f"wrote the onnxruntime-genai folder {out} (model.onnx {report['file_bytes'] / 2**20:.2f} MiB, "
          f"{report['matmul_nbits']} MatMulNBits, format {args.onnx_format}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_generate(args) -> int:
    from llmq_fx.export import generate

    if not args.quiet:
        print(args.prompt, end="", flush=True)
    result = generate(args.dir, args.prompt, args.max_new_tokens,
                      on_text=None if args.quiet else (lambda piece: print(piece, end="", flush=True)))
    if args.quiet:
        print(args.prompt + result.text)
    else:
        print()
    print(f"[{result.prompt_tokens} prompt tokens in {result.prefill_s * 1e3:.0f} ms; {len(result.tokens)} new tokens, "
          f"{result.decode_tokens_per_s:.1f} tokens/s after the first]", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    from llmq_fx.config import QuantConfig
    from llmq_fx.recipe import recipe

    default_recipe = recipe(QuantConfig()).summary()
    p = argparse.ArgumentParser(prog="llmq-fx", description="W4A4 quantization of LLMs as torch.fx graph passes")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    ids_help = "a token-id file (.npy/.pt/.safetensors"

    q = sub.add_parser("quantize", help="quantize a model; write report.json, graph.txt, graph.pt2 and model.onnx",
                       description=f"Default recipe (no --config): {default_recipe}.")
    q.add_argument("--model", default="opt-mini", help="built-in name (opt-mini, smollm2-135m, opt-tiny-random) or HF folder")
    q.add_argument("--calib", default="calib",
                   help=f"built-in corpus (calib), a UTF-8 text file, or {ids_help} of an integer [N, T] array, used as "
                        "it is: --calib-samples and --seq-len then do not apply)")
    q.add_argument("--config", help=f"YAML/TOML/JSON file of QuantConfig keys (default: {default_recipe})")
    q.add_argument("--out", required=True, help="output folder (written in a temporary folder, renamed at the end)")
    q.add_argument("--eval", help=f"built-in corpus (eval), a text file or {ids_help}): add float and quantized perplexity")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation window (default 512)")
    q.add_argument("--calib-samples", type=int, default=32, help="calibration windows of --seq-len tokens (default 32)")
    q.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (default 16)")
    q.add_argument("--cluster-sweep", type=int, nargs="+", metavar="K",
                   help="with --eval: also quantize with each n_clusters K and record perplexity (for plots)")
    q.add_argument("--device", default="cpu", help="where to quantize (cpu, cuda, cuda:1); several comma-separated "
                   "(cuda:0,cuda:1) spread the sequential GPTQ walk's calibration batches over them")
    q.add_argument("--host-weights", action="store_true",
                   help="keep the model on the host and quantize it layer by layer on --device (each weight moved there "
                        "while the GPTQ walk reads it): device memory for one layer and the calibration activations")
    q.add_argument("--weights-dtype", choices=["float32", "bfloat16"],
                   help="capture the model folder on the meta device and read its safetensors one tensor at a time "
                        "into host memory in this dtype (llmq_fx.trace_checkpoint): no other copy of the model is built, "
                        "and with --device cuda it is quantized layer by layer as with --host-weights; with bfloat16 "
                        "the float model is not evaluated")
    q.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (no onnxruntime-genai folder)")
    q.add_argument("--onnx-format", choices=["fast", "qdq"], default="fast",
                   help="fast: MatMulNBits 4-bit weights (default); qdq: standard QuantizeLinear/DequantizeLinear only")
    q.add_argument("--accuracy-level", type=int, choices=[0, 1, 4], default=4,
                   help="MatMulNBits accuracy_level (4, default: the kernel quantizes its float input to int8 per block and multiplies in integers, faster; 0: float math on the dequantized weights, the PyTorch graph's numbers)")
    q.add_argument("--float-onnx", action="store_true", help="also write the float model's folder (DIR/float) to compare")
    q.add_argument("--latency-runs", type=int, default=5, help="timed runs per model for the latency table (0: none)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_cmd_quantize)

    r = sub.add_parser("recipe", help="print the passes a config runs, with their options, without running them")
    r.add_argument("--config", help=f"YAML/TOML/JSON file of QuantConfig keys (default: {default_recipe})")
    r.add_argument("--json", action="store_true", help="as JSON (what report.json records)")
    r.set_defaults(func=_cmd_recipe)

    i = sub.add_parser("inspect", help="print the recipe and per-Linear summary of a quantize output folder")
    i.add_argument("dir")
    i.add_argument("--plots", action="store_true", help="write PNG plots next to the report")
    i.set_defaults(func=_cmd_inspect)

    e = sub.add_parser("eval", help="perplexity of a model, a saved quantized graph or an exported ONNX file")
    e.add_argument("--model", help="built-in name or HF folder (with --graph/--onnx: only its tokenizer is used)")
    e.add_argument("--graph", help="a quantize output folder (its graph.pt2) or a .pt2 file from llmq_fx.save")
    e.add_argument("--onnx")
    e.add_argument("--text", default="eval", help=f"built-in corpus (eval), a text file or {ids_help})")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="write the onnxruntime-genai folder of a saved quantized graph (graph.pt2), "
                                      "without recalibrating")
    x.add_argument("dir", help="a quantize output folder, or a .pt2 file")
    x.add_argument("--out", help="the folder to write into (default: the folder of graph.pt2)")
    x.add_argument("--model", help="the float model (default: the one named in report.json)")
    x.add_argument("--onnx-format", choices=["fast", "qdq"], default="fast")
    x.add_argument("--accuracy-level", type=int, choices=[0, 1, 4], default=4)
    x.set_defaults(func=_cmd_export)

    g = sub.add_parser("generate", help="greedy text generation with onnxruntime-genai from a quantize output folder")
    g.add_argument("dir", help="an onnxruntime-genai folder (a quantize output folder is one)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--quiet", action="store_true", help="print the text at the end instead of streaming it")
    g.set_defaults(func=_cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        warnings.filterwarnings("ignore")
        for noisy in ("torch.onnx", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if getattr(args, "quiet", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        return args.func(args)
    except (LlmqError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"llmq-fx: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
