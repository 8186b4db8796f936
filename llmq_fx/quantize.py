"""``quantize()``: run a config's recipe (``llmq_fx.recipe``) on a copy of a captured graph.

The default recipe is rotate -> observe -> gptq (sequential: calibration and GPTQ in one walk) ->
quantize; the static SmoothQuant/RPTQ-style one is observe -> calibrate -> smooth -> group -> quantize.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from llmq_fx import qmath
from llmq_fx.calibrate import calibration_batches
from llmq_fx.config import QuantConfig
from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, is_linear, is_skipped, module_path, share_tensors_copy, traced_dtype, write_attr
from llmq_fx.passes.base import CalibratedPass
from llmq_fx.recipe import recipe

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


def quantize(
    gm: fx.GraphModule,
    calib: torch.Tensor | Iterable[torch.Tensor],
    config: QuantConfig | dict | None = None,
    progress: bool = True,
    device: str | torch.device | list[str | torch.device] | None = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Quantize a captured model; returns a new GraphModule (``gm`` is not mutated unless ``inplace``).

    Args:
        gm: the output of ``llmq_fx.trace``.
        calib: calibration token ids, a LongTensor ``[N, T]`` or an iterable of LongTensors.
        config: a ``QuantConfig`` (or dict); default W4A4: rotation (where the graph allows it) with
            the residual channels ordered by range, sequential act-aware GPTQ weights with one scale
            per 64 inputs and clipping search, dynamic activations in groups of 32 channels with a
            per-site clip ratio, embedding table W4, lm_head W8.
        progress: show a progress bar per stage.
        device: where the passes compute, when not where ``gm``'s parameters are: a graph kept on
            the host is then quantized layer by layer on ``device`` (e.g. ``"cuda"``): the walk moves
            each weight there when a node reads it and frees it after its last reader, GPTQ and the
            rotation compute there, and every result is stored back on the host, so device memory
            holds one layer's weights and the calibration activations, not the model. The returned
            graph lives where ``gm`` does. Runs the sequential-GPTQ recipes (the default). A list of
            devices (``["cuda:0", "cuda:1"]``) spreads the sequential walk's calibration batches over
            them (batch ``b`` on device ``b mod n``: each holds ``1/n`` of the activations and they
            compute side by side); the first is where the passes compute.
        inplace: rewrite ``gm`` itself and return it. The default copy shares ``gm``'s tensors and
            the passes replace rather than write into them, so it costs no second copy of the weights;
            but ``gm`` keeps every original tensor alive while the copy gets new ones (rotated weights,
            integer codes), up to twice the model in memory. With ``inplace`` each original is freed as
            it is replaced: for a model that fills the host (opt-30b in bfloat16 on a 128 GiB host).

    Returns:
        The rewritten GraphModule. ``qgm.meta["llmq_fx"]`` holds the config, the recipe that ran,
        per-Linear records, smoothing/rotation reports and stage timings; ``llmq_fx.summary(qgm)``
        tabulates it.

    Example:
        >>> print(llmq_fx.recipe(config))          # what will run
        >>> qgm = llmq_fx.quantize(llmq_fx.trace(model), calib_ids, config)
        >>> print(qgm.graph)
    """
    config = QuantConfig.coerce(config)
    passes = recipe(config)
    batches = calibration_batches(calib, config.calib_batch_size)  # a bad calibration set fails before any work
    _check_group_size(gm, config)  # Linears a weight group size does not fit: said before any work
    home = next((p.device for p in gm.parameters()), torch.device("cpu"))
    narrow = _captured_dtypes(gm)
    named = [home] if device is None else [torch.device(d) for d in device] if isinstance(device, (list, tuple)) else [torch.device(device)]
    if not named:
        raise ConfigError("quantize(device=[]) names no device")
    walk = [_check_device(config, passes, home, d, gm, narrow) for d in named]
    device = walk[0]
    if len(walk) > 1 and not config.runs_sequential_gptq():
        raise ConfigError(f"quantize(device={[str(d) for d in walk]}): only the sequential GPTQ walk spreads over several "
                          "devices, and this config does not run it; name one device")
    qgm = gm if inplace else share_tensors_copy(gm)  # the passes replace tensors, never write into them
    meta = qgm.meta.setdefault("llmq_fx", {})
    meta.update(config=config.to_dict(), recipe=passes.to_dict(), gptq_sequential=config.runs_sequential_gptq())
    if device != home:
        meta["device"] = str(device)
    if len(walk) > 1:
        meta["walk_devices"] = [str(d) for d in walk]
    _note_act_aware(config, meta)
    timings = meta.setdefault("timings_s", {})
    bar = tqdm(passes, desc="llmq_fx", unit="stage", disable=not progress)
    with qmath.cuda_matmul_precision(config.calib_precision):
        for p in bar:
            bar.set_postfix_str(p.stage)
            if isinstance(p, CalibratedPass):
                p = p.with_calibration(batches, progress)
            t0 = time.perf_counter()
            qgm = p(qgm).graph_module
            timings[p.stage] = time.perf_counter() - t0
            logger.info("stage %s: %.2f s", p.stage, timings[p.stage])
    meta.pop("walk_devices", None)
    if meta.pop("device", None) is not None:
        qgm.to(home)  # the few small tensors made on the device (activation ranges, statistics) join the weights
    _as_captured(qgm, narrow)
    return qgm


