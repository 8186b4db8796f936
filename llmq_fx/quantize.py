"""The pipeline in one place: (rotate) -> observe -> calibrate -> smooth -> group -> (gptq) -> quantize.

With sequential act-aware GPTQ (the default) calibration happens inside the gptq stage:
(rotate) -> observe -> gptq (lockstep calibration + GPTQ) -> quantize.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from llmq_fx.calibrate import calibrate
from llmq_fx.config import QuantConfig
from llmq_fx.errors import UnsupportedModelError
from llmq_fx.passes import GroupChannelsPass, InsertObserversPass, InsertQDQPass, SmoothPass
from llmq_fx.stats import InputQuantizer

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


def quantize(
    gm: fx.GraphModule,
    calib: torch.Tensor | Iterable[torch.Tensor],
    config: QuantConfig | dict | None = None,
    progress: bool = True,
) -> fx.GraphModule:
    """Quantize a captured model; returns a new GraphModule (``gm`` is not mutated).

    Args:
        gm: the output of ``llmq_fx.trace``.
        calib: calibration token ids, a LongTensor ``[N, T]`` or an iterable of LongTensors.
        config: a ``QuantConfig`` (or dict); default W4A4: rotation (where the graph allows it),
            sequential act-aware GPTQ weights per output channel with clipping search, dynamic
            activations in groups of 64 channels with a per-site clip ratio, lm_head float.

    Returns:
        The rewritten GraphModule. ``qgm.meta["llmq_fx"]`` holds the config, per-Linear summary,
        smoothing report and stage timings; ``llmq_fx.summary(qgm)`` tabulates it.

    Example:
        >>> qgm = llmq_fx.quantize(llmq_fx.trace(model), calib_ids, QuantConfig(w_bits=4, a_bits=4))
        >>> print(qgm.graph)
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    qgm = copy.deepcopy(gm)
    t0 = time.perf_counter()
    rotation_skipped = None
    if config.rotate:
        from llmq_fx.passes.rotate import RotatePass

        try:
            RotatePass(seed=config.seed)(qgm)
        except UnsupportedModelError as err:
            if config.rotate is True:
                raise
            # "auto": the pass may have rewritten part of the graph before it met the unsupported
            # pattern; start again from the untouched input.
            rotation_skipped = str(err)
            logger.warning("rotate=auto: not rotating (%s)", err)
            qgm = copy.deepcopy(gm)
    rotate_s = time.perf_counter() - t0
    meta = qgm.meta.setdefault("llmq_fx", {})
    meta["config"] = config.to_dict()
    timings = meta.setdefault("timings_s", {})
    if config.rotate:
        timings["rotate"] = rotate_s
        meta["rotation_skipped"] = rotation_skipped
        logger.info("stage %s: %.2f s", "rotate", rotate_s)

    w_gptq = config.gptq and config.w_bits is not None
    act_aware, input_quant = _act_aware_gptq(config, meta) if w_gptq else (None, None)
    sequential = config.runs_sequential_gptq()
    meta["gptq_sequential"] = sequential
    gptq_kwargs = dict(
        w_group_size=config.w_group_size, act_order=config.gptq_act_order, damp=config.gptq_damp,
        block_size=config.gptq_block_size, skip=config.skip, clip=config.w_clip,
    )
    if sequential:
        from llmq_fx.passes.sequential_gptq import SequentialGPTQPass

        # Calibration and GPTQ are one walk: each site is quantized on the quantized model's inputs.
        stages = [("observe", lambda: InsertObserversPass()(qgm))]
        stages.append(("gptq", lambda: SequentialGPTQPass(
            calib, config.w_bits, input_quant, act_aware, config.calib_batch_size, progress,
            clip_search=config.a_clip_search, **gptq_kwargs
        )(qgm)))
    else:
        stages = [("observe", lambda: InsertObserversPass(hessian=w_gptq, input_quant=input_quant)(qgm))]
        stages.append(("calibrate", lambda: meta.__setitem__("calib_tokens", calibrate(qgm, calib, config.calib_batch_size, progress))))
    if config.smooth_alpha is not None and config.smooth_sites:
        stages.append(("smooth", lambda: SmoothPass(config.smooth_alpha, config.smooth_sites, config.skip)(qgm)))
    if config.a_bits is not None and not config.a_dynamic:
        stages.append(("group", lambda: GroupChannelsPass(config.clusters_for, config.cluster_features, config.seed, config.kmeans_n_init)(qgm)))
    if w_gptq and not sequential:
        from llmq_fx.passes.gptq import GPTQPass

        stages.append(("gptq", lambda: GPTQPass(config.w_bits, act_aware=act_aware, **gptq_kwargs)(qgm)))
    stages.append(("quantize", lambda: InsertQDQPass(
        config.w_bits, config.a_bits, w_group_size=config.w_group_size, a_symmetric=config.a_symmetric,
        skip=config.skip, a_dynamic=config.a_dynamic, a_outlier_bits=config.a_outlier_bits,
        a_outlier_clusters=config.a_outlier_clusters, a_clip_ratio=config.a_clip_ratio, w_clip=config.w_clip,
        a_group_size=config.a_group_size,
    )(qgm)))

    bar = tqdm(stages, desc="llmq_fx", unit="stage", disable=not progress)
    for name, run in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - t0
        logger.info("stage %s: %.2f s", name, timings[name])
    return qgm


def _act_aware_gptq(config: QuantConfig, meta: dict) -> tuple[float | None, InputQuantizer | None]:
    """``(strength, quantizer)`` for activation-aware GPTQ, or ``(None, None)`` for plain GPTQ.

    Where the config asks for it but it cannot apply (``QuantConfig.act_aware_unavailable``), plain
    GPTQ runs; the reason is logged and kept in ``meta["gptq_act_aware_skipped"]``.
    """
    if config.gptq_act_aware is None:
        return None, None
    reason = config.act_aware_unavailable()
    meta["gptq_act_aware_skipped"] = reason
    if reason is not None:
        logger.warning("gptq_act_aware=%s: plain GPTQ instead, %s", config.gptq_act_aware, reason)
        return None, None
    quantizer = InputQuantizer(config.a_bits, config.a_symmetric, config.a_clip_ratio, config.a_group_size or 0)
    return float(config.gptq_act_aware), quantizer
