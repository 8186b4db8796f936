"""Deployment: what the exported models weigh and how fast onnxruntime runs them, beside the peers.

    python bench/deploy.py                                  # opt-mini and smollm2-135m, every row
    python bench/deploy.py --models opt-mini --rows float ours-w4a4 --runs 3

For each model, one onnxruntime-genai folder per row, each built in this run:

* ``float``: the float32 model, captured with its KV cache and exported the same way (``to_genai`` of
  ``llmq_fx.trace(model)``): the reference every ratio is taken against;
* ``ort-matmulnbits``: onnxruntime's own ``MatMulNBitsQuantizer`` (W4, block 32, symmetric,
  accuracy level 4) applied to the float row's ``model.onnx``: weight-only, activations float. It
  quantizes ``MatMul`` nodes with a constant weight; a tied embedding/lm_head table (read by the
  ``Gather`` too) is not one, so it leaves that lm_head in float;
* ``genai-builder-int4`` (Llama-family models only; the builder has no OPT): onnxruntime-genai's model
  builder, ``python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p int4 -e cpu`` on the
  same weights saved as a Hugging Face folder;
* ``ours-w4a4``: ``QuantConfig()`` (the default recipe), ``to_genai`` in the ``fast`` format (MatMulNBits
  ``accuracy_level`` 4, the default);
* ``ours-w4a4-acc0``: the same quantized graph exported with MatMulNBits ``accuracy_level`` 0 (float
  math on the dequantized weights: the PyTorch graph's numbers; the default, 4, requantizes each
  MatMulNBits input to int8 per block);
* ``ours-w4a4-int4-table``: the default with the builder's table layout (``INT4_TABLE``): one int4 table
  in groups of 32 for the embedding and the lm_head, shared where the model ties them
  (``RotateOptions.keep_tied``), rounded by GPTQ on the lm_head's inputs (``lm_head_gptq``);
* ``ours-w4a16``: ``{"a_bits": null}`` with the same tables (rotation + GPTQ weights, activations
  float), exported the same way;
* ``ours-NAME`` for each ``--extra NAME=JSON``: ``QuantConfig()`` overridden by that JSON, exported as
  ``ours-w4a4`` is (e.g. ``--extra 'a16={"a_group_size": 16}'`` for finer activation groups).

Every row is measured in child processes with the same onnxruntime thread count (``--threads``, set in
each folder's ``genai_config.json`` and in the perplexity session):

* ``MiB``: ``model.onnx`` plus its external data;
* ``prefill ms``: onnxruntime-genai's prompt step on ``--prompt-tokens`` tokens of the built-in ``eval``
  text (median of ``--runs``);
* ``decode tok/s``: the ``--new-tokens`` tokens generated after that prompt, greedy, end-of-sequence
  ignored, divided by their time after the first (median of ``--runs``);
* ``ORT ppl``: perplexity of ``model.onnx`` on ``--eval-windows`` x ``--seq-len`` tokens of the ``eval``
  text, each window one first step with an empty KV cache (``OnnxCausalLM``);
* ``PyTorch ppl`` (our rows): the quantized graph's perplexity on the same tokens, and ``ORT/PyTorch``;
* ``peak RSS MiB``: of the child process that loaded the folder and generated, and ``model RSS MiB``:
  that peak minus the process's RSS before it loaded the folder (the imports are the same for every row).

The machine's load average is recorded before and after each row. Output: ``<--out>.json`` (rewritten
after every row), ``<--out>.md``, and the ``deploy`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# The builder's tables: int4 in groups of 32, one table where the model ties them, GPTQ-rounded for the lm_head.
INT4_TABLE = {"lm_head_bits": 4, "lm_head_group_size": 32, "lm_head_gptq": True}
CONFIGS = {"ours-w4a4": {}, "ours-w4a4-acc0": {}, "ours-w4a4-int4-table": INT4_TABLE,
           "ours-w4a16": {"a_bits": None, **INT4_TABLE}}
ROWS = ("float", "ort-matmulnbits", "genai-builder-int4", "ours-w4a4", "ours-w4a4-acc0", "ours-w4a4-int4-table", "ours-w4a16")
DEFAULT_ROWS = tuple(r for r in ROWS if r != "ours-w4a4-acc0")  # accuracy level 0: measured in earlier runs
_LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "olmo"}
MIB = 2**20
_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[deploy {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- child processes: one row's measurements ----------------------------------------------------
def _status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Not ``ru_maxrss``: Linux carries that over
    ``exec`` from the parent, which holds the models this script built."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:")) / 1024


def measure_speed(folder: Path, prompt: list[int], new_tokens: int, runs: int) -> dict:
    """Prefill and decode timings of a genai folder (medians); peak RSS of this process, and what the
    model added to it (peak minus the RSS after the imports, which are the same for every row)."""
    from llmq_fx.export.genai import generate

    baseline = _status_mib("VmRSS")
    prefill, decode = [], []
    generate(folder, prompt[:16], 4, stop_at_eos=False)  # warm-up: session creation, first allocations
    for _ in range(runs):
        result = generate(folder, prompt, new_tokens, stop_at_eos=False)
        prefill.append(result.prefill_s * 1000)
        decode.append(result.decode_tokens_per_s)
    return {"prefill_ms": statistics.median(prefill), "prefill_ms_runs": prefill,
            "decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_runs": decode,
            "new_tokens": new_tokens, "prompt_tokens": len(prompt),
            "peak_rss_mib": _status_mib("VmHWM"), "model_rss_mib": _status_mib("VmHWM") - baseline}


def measure_ppl(folder: Path, tokens_file: Path, seq_len: int, windows: int, threads: int) -> dict:
    import torch

    from llmq_fx.evaluate import perplexity
    from llmq_fx.export import OnnxCausalLM

    tokens = torch.load(tokens_file, weights_only=True)
    res = perplexity(OnnxCausalLM(folder, intra_op_threads=threads), tokens, seq_len, windows)
    return {"ppl": res.ppl, "tokens": res.tokens}


def measure_ops(folder: Path, threads: int, work: Path) -> dict:
    """Op counts of ``model.onnx`` as written and as onnxruntime runs it: the model its graph optimizer
    writes (``optimized_model_filepath``, ``ORT_ENABLE_ALL``, the level onnxruntime-genai uses), so the
    fusions it relies on are counted, not assumed."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    optimized = work / "optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    written = Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)
    run = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    return {"ops_written": dict(written), "ops_optimized": dict(run),
            "nodes_written": sum(written.values()), "nodes_optimized": sum(run.values())}