def _captured_dtypes(gm: fx.GraphModule) -> dict[str, torch.dtype]:
    """Floating tensors of ``gm`` stored in another dtype than the graph was captured with (bfloat16
    weights of a float32 capture, to halve host memory) -> the captured dtype. The sequential walk
    computes them as captured."""
    out = {}
    for node in gm.graph.nodes:
        want = traced_dtype(node) if node.op == "get_attr" else None
        if want is not None and want.is_floating_point:
            t = attr(gm, node.target)
            if t.is_floating_point() and t.dtype != want:
                out[node.target] = want
    return out


def _as_captured(gm: fx.GraphModule, captured: dict[str, torch.dtype]) -> None:
    """What no pass replaced (norms, biases, a float lm_head) back in the captured dtype: the graph runs as captured."""
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        want = captured.get(name)
        if want is not None and t.dtype != want:
            write_attr(gm, name, t, dtype=want)


def _check_device(config: QuantConfig, passes, home: torch.device, device: torch.device, gm: fx.GraphModule,
                  narrow: dict[str, torch.dtype]) -> torch.device:
    """``device`` if this config can compute there with ``gm``'s weights where and as they are stored
    (``narrow``: ``_captured_dtypes``), else a ``ConfigError`` saying what to change."""
    whole = [p.stage for p in passes if p.stage in ("calibrate", "learn_rotation")]  # whole-model forwards
    if narrow and whole:
        first = next(iter(narrow))
        raise ConfigError(
            f"{first} is stored as {attr(gm, first).dtype} in a graph captured in another dtype: only the sequential "
            f"GPTQ walk computes such weights as captured, and stage(s) {', '.join(whole)} run whole-model forwards; "
            "store the weights in the captured dtype")
    if device != home and whole:
        raise ConfigError(
            f"quantize(device={str(device)!r}) with the weights on {home}: stage(s) {', '.join(whole)} run whole-model "
            "forwards, which need the weights where they compute; move the model to the device instead"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if config.calib_dtype != "float32" and device.type != "cuda":
        raise ConfigError(
            f"config key 'calib_dtype'={config.calib_dtype!r} runs on CUDA only; this run computes on {device}: "
            "use calib_dtype 'float32' on the CPU"
        )
    return device


def _check_group_size(gm: fx.GraphModule, config: QuantConfig) -> None:
    """Name, in one warning before any work, the quantized Linears whose input width ``w_group_size`` does not
    divide (or is not wider than): they keep one weight scale per output channel (``WeightSpec.for_features``)."""
    g = config.w_group_size
    if g is None or config.w_bits is None:
        return
    whole = []
    for node in gm.graph.nodes:
        if not is_linear(node) or is_skipped(module_path(node), config.skip):
            continue
        weight = node.args[1]
        val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
        if val is not None and val.dim() == 2 and (val.shape[1] % g or val.shape[1] <= g):
            whole.append(f"{module_path(node)} (in_features={val.shape[1]})")
    if whole:
        logger.warning("w_group_size=%d does not divide the input width of %d Linear(s), one weight scale per output "
                       "channel there: %s", g, len(whole), ", ".join(whole[:4]) + (", ..." if len(whole) > 4 else ""))


def _note_act_aware(config: QuantConfig, meta: dict) -> None:
    """Where the config asks for act-aware GPTQ but it cannot apply, plain GPTQ runs: say why
    (``meta["gptq_act_aware_skipped"]``, and a warning)."""
    if not (config.gptq and config.w_bits is not None and config.gptq_act_aware is not None):
        return
    reason = config.act_aware_unavailable()
    meta["gptq_act_aware_skipped"] = reason
    if reason is not None:
        logger.warning("gptq_act_aware=%s: plain GPTQ instead, %s", config.gptq_act_aware, reason)
