"""Speed and memory of the pipeline, stage by stage, against one float forward pass (the floor).

    python bench/speed.py --models opt-mini smollm2-135m                     # CPU, with export + latency
    python bench/speed.py --device cuda --shapes opt-1.3b opt-6.7b --calib 128x2048 --batch-size 4 \\
        --no-export --json speed_gpu.json                                    # [--tf32 --tag tf32]
    python bench/speed.py --merge speed_gpu.json      # fold a run made on another machine in

For each model: wall time and peak memory of every stage (trace; then, inside ``llmq_fx.quantize``,
rotate, observe, calibrate, smooth, group, gptq, quantize, as the config runs them; then the W4A4 ONNX export), and the floor: one plain
float forward pass of the traced graph over the same calibration tokens in the same batches. The
pipeline should cost little more than the floor, since calibration is one such pass plus the
observers; ``ratio`` is pipeline time over floor time.

* ``--models``: built-in models (``llmq_fx.models.load_model``), calibrated on the built-in text,
  ``--calib-samples`` windows of ``--seq-len`` tokens (the CLI's defaults: 32 x 512, batch 4).
* ``--shapes``: random-init OPTs with the real configs of facebook/opt-{125m,1.3b,6.7b,13b,30b},
  calibrated on random token ids (``--calib NxT``); timings only. Captured on the meta device and
  materialized tensor by tensor from seeded generators on ``--device`` (no whole model is built; the
  capture is the ``trace`` stage), and quantized in place under ``--no-export`` (the float weights
  freed as they are replaced, as the peer's are). With ``--host-weights`` the model is instead built
  on ``--device`` for the floor, traced, moved to the host and traced again; with ``--host-weights
  --weights-dtype bfloat16`` the meta capture gives a float32 copy on ``--device`` for the floor and a
  bfloat16 copy on the host for quantize (which computes it in float32).
* ``--host-weights``: after the floor, the traced graph moves to the host and ``llmq_fx.quantize(...,
  device=--device)`` quantizes it layer by layer (each weight on the device only while the walk
  reads it); the entry records the walk's peak of weights held on the device.
* Warm-up (``--shapes``, unless ``--no-warmup``): before the first timed model, ours and (with ``--peer``)
  the peer each run once, untimed, on ``opt-tiny`` (one layer, hidden 64; 4 x 128 ids) in the same
  process, by the same code: what a process pays once whatever the model (imports made on first use,
  custom-op registrations, CUDA context, Triton compilation; about 8 s of the first capture on the
  H200 machine) is not counted against either side's per-model time. The warm-up seconds are in
  every entry (``warmup``).
* Peak memory per stage: on CPU the process's peak RSS (VmHWM, reset at every stage start by writing
  5 to /proc/self/clear_refs); on CUDA ``torch.cuda.max_memory_allocated`` (reset per stage), plus
  the host's peak RSS. ``quantize`` first deep-copies the graph (its parameters too), untimed by
  its own stage clock: that copy is counted in the first stage's row (``rotate`` with the default
  config, else ``observe``), time and memory alike. ``--config`` overrides ``QuantConfig()``
  (e.g. ``{"gptq": false}`` with ``--tag no-gptq``); the config is in every entry.
* With the export (default on CPU): the float graph is exported too, and onnxruntime's latency on
  one ``[1, --seq-len]`` window (median of ``--latency-runs`` after two warm-ups) is measured for
  the float and the W4A4 file, next to the PyTorch graphs' latency; file sizes are recorded.

Output: ``--json`` (default ``bench/results/speed.json``) holds one section per device (``cpu``,
``cuda``), each keyed by model or shape name; every entry carries its own command, machine and
versions, and is written as soon as a stage finishes, so an interrupted run keeps what it measured.
New entries replace entries of the same name. ``speed.md`` next to the JSON is rewritten from the
whole JSON every time, and for the default ``--json`` copied into the speed section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import llmq_fx
from llmq_fx.recipe import PIPELINE as _PASS_ORDER
from quality import machine, splice_results_md  # bench/ is sys.path[0] when this script runs

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
MIB = 2**20

# Real facebook/opt-* configs (config.json on the Hub); vocab 50272, 2048 positions, pre-LN, ReLU.
SHAPES = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    # One small layer: the untimed warm-up run of each side (--no-warmup skips it), or a smoke test.
    "opt-tiny": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=256),
}
_OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, activation_function="relu",
                   dropout=0.0, attention_dropout=0.0, enable_bias=True, tie_word_embeddings=True)

# The stage rows of the tables, in pipeline order; "load" and "floor" are not part of the pipeline.
# Stages of the pipeline as timed: the capture, then every pass stage in llmq_fx's own order.
PIPELINE = ("trace", *dict.fromkeys(p.stage for p in _PASS_ORDER))


# -- memory and time ---------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageClock:
    """Wall time and peak memory of consecutive stages: ``start()``, then ``lap(name)`` at each stage end."""

    def __init__(self, device: torch.device, others: tuple[torch.device, ...] = ()):
        self.device = device
        self.gpus = [d for d in (device, *others) if d.type == "cuda"]  # peaks: the largest on any of them
        self.stages: dict[str, dict] = {}
        self.rss_resettable = _reset_peak_rss()

    def _sync(self) -> None:
        for d in self.gpus:
            torch.cuda.synchronize(d)

    def start(self) -> None:
        self._sync()
        _reset_peak_rss()
        self._rss0 = _status_kib("VmRSS") / 1024
        for d in self.gpus:
            torch.cuda.reset_peak_memory_stats(d)
        if self.gpus:
            self._gpu0 = max(torch.cuda.memory_allocated(d) for d in self.gpus) / MIB
        self._t0 = time.perf_counter()

    def lap(self, name: str) -> dict:
        self._sync()
        rec = {"seconds": time.perf_counter() - self._t0,
               "peak_rss_mib": _status_kib("VmHWM") / 1024, "start_rss_mib": self._rss0}
        if self.gpus:
            rec["peak_gpu_mib"] = max(torch.cuda.max_memory_allocated(d) for d in self.gpus) / MIB
            rec["start_gpu_mib"] = self._gpu0
        self.stages[name] = rec
        logger.info("%s: %.2f s", name, rec["seconds"])
        self.start()
        return rec


class _StageEnds(logging.Handler):
    """Laps the clock at the end of every stage of ``llmq_fx.quantize`` (it logs ``stage <name>: ...``)."""

    def __init__(self, clock: StageClock):
        super().__init__(logging.INFO)
        self.clock = clock

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("stage ") and record.args:
            self.clock.lap(str(record.args[0]))


def quantize_by_stage(gm, calib: torch.Tensor, config, clock: StageClock, device=None, inplace: bool = False):
    """``llmq_fx.quantize`` with the clock lapped at each of its stage ends."""
    qlog = logging.getLogger("llmq_fx.quantize")
    handler, level = _StageEnds(clock), qlog.level
    qlog.addHandler(handler)
    qlog.setLevel(logging.INFO)
    try:
        clock.start()
        qgm = llmq_fx.quantize(gm, calib, config, progress=False, device=device, inplace=inplace)
    finally:
        qlog.removeHandler(handler)
        qlog.setLevel(level)
    own = qgm.meta["llmq_fx"]["timings_s"]
    missing = set(own) - set(clock.stages)
    if missing:
        raise RuntimeError(f"llmq_fx.quantize no longer logs the end of stages {sorted(missing)}; fix _StageEnds")
    # The first lap also holds quantize()'s deep copy of the graph, which its own clock leaves out.
    first = next(iter(own))
    clock.stages[first]["copy_seconds"] = clock.stages[first]["seconds"] - own[first]
    for name, seconds in own.items():
        clock.stages[name]["stage_clock_seconds"] = seconds
    return qgm


@torch.no_grad()
def float_forward(gm, calib: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """The floor: the float graph over the calibration tokens, batched as ``calibrate`` batches them."""
    for batch in calib.split(batch_size):
        gm(batch.to(device))


# -- models ------------------------------------------------------------------------------------
def random_opt(shape: str, device: torch.device):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**_OPT_COMMON, **SHAPES[shape], word_embed_proj_dim=SHAPES[shape]["hidden_size"])
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: 6.7B normal draws on the host take minutes
        model = OPTForCausalLM(config).float().eval()
    # OPT's own initialisation, done here so that no library version can leave a tensor unset.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, config.init_std)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def meta_opt_graph(shape: str):
    """A random-init OPT shape captured on the meta device: the graph costs no memory for its weights."""
    from transformers import OPTConfig

    from llmq_fx.models import trace_on_meta

    config = OPTConfig(**_OPT_COMMON, **SHAPES[shape], word_embed_proj_dim=SHAPES[shape]["hidden_size"])
    return trace_on_meta(config), config


def materialize(gm, config, device: torch.device, dtype: torch.dtype | None):
    """``meta_opt_graph``'s graph materialized tensor by tensor from seeded generators on ``device`` (OPT's
    initialisation: normal(0, init_std) weights, unit norm weights, zero biases): the float32 graph on
    ``device`` (for the floor) and, unless ``dtype`` is None, the same values stored in ``dtype`` on the
    host (what quantize walks with --host-weights). No whole model is built anywhere else."""
    import zlib

    from llmq_fx.graph import retarget_devices, share_tensors_copy, write_attr

    on_device, on_host = share_tensors_copy(gm), share_tensors_copy(gm) if dtype is not None else None
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.device.type != "meta":
            continue
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        if name.endswith("bias"):
            value = torch.zeros(t.shape, device=device)
        elif "layer_norm" in name:
            value = torch.ones(t.shape, device=device)
        else:
            value = torch.empty(t.shape, device=device).normal_(0.0, config.init_std, generator=g)
        write_attr(on_device, name, value, device=device)
        if on_host is not None:
            write_attr(on_host, name, value, dtype=dtype, device="cpu")
    retarget_devices(on_device, "meta", device)  # factories and moves traced with the meta device
    if on_host is not None:
        retarget_devices(on_host, "meta", "cpu")
    return on_device, on_host


def parse_calib(text: str) -> tuple[int, int]:
    n, _, t = text.lower().partition("x")
    return int(n), int(t)


# -- onnxruntime -------------------------------------------------------------------------------
def latency_ms(runner, window: torch.Tensor, runs: int) -> dict:
    times = []
    with torch.no_grad():
        for i in range(runs + 2):
            t0 = time.perf_counter()
            runner(window)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


# -- results -----------------------------------------------------------------------------------
def save_entry(path: Path, section: str, name: str, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(section, {})[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    text = markdown(data)
    path.with_suffix(".md").write_text(text)
    if path.resolve() == (RESULTS / "speed.json").resolve():  # the project's results: also in RESULTS.md
        splice_results_md(RESULTS.parent / "RESULTS.md", "## Speed and memory\n" + text.split("\n", 1)[1].replace("\n## ", "\n### "),
                          section="speed")


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _superseded(name: str) -> bool:
    """Entries kept for the record under a name that says when they were measured ("... at <commit>",
    "... beside <commit>" for a peer, "earlier: ..."): tabled apart from the current ones."""
    return " at " in name or ", beside " in name or name.startswith("earlier: ")


def markdown(data: dict) -> str:
    lines = ["# llmq_fx speed and memory", "",
             "Written by `bench/speed.py` (its docstring says what is measured). Times are wall seconds of one run; "
             "the floor is one float forward pass of the traced graph over the calibration tokens, batched as "
             "calibration is; ratio = time / floor. The first stage (`rotate`, else `observe`) includes the deep copy of the graph that "
             "`llmq_fx.quantize` makes first.", ""]
    groups = []
    for section, title in (("cpu", "CPU"), ("cuda", "GPU (CUDA)")):
        entries = data.get(section) or {}
        older = {n: e for n, e in entries.items() if _superseded(n)}
        current = {n: e for n, e in entries.items() if n not in older}
        groups += [(section, title, current), (section, f"{title}: earlier measurements", older)]
    for section, title, entries in groups:
        if not entries:
            continue
        gpu = section == "cuda"
        mems = [("peak_gpu_mib", "peak GPU MiB"), ("peak_rss_mib", "host RSS MiB")] if gpu else [("peak_rss_mib", "peak RSS MiB")]
        lines += [f"## {title}", ""]
        for name, e in entries.items():
            m = e["machine"]
            hw = f"{m['gpu']} ({m['gpu_memory_gib']} GiB), CUDA {m['cuda']}, TF32 matmul {'on' if m['tf32_matmul'] else 'off'}; host " if gpu else ""
            lines.append(f"- **{name}**: `{e['command']}`  \n  {hw}{m['cpu']}, {m['cpu_count']} cores, "
                         f"{m['torch_threads']} torch threads, load average at start {m['loadavg_start'][0]:.2f}; "
                         f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
                         f"onnxruntime {m['onnxruntime']}, scikit-learn {m['scikit-learn']}")
        lines.append("")
        lines.append("| | " + " | ".join(entries) + " |")
        lines.append("|---|" + "---|" * len(entries))
        lines.append("| calibration tokens (N x T, batch) | " + " | ".join(
            f"{e['calib']['samples']} x {e['calib']['seq_len']}, batch {e['calib']['batch_size']}" for e in entries.values()) + " |")
        lines.append("| config: QuantConfig() with | " + " | ".join(
            f"peer: {e['peer']}" if e.get("peer") else f"`{json.dumps(e['config_overrides'])}`" if e.get("config_overrides") else "defaults"
            for e in entries.values()) + " |")
        lines.append("| placement | " + " | ".join(e.get("placement", "") for e in entries.values()) + " |")
        if any(e.get("lockstep") for e in entries.values()):
            lines.append("| weights held on the device by the GPTQ walk, peak MiB | " + " | ".join(
                _num((e.get("lockstep") or {}).get("peak_weight_bytes", 0) / MIB or None, ".0f") for e in entries.values()) + " |")
            lines.append("| activations kept across batches by the walk, peak MiB (sites recomputed) | " + " | ".join(
                f"{_num(w['peak_state_bytes'] / MIB, '.0f')} ({w['recomputed_sites']})" if "peak_state_bytes" in (w := e.get("lockstep") or {}) else "–"
                for e in entries.values()) + " |")
        if any((e.get("lockstep") or {}).get("site_seconds") for e in entries.values()):
            lines.append("| gptq stage: the sites' own work, s: clip search (with the lanes' first pass) / moments / factor / round | "
                         + " | ".join(" / ".join(f"{w[k]:.1f}" for k in ("clip_search", "moments", "factor", "round") if k in w)
                                      if (w := (e.get("lockstep") or {}).get("site_seconds")) else "–" for e in entries.values()) + " |")
        lines.append("| model (parameters) | " + " | ".join(f"{e['model']} ({e['parameters'] / 1e6:.0f} M, {e['dtype']})" for e in entries.values()) + " |")
        lines += ["", "| stage | " + " | ".join(f"{n} s | " + " | ".join(m for _, m in mems) for n in entries) + " |",
                  "|---|" + "---:|" * (len(entries) * (1 + len(mems)))]
        rows = ["load"] + list(PIPELINE) + ["export", "export_float", "floor"]
        for row in rows:
            cells = []
            for e in entries.values():
                st = e["stages"].get(row) or {}
                cells.append(" | ".join([_num(st.get("seconds"), ".2f")] + [_num(st.get(k), ".0f") for k, _ in mems]))
            if any(c.strip(" |") for c in cells):
                label = {"load": "load (not in pipeline)", "export": "export W4A4 ONNX", "export_float": "export float ONNX (reference)",
                         "floor": "**floor**: float forward"}.get(row, row)
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| | " + " | ".join(entries) + " |", "|---|" + "---:|" * len(entries)]
        summary_rows = [("floor s", "floor_s", ".2f"), ("pipeline s (trace .. quantize)", "pipeline_s", ".2f"),
                        ("**ratio pipeline / floor**", "ratio", ".2f"), ("calibrate / floor", "calibrate_ratio", ".2f"),
                        ("pipeline + export s", "pipeline_export_s", ".2f"), ("ratio (pipeline + export) / floor", "ratio_with_export", ".2f"),
                        (f"peak {'GPU memory (allocated)' if gpu else 'RSS'} over the whole run MiB", "peak_mib", ".0f"),
                        (f"peak {'GPU memory (allocated)' if gpu else 'RSS'} in the pipeline MiB", "pipeline_peak_mib", ".0f")]
        for label, key, fmt in summary_rows:
            vals = [e.get("summary", {}).get(key) for e in entries.values()]
            if any(v is not None for v in vals):
                lines.append(f"| {label} | " + " | ".join(_num(v, fmt) for v in vals) + " |")
        with_ort = {n: e for n, e in entries.items() if e.get("onnx")}
        if with_ort:
            lines += ["", "Latency of one `[1, seq]` window on the CPU (median ms; onnxruntime CPUExecutionProvider, QDQ run as written) and file sizes:", "",
                      "| model | seq | float ONNX MiB | W4A4 ONNX MiB | size ratio | ORT float ms | ORT W4A4 ms | W4A4 / float | PyTorch float ms | PyTorch W4A4 (fake-quant) ms |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for n, e in with_ort.items():
                o, lat = e["onnx"], e.get("latency", {})
                med = {k: v["median_ms"] for k, v in lat.items()}
                ratio = med["ort_w4a4"] / med["ort_float"] if "ort_w4a4" in med and "ort_float" in med else None
                lines.append(f"| {n} | {o['window']} | {o['float_bytes'] / MIB:.2f} | {o['w4a4_bytes'] / MIB:.2f} | "
                             f"{o['w4a4_bytes'] / o['float_bytes']:.3f} | {_num(med.get('ort_float'), '.1f')} | {_num(med.get('ort_w4a4'), '.1f')} | "
                             f"{_num(ratio, '.2f')} | {_num(med.get('torch_float'), '.1f')} | {_num(med.get('torch_w4a4'), '.1f')} |")
        notes = [e["note"] for e in entries.values() if e.get("note")]
        warm = {json.dumps(e["warmup"], sort_keys=True): e["warmup"] for e in entries.values() if e.get("warmup")}
        notes += [f"warm-up before the timed models of a command (untimed, same process, same code): {w['shape']} with "
                  f"{w['calib']} ids, ours {w['ours_s']:.1f} s" + (f", llm-compressor {w['peer_s']:.1f} s" if "peer_s" in w else "")
                  for w in warm.values()]
        lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)] + ([""] if notes else [])
    return "\n".join(lines).rstrip() + "\n"


# -- one model ---------------------------------------------------------------------------------
def run_one(name: str, args, device: torch.device, save) -> None:
    from llmq_fx.corpus import calibration_set, load_text, tokenize
    from llmq_fx.models import load_model

    clock = StageClock(device, tuple(args.walk[1:]))
    entry: dict = {"command": args.command, "machine": machine(device), "device": ",".join(map(str, args.walk)),
                   "stages": clock.stages}
    clock.start()
    stored = getattr(torch, args.weights_dtype) if args.weights_dtype else None
    host_gm = model = None
    if name in SHAPES and (stored is not None or not args.host_weights):
        # captured on meta, materialized tensor by tensor: no whole model built
        gm, mconfig = meta_opt_graph(name)
        clock.lap("trace")
        gm, host_gm = materialize(gm, mconfig, device, stored)
        n, t = parse_calib(args.calib)
        calib = torch.randint(0, mconfig.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
        entry["model"] = (f"random-init {name} shape, captured on the meta device, weights from seeded generators "
                          + (f"(float32 on {device} for the floor, {args.weights_dtype} on the host for quantize)"
                             if stored is not None else f"(float32 on {device})"))
    elif name in SHAPES:
        model, n, t = random_opt(name, device), *parse_calib(args.calib)
        calib = torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
        entry["model"] = f"random-init {name} shape"
    else:
        model, tok = load_model(name)
        model.to(device)
        calib = calibration_set(tokenize(tok, load_text("calib")), args.calib_samples, args.seq_len)
        entry["model"] = name
    clock.lap("load")
    source = model if model is not None else gm
    entry["parameters"] = sum(p.numel() for p in source.parameters())
    entry["dtype"] = str(next(source.parameters()).dtype).removeprefix("torch.") + (f", stored {args.weights_dtype} on the host" if stored else "")
    del source  # else it keeps the floor's device graph alive after the walk takes the host copy
    entry["attention"] = getattr(model.config if model is not None else mconfig, "_attn_implementation", None)
    config = llmq_fx.QuantConfig.from_dict({**json.loads(args.config), "calib_batch_size": args.batch_size})
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 or config.calib_precision == "tf32"  # the floor in the same precision
    entry["config"] = config.to_dict()
    entry["config_overrides"] = json.loads(args.config)
    entry["calib"] = {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "tokens": int(calib.numel()),
                      "batch_size": args.batch_size, "source": "random token ids" if name in SHAPES else "built-in calib text"}

    if model is not None:
        clock.start()
        gm = llmq_fx.trace(model)
        clock.lap("trace")
    float_forward(gm, calib[: args.batch_size, : min(calib.shape[1], 128)], args.batch_size, device)  # warm-up, untimed
    clock.start()
    float_forward(gm, calib, args.batch_size, device)
    clock.lap("floor")
    entry["placement"] = f"weights on the host, computed on {device}" if args.host_weights else f"weights on {device}"
    if len(args.walk) > 1:
        entry["placement"] += f"; the GPTQ walk's batches spread over {', '.join(map(str, args.walk))}"
    if host_gm is not None:  # the floor's device graph goes; quantize walks the host copy
        del gm
        gc.collect()  # a GraphModule is a reference cycle (graph <-> module): not freed by del alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gm = host_gm
    elif args.host_weights:  # quantize(device=) walks a graph traced on the host; the floor above ran on the device
        del gm
        gc.collect()
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        clock.start()
        gm = llmq_fx.trace(model)  # traced again, so that the graph's constants live on the host too
        clock.lap("trace")
    save(name, entry)

    # The materialized host copy is the bench's own, and without an export the float graph is not needed after
    # this: quantized in place, its originals freed as they are replaced (as the peer's model is).
    walk = args.walk if len(args.walk) > 1 else device if args.host_weights else None
    qgm = quantize_by_stage(gm, calib, config, clock, walk, inplace=host_gm is not None or args.no_export)
    entry["lockstep"] = qgm.meta["llmq_fx"].get("lockstep")
    moments = [r.get("moments") for r in qgm.meta["llmq_fx"].get("gptq", {}).values() if r.get("sequential")]
    entry["moments"] = {p: moments.count(p) for p in sorted(set(moments))}  # Linears rounded with TF32 / float32 Grams
    st = clock.stages
    floor = st["floor"]["seconds"]
    pipeline = sum(st[s]["seconds"] for s in PIPELINE if s in st)
    entry["summary"] = {"floor_s": floor, "pipeline_s": pipeline, "ratio": pipeline / floor,
                        # Sequential GPTQ calibrates inside its gptq stage: no calibrate stage then.
                        "calibrate_ratio": st["calibrate"]["seconds"] / floor if "calibrate" in st else None}
    save(name, entry)

    if not args.no_export:
        from llmq_fx.export import OnnxCausalLM, onnx_qdq_report, to_onnx

        with tempfile.TemporaryDirectory(prefix="llmq_speed_") as tmp:
            qgm_cpu, gm_cpu = qgm.to("cpu"), gm.to("cpu")
            clock.start()
            w4a4 = to_onnx(qgm_cpu, Path(tmp) / "w4a4.onnx")
            clock.lap("export")
            fp = to_onnx(gm_cpu, Path(tmp) / "float.onnx")
            clock.lap("export_float")
            entry["onnx"] = {"w4a4_bytes": onnx_qdq_report(w4a4)["file_bytes"], "float_bytes": onnx_qdq_report(fp)["file_bytes"],
                             "window": args.seq_len}
            export = st["export"]["seconds"]
            entry["summary"].update(pipeline_export_s=pipeline + export, ratio_with_export=(pipeline + export) / floor)
            save(name, entry)
            if args.latency_runs:
                window = calib[:1, : args.seq_len].cpu()
                entry["latency"] = {}
                for key, runner in (("ort_float", OnnxCausalLM(fp)), ("ort_w4a4", OnnxCausalLM(w4a4)),
                                    ("torch_float", gm_cpu), ("torch_w4a4", qgm_cpu)):
                    entry["latency"][key] = latency_ms(runner, window, args.latency_runs)
                    logger.info("%s latency: %.1f ms", key, entry["latency"][key]["median_ms"])
    elif device.type == "cuda":
        entry["note"] = ("GPU: ONNX export skipped for these models (the exporter works on a CPU copy of the graph and "
                         "would write GB-sized files; the CPU section measures it). Rotation, observers, statistics, "
                         "Hessians, GPTQ, smoothing and QDQ stay on the GPU; with static activations k-means (the "
                         "`group` row) runs once per site on the CPU over a small [channels, 2] feature matrix.")
    # The quantized graph runs where it was built (on the host with --host-weights): every tensor there, finite logits.
    home = torch.device("cpu") if args.host_weights else device
    tensors = list(qgm.parameters()) + list(qgm.buffers())
    with torch.no_grad():
        logits = qgm(calib[:1, :128].to(home))
    entry["check"] = {"tensors_on_device": sum(t.device.type == home.type for t in tensors), "tensors": len(tensors), "device": str(home),
                      "quantized_logits_finite": bool(torch.isfinite(logits).all())}
    peak_key = "peak_gpu_mib" if device.type == "cuda" else "peak_rss_mib"
    entry["summary"]["peak_mib"] = max(s[peak_key] for s in st.values())
    entry["summary"]["pipeline_peak_mib"] = max(st[s][peak_key] for s in PIPELINE if s in st)
    entry["machine"]["loadavg_end"] = os.getloadavg()
    entry["complete"] = True
    save(name, entry)
    del qgm, gm, model, logits, tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_peer(name: str, args, device: torch.device, save) -> None:
    """llm-compressor's ``GPTQModifier`` (its sequential pipeline, W4 symmetric per output channel, lm_head
    left out) on the same random-init shape and the same calibration ids as ``run_one``: time, floor,
    peak device memory. Weight-only GPTQ: the baseline ours must not be slower than."""
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    clock = StageClock(device)
    entry: dict = {"command": args.command, "machine": machine(device), "device": str(device), "stages": clock.stages,
                   "peer": f"llm-compressor {llmcompressor.__version__} GPTQModifier (W4 symmetric per channel, sequential pipeline)"}
    clock.start()
    model, (n, t) = random_opt(name, device), parse_calib(args.calib)
    calib = torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
    clock.lap("load")
    entry["model"] = f"random-init {name} shape"
    entry["parameters"] = sum(p.numel() for p in model.parameters())
    entry["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    entry["calib"] = {"samples": n, "seq_len": t, "tokens": n * t, "batch_size": args.batch_size, "source": "random token ids"}
    float_forward(model, calib[: args.batch_size, :128], args.batch_size, device)  # warm-up, untimed
    clock.start()
    float_forward(model, calib, args.batch_size, device)
    clock.lap("floor")
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}},
        ignore=["lm_head"],
    )
    clock.start()
    # The ids are already tokens; llm-compressor still asks for a processor: OPT's tokenizer (opt-mini's copy).
    from transformers import AutoTokenizer

    processor = AutoTokenizer.from_pretrained(Path(llmq_fx.__file__).parent / "assets" / "opt-mini")
    # and it reads the model's config back from disk (model.config.name_or_path): give it one.
    config_dir = tempfile.mkdtemp(prefix="llmq_peer_")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, max_seq_length=t, num_calibration_samples=n,
            batch_size=args.batch_size)
    clock.lap("gptq")
    st = clock.stages
    entry["summary"] = {"floor_s": st["floor"]["seconds"], "pipeline_s": st["gptq"]["seconds"],
                        "ratio": st["gptq"]["seconds"] / st["floor"]["seconds"],
                        "peak_mib": max(s.get("peak_gpu_mib" if device.type == "cuda" else "peak_rss_mib", 0) for s in st.values())}
    entry["complete"] = True
    save(name + " llm-compressor", entry)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(args, device: torch.device) -> dict:
    """One untimed run of ours (and the peer) on ``opt-tiny``, by the code the timed runs use: seconds each."""
    tiny = argparse.Namespace(**{**vars(args), "calib": "4x128", "no_export": True})
    out = {"shape": "opt-tiny", "calib": tiny.calib}
    t0 = time.perf_counter()
    run_one("opt-tiny", tiny, device, lambda n, e: None)
    out["ours_s"] = time.perf_counter() - t0
    if args.peer:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        t0 = time.perf_counter()
        run_peer("opt-tiny", tiny, device, lambda n, e: None)
        out["peer_s"] = time.perf_counter() - t0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    logger.info("warm-up on opt-tiny: %s", out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[], help="built-in models (opt-mini, smollm2-135m, ...)")
    p.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPES), help="random-init OPT shapes")
    p.add_argument("--device", default="cpu", help="cpu, cuda; comma-separated GPUs (cuda:0,cuda:1) spread the "
                   "GPTQ walk's calibration batches over them (peak memory: the largest on any of them)")
    p.add_argument("--calib", default="128x2048", help="random calibration ids N x T for --shapes")
    p.add_argument("--calib-samples", type=int, default=32, help="windows of the built-in text for --models")
    p.add_argument("--seq-len", type=int, default=512, help="window length for --models and the latency window")
    p.add_argument("--batch-size", type=int, default=4, help="calibration (and floor) batch size")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export and the onnxruntime latency")
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--config", default="{}", help='QuantConfig() overrides as JSON, e.g. \'{"gptq": false}\' (with --tag)')
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matrix products in the floor too (the pipeline follows "
                   "the config's calib_precision)")
    p.add_argument("--host-weights", action="store_true", help="keep the graph on the host and quantize it layer by layer on "
                   "--device (llmq_fx.quantize(..., device=)); the floor still runs with the model on the device")
    p.add_argument("--weights-dtype", choices=["bfloat16"], help="--shapes with --host-weights: capture on the meta device, "
                   "materialize each tensor from a seeded generator, and store the host copy in this dtype (opt-30b's float32 "
                   "weights do not fit the host); the floor runs a float32 copy on --device")
    p.add_argument("--peer", action="store_true", help="--shapes: also run llm-compressor's GPTQModifier on the same shape and tokens")
    p.add_argument("--no-warmup", action="store_true", help="--shapes: time the first model cold (no untimed opt-tiny run first)")
    p.add_argument("--tag", help="appended to every entry name, e.g. tf32")
    p.add_argument("--json", type=Path, default=RESULTS / "speed.json")
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="speed JSON files from other machines to fold into --json")
    args = p.parse_args()
    if args.weights_dtype and not args.host_weights:
        p.error("--weights-dtype stores the host copy that --host-weights quantizes: add --host-weights")
    args.command = "python bench/speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    warnings.filterwarnings("ignore")
    logging.getLogger("llmq_fx").setLevel(logging.WARNING)  # the passes log every site at INFO
    for noisy in ("torch.onnx", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir", "llmq_fx.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    for other in args.merge:
        for section, entries in json.loads(other.read_text()).items():
            for name, entry in entries.items():
                save_entry(args.json, section, name, entry)
    args.walk = [torch.device(d) for d in args.device.split(",")]  # several: the GPTQ walk spread over them
    device = args.walk[0]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    section = "cuda" if device.type == "cuda" else "cpu"
    suffix = f" ({args.tag})" if args.tag else ""
    warmup = warm_up(args, device) if args.shapes and not args.no_warmup else None
    for name in list(args.models) + list(args.shapes):
        run_one(name, args, device, lambda n, e: save_entry(args.json, section, n + suffix, {**e, "warmup": warmup}))
        if args.peer and name in SHAPES:
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            run_peer(name, args, device, lambda n, e: save_entry(args.json, section, n + suffix, {**e, "warmup": warmup}))
    print(args.json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