def _child(args) -> int:
    folder = Path(args.folder)
    if args.measure == "ops":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure_ops(folder, args.threads, Path(tmp))))
        return 0
    if args.measure == "speed":
        prompt = json.loads(Path(args.prompt_file).read_text())
        out = measure_speed(folder, prompt, args.new_tokens, args.runs)
    else:
        out = measure_ppl(folder, Path(args.tokens_file), args.seq_len, args.eval_windows, args.threads)
    print(json.dumps(out))
    return 0


def _run_child(kind: str, folder: Path, args, extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", kind, "--folder", str(folder),
           "--threads", str(args.threads), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} of {folder} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- building the folders -----------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def _set_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))


def build_ort_matmulnbits(float_folder: Path, out: Path) -> None:
    """onnxruntime's MatMulNBitsQuantizer on the float folder's model.onnx (genai config and tokenizer copied)."""
    import onnx
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    shutil.copytree(float_folder, out, ignore=shutil.ignore_patterns("model.onnx*"))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(float_folder / "model.onnx")), bits=4, block_size=32,
                                     is_symmetric=True, accuracy_level=4)
    quantizer.process()
    model = quantizer.model.model
    big = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=big, location="model.onnx.data")


def build_genai_builder(model, tokenizer, out: Path, work: Path) -> None:
    """onnxruntime-genai's model builder, int4 CPU, on the model saved as a Hugging Face folder."""
    import copy

    hf = work / "hf"
    # A model read from GGUF (SmolLM2) refuses save_pretrained although its weights are plain float32:
    # save a fresh model of the same config holding the same tensors.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(work / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"the genai builder failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")


def build_model_rows(name: str, rows: list[str], args, work: Path) -> tuple[dict, dict]:
    """Build every row's folder for one model; return {row: folder} and per-row facts (PyTorch ppl...)."""
    import torch

    import llmq_fx
    from llmq_fx.corpus import calibration_set, load_text, tokenize
    from llmq_fx.evaluate import perplexity
    from llmq_fx.export import quantized_decoder, to_genai
    from llmq_fx.models import load_model

    model, tokenizer = load_model(name)
    calib = calibration_set(tokenize(tokenizer, load_text("calib")), args.calib_samples, args.seq_len)
    tokens = tokenize(tokenizer, load_text("eval"))
    torch.save(tokens, work / "eval_tokens.pt")
    (work / "prompt.json").write_text(json.dumps(tokens[: args.prompt_tokens].tolist()))
    gm = llmq_fx.trace(model)
    folders, facts = {}, {}
    spec_type = getattr(model.config, "model_type", "")
    for row in rows:
        t0 = time.perf_counter()
        out = work / row
        fact = {}
        if row == "float":
            to_genai(gm, model, tokenizer, out)
            fact["ppl_torch"] = perplexity(gm, tokens, args.seq_len, args.eval_windows).ppl
        elif row == "ort-matmulnbits":
            if "float" not in folders:
                raise RuntimeError("ort-matmulnbits quantizes the float row's model.onnx: keep 'float' in --rows")
            build_ort_matmulnbits(folders["float"], out)
        elif row == "genai-builder-int4":
            if spec_type not in _LLAMA_FAMILY:
                facts[row] = {"skipped": f"the builder has no {type(model).__name__}"}
                continue
            build_genai_builder(model, tokenizer, out, work / "builder")
        elif row.startswith("ours"):
            config = CONFIGS[row]
            key = json.dumps(config)
            if key not in facts.setdefault("_quantized", {}):
                q0 = time.perf_counter()
                qgm = llmq_fx.quantize(gm, calib, config, progress=False)
                facts["_quantized"][key] = {"qgm": qgm, "quantize_s": time.perf_counter() - q0,
                                            "ppl_torch": perplexity(qgm, tokens, args.seq_len, args.eval_windows).ppl,
                                            "decoder": quantized_decoder(qgm, model)}
            q = facts["_quantized"][key]
            to_genai(q["qgm"], model, tokenizer, out, accuracy_level=0 if row.endswith("acc0") else 4, decoder=q["decoder"])
            fact.update(ppl_torch=q["ppl_torch"], quantize_s=q["quantize_s"], config=q["qgm"].meta["llmq_fx"]["config"],
                        recipe=llmq_fx.recipe(q["qgm"].meta["llmq_fx"]["config"]).summary())
        fact["build_s"] = time.perf_counter() - t0
        _set_threads(out, args.threads)
        folders[row], facts[row] = out, fact
        _progress(f"{name} / {row}: built in {fact['build_s']:.1f} s, {folder_bytes(out) / MIB:.1f} MiB")
    facts.pop("_quantized", None)
    return folders, facts


# -- report -------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "## Deployment: size and speed in onnxruntime", "",
        f"Written by `bench/deploy.py` on {report['date']}" + ("" if report["complete"] else " — **incomplete run**") + ":", "",
        f"    {report['command']}", "",
        f"- Machine: {m['cpu']} ({m['cpu_count']} cores), onnxruntime {m['onnxruntime']}, onnxruntime-genai "
        f"{m['onnxruntime_genai']}, torch {m['torch']}; every row with {report['setup']['threads']} onnxruntime threads.",
        f"- prefill: {report['setup']['prompt_tokens']} prompt tokens of the `eval` text; decode: "
        f"{report['setup']['new_tokens']} new tokens after them, greedy (medians of {report['setup']['runs']} runs); "
        f"ORT ppl: {report['setup']['eval_windows']} x {report['setup']['seq_len']} `eval` tokens, each window a first "
        "step on an empty KV cache. `x float` columns are ratios to the float row of the same run.",
    ]
    for model in report["models"]:
        rows = [r for r in report["rows"] if r["model"] == model]
        base = next((r for r in rows if r["row"] == "float" and "error" not in r), None)
        lines += ["", f"### {model}", "",
                  "| row | MiB | x float | prefill ms | x float | decode tok/s | x float | ORT ppl | PyTorch ppl | peak / model RSS MiB | load before/after |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if "error" in r or "skipped" in r:
                lines.append(f"| {r['row']} | {r.get('error') or r.get('skipped')} |||||||||| ")
                continue

            def ratio(key):
                return f"{r[key] / base[key]:.2f}" if base and base.get(key) else ""

            torch_ppl = f"{r['ppl_torch']:.3f}" if r.get("ppl_torch") else ""
            if r.get("ppl_torch") and r["row"] != "float":
                torch_ppl += f" (ORT {r['ppl'] / r['ppl_torch'] - 1:+.2%})"
            lines.append(
                f"| {r['row']} | {r['mib']:.1f} | {ratio('mib')} | {r['prefill_ms']:.0f} | {ratio('prefill_ms')} | "
                f"{r['decode_tokens_per_s']:.1f} | {ratio('decode_tokens_per_s')} | {r['ppl']:.3f} | {torch_ppl} | "
                f"{r['peak_rss_mib']:.0f} / {r['model_rss_mib']:.0f} | {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |")
        for r in rows:
            if r.get("recipe"):
                lines.append(f"\n`{r['row']}`: {r['recipe']}.")
        lines += ["", "Op counts of each `model.onnx` as written -> as onnxruntime's optimizer (ORT_ENABLE_ALL) leaves it "
                  "(`optimized_model_filepath`), for the ops that matter:", "",
                  "| row | nodes | MatMulNBits | GatherBlockQuantized | MatMul | SimplifiedLayerNormalization | "
                  "SkipSimplifiedLayerNormalization | LayerNormalization | Round |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "ops_written" not in r:
                continue
            cells = [f"{r['nodes_written']} -> {r['nodes_optimized']}"]
            for op in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "SimplifiedLayerNormalization",
                       "SkipSimplifiedLayerNormalization", "LayerNormalization", "Round"):
                cells.append(f"{r['ops_written'].get(op, 0)} -> {r['ops_optimized'].get(op, 0)}")
            lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    import importlib.metadata

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-genai", "onnx", "transformers"):
        try:
            versions[pkg.replace("-", "_")] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg.replace("-", "_")] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), **versions}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["opt-mini", "smollm2-135m"])
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    p.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                   help="one more row, ours-NAME: QuantConfig() overridden by JSON, exported as ours-w4a4 is")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "deploy")
    p.add_argument("--results-md", type=Path, default=BENCH / "RESULTS.md")
    p.add_argument("--keep", type=Path, help="keep the built folders here")
    # child-process mode
    p.add_argument("--measure", choices=["speed", "ppl", "ops"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    p.add_argument("--tokens-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return _child(args)
    sys.path.insert(0, str(BENCH))
    import llmq_fx
    from quality import parse_extra, splice_results_md  # the same NAME=JSON rows as bench/quality.py

    for extra in args.extra:
        try:
            name, recipe = parse_extra(extra)
        except (ValueError, llmq_fx.ConfigError) as err:
            p.error(str(err))
        CONFIGS[f"ours-{name}"] = recipe["config"]
        args.rows.append(f"ours-{name}")

    argv = sys.argv[1:] if argv is None else argv
    report = {"command": "python bench/deploy.py " + " ".join(shlex.quote(a) for a in argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(),
              "setup": {k: getattr(args, k) for k in ("threads", "runs", "prompt_tokens", "new_tokens", "seq_len",
                                                       "eval_windows", "calib_samples")},
              "models": list(args.models), "rows": [], "complete": False}
    json_path, md_path = args.out.with_name(args.out.name + ".json"), args.out.with_name(args.out.name + ".md")

    def save() -> None:
        _write(json_path, json.dumps(report, indent=2, default=str))
        block = markdown(report)
        _write(md_path, "# llmq_fx: deployment\n\n" + block.split("\n", 2)[2])
        splice_results_md(args.results_md, block, section="deploy")

    for name in args.models:
        work = Path(tempfile.mkdtemp(prefix=f"llmq_deploy_{name}_"))
        try:
            _progress(f"{name}: building {', '.join(args.rows)}")
            folders, facts = build_model_rows(name, list(args.rows), args, work)
            for row in args.rows:
                entry = {"model": name, "row": row, **{k: v for k, v in facts.get(row, {}).items()}}
                if row in folders:
                    entry["load_before"] = os.getloadavg()
                    try:
                        entry["mib"] = folder_bytes(folders[row]) / MIB
                        entry.update(_run_child("speed", folders[row], args, [
                            "--prompt-file", str(work / "prompt.json"), "--new-tokens", str(args.new_tokens),
                            "--runs", str(args.runs)]))
                        entry.update(_run_child("ppl", folders[row], args, [
                            "--tokens-file", str(work / "eval_tokens.pt"), "--seq-len", str(args.seq_len),
                            "--eval-windows", str(args.eval_windows)]))
                        entry.update(_run_child("ops", folders[row], args, []))
                    except RuntimeError as err:
                        entry["error"] = str(err)
                    entry["load_after"] = os.getloadavg()
                    _progress(f"{name} / {row}: " + ", ".join(f"{k} {entry[k]:.2f}" for k in
                              ("mib", "prefill_ms", "decode_tokens_per_s", "ppl") if k in entry))
                report["rows"].append(entry)
                save()
            if args.keep:
                shutil.copytree(work, args.keep / name, dirs_exist_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report["complete"] = True
    save()
    if args.out == BENCH / "results" / "deploy" and not any("error" in r for r in report["rows"]):
        from readme import splice_readme  # bench/readme.py: the README's deployment table comes from this JSON

        splice_readme(deploy=report)
        _progress("README.md deployment block rewritten from the JSON")
    print(md_path.read_text())
    return 1 if any("error" in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
