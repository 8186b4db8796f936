"""GPTQ weight pass (Frantar et al. 2023): integer weights with error compensation from calibration.

Pattern: every observer site's non-skipped Linear consumers whose weight is still a float
``get_attr``. The site's observer (inserted with ``InsertObserversPass(hessian=True)``) holds the
Hessian ``X^T X / N`` of the consumers' shared input over all calibration tokens; q/k/v share one.
Smoothing divides that input by ``s`` and multiplies the weight columns by ``s``; the observer
applies the same ``s`` to its Hessian (``diag(1/s) H diag(1/s)``), so after ``SmoothPass`` both
sides describe the smoothed layer and this pass must run after it, on the weights as they are in
the graph then.

Rewrite: per Linear, ``qmath.gptq_quantize_weight`` rounds the weight column by column, moving
each column's rounding error onto the columns not yet rounded so that ``||X W^T - X Wq^T||`` stays
small (round-to-nearest only minimizes ``||W - Wq||``). The float weight is then replaced by the
same nodes ``InsertQDQPass`` builds for round-to-nearest (``insert_weight_dequant``): an int8
buffer ``{path}.weight_int``, a buffer ``{path}.weight_scale`` and
``llmq.dequantize_weight(q, scale, bits)``. ``InsertQDQPass`` then sees an integer weight, leaves it
alone and only quantizes the activations and drops the unused float weight; the exporter needs
nothing new.

The Hessians come from the float model (inputs of the unquantized upstream layers): one
calibration pass serves every stage of the pipeline. ``SequentialGPTQPass`` is the variant that
rounds each site on the already-quantized model's inputs.

Activation-aware (``act_aware`` = strength in [0, 1]): at W4A4 the Linear reads ``Q(X)``, not ``X``.
With per-token dynamic activations ``Q`` needs no statistics, so the observers (inserted with an
``input_quant``) apply it during calibration and record ``Hq = Q(X)^T Q(X)`` and ``C = Q(X)^T X``.
This pass then rounds ``V = W + strength * (W C^T Hq^-1 - W)`` with Hessian ``Hq``
(``qmath.input_aware_weight``): the minimizer of ``strength * ||X W^T - Q(X) Wq^T||^2 +
(1 - strength) * ||Q(X) W^T - Q(X) Wq^T||^2``, the true output error once activations are quantized
blended with the plain GPTQ objective on the quantized inputs. Strength 0 is GPTQ on ``Q(X)``.

After a site's Linears are quantized its observer's [C, C] moment buffers are released
(``ActivationObserver.release_moments``); its channel statistics stay for ``InsertQDQPass``.

``gm.meta["llmq_fx"]["gptq"][path]`` records, per Linear, the relative output-error proxy
``tr((W - Wq) H (W - Wq)^T) / tr(W H W^T)`` of round-to-nearest and of GPTQ (round-to-nearest at
the scales GPTQ used), so the gain is visible per layer. Activation-aware, ``W`` there is the target ``V``
and ``H`` is ``Hq``; ``target_shift`` is the same measure between ``W`` and ``V``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx import qmath
from llmq_fx.errors import ConfigError, StatisticsError, UnsupportedModelError
from llmq_fx.graph import is_skipped, module_path, observer_sites, read_attr
from llmq_fx.passes.base import LlmqPass
from llmq_fx.passes.insert_qdq import insert_weight_dequant, is_integer_weight
from llmq_fx.spec import WeightSpec

__all__ = ["GPTQPass", "GPTQOptions", "output_error"]

logger = logging.getLogger(__name__)

def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T)``: the relative layer output error on the calibration inputs."""
    w = weight.detach().to(torch.float32)
    d = w - weight_hat.to(w)
    h = hessian.to(w)
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(torch.finfo(torch.float32).tiny))


@dataclass(frozen=True)
class GPTQOptions:
    """Options of ``GPTQPass``.

    Attributes:
        weight: the weight scheme (bits, per-channel or grouped scales, clipping search of the scales).
        act_order: visit columns by descending Hessian diagonal (group scales then static).
        damp: fraction of the mean Hessian diagonal added to the diagonal.
        block_size: columns per lazy batch update.
        act_aware: None for plain GPTQ on ``X^T X``; a strength in [0, 1] to compensate the
            activation quantization the observers applied (observers inserted with ``input_quant``).
        skip: module-path patterns of Linears left in float.
    """

    weight: WeightSpec = field(default_factory=WeightSpec)
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_aware: float | None = None
    skip: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.act_aware is not None and not 0.0 <= self.act_aware <= 1.0:
            raise ConfigError(f"config key 'gptq_act_aware' must be in [0, 1] or null, got {self.act_aware!r}")

    @staticmethod
    def config_fields(config) -> dict:
        """The fields every GPTQ variant takes from a ``QuantConfig``."""
        return dict(weight=config.weight_spec(), act_order=config.gptq_act_order, damp=config.gptq_damp,
                    block_size=config.gptq_block_size, skip=tuple(config.skip))


class GPTQPass(LlmqPass):
    """Quantize every non-skipped Linear weight with GPTQ, using the Hessian its input observer recorded.

    Example:
        >>> InsertObserversPass(hessian=True)(gm); CalibratePass().with_calibration(batches)(gm)
        >>> GPTQPass(weight=WeightSpec(4, group_size=128))(gm)
        >>> InsertQDQPass(weight=WeightSpec(4, group_size=128), activation=ActivationSpec(4, dynamic=False))(gm)
        >>> gm.meta["llmq_fx"]["gptq"]["model.decoder.layers.0.fc1"]["gptq_error"]
    """

    Options = GPTQOptions
    stage = "gptq"

    @classmethod
    def from_config(cls, config) -> "GPTQPass | None":
        if not config.gptq or config.w_bits is None or config.runs_sequential_gptq():
            return None
        act_aware = config.gptq_act_aware if config.act_aware_unavailable() is None else None
        return cls(GPTQOptions(act_aware=None if act_aware is None else float(act_aware), **GPTQOptions.config_fields(config)))

    def call(self, gm: fx.GraphModule) -> PassResult:
        records = gm.meta.setdefault("llmq_fx", {}).setdefault("gptq", {})
        modified = False
        for site in observer_sites(gm):
            linears = [c for c in site.consumers if not is_skipped(module_path(c), self.options.skip)]
            linears = [c for c in linears if not is_integer_weight(c.args[1])]  # already integer
            if not linears:
                continue
            hessian = self._site_hessian(site)
            cross = self._site_cross(site) if self.options.act_aware is not None else None
            factor = self._site_factor(hessian, site.name)  # once for the site's Linears
            for linear in linears:
                records[module_path(linear)] = self._quantize_linear(gm, linear, hessian, site.name, cross, factor)
                modified = True
            del hessian, cross, factor
            site.module.release_moments()  # consumed; the next sites need the memory (opt-6.7b: ~77 GB in all)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    def _site_factor(self, hessian: torch.Tensor, site_name: str) -> qmath.HessianFactor:
        """The damped Hessian's float64 factor (``qmath.hessian_factor``), shared by the act-aware solve and
        GPTQ's rounding of every Linear reading the site."""
        try:
            return qmath.hessian_factor(hessian, self.options.damp, self.options.act_order)
        except StatisticsError as err:
            raise StatisticsError(f"input site {site_name}: {err}") from err

    def _site_hessian(self, site) -> torch.Tensor:
        if not site.module.track_hessian:
            raise StatisticsError(
                f"observer node {site.observer.name} ({site.name}) recorded no Hessian: GPTQ needs observers "
                "inserted with InsertObserversPass(hessian=True) before calibration"
            )
        try:
            return site.module.hessian_matrix()
        except StatisticsError as err:
            raise StatisticsError(f"observer node {site.observer.name} ({site.name}): {err}") from err

    def _site_cross(self, site) -> torch.Tensor:
        if site.module.input_quant is None:
            raise StatisticsError(
                f"observer node {site.observer.name} ({site.name}) did not quantize its input during calibration: "
                "activation-aware GPTQ needs observers inserted with InsertObserversPass(input_quant=...)"
            )
        return site.module.cross_matrix()

    def _quantize_linear(self, gm: fx.GraphModule, linear: fx.Node, hessian: torch.Tensor, site_name: str,
                         cross: torch.Tensor | None = None, factor: qmath.HessianFactor | None = None) -> dict:
        path = module_path(linear)
        w_node = linear.args[1]
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            raise UnsupportedModelError(f"GPTQ: the weight of {path} is computed in the graph, not a parameter")
        weight = read_attr(gm, w_node.target)  # float32 where the passes compute; codes stored with the graph
        opts, spec = self.options, self.options.weight.for_features(weight.shape[1])
        t0 = time.perf_counter()
        original = weight
        if cross is not None:
            weight = qmath.input_aware_weight(weight, hessian, cross, opts.act_aware, opts.damp, factor)
        try:
            qweight, scale = qmath.gptq_quantize_weight(
                weight, hessian, spec.bits, spec.group_size, opts.act_order, opts.damp, opts.block_size, spec.clip, factor
            )
        except StatisticsError as err:
            raise StatisticsError(f"{path} (input site {site_name}): {err}") from err
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            # Round-to-nearest at GPTQ's own scales: the same scales a clipping search would find for the
            # weight (per channel, static groups), without running that search again only to record it.
            rtn = qmath.dequantize_weight(qmath.round_to_scale(weight, scale, spec.bits), scale)
            record = {
                "site": site_name,
                "rtn_error": output_error(weight, rtn, hessian),
                "gptq_error": output_error(weight, qmath.dequantize_weight(qweight, scale), hessian),
                "w_bits": spec.bits,
                "w_group_size": spec.group_size,
                "act_order": opts.act_order,
                "damp": opts.damp,
                "clip": spec.clip,
                "act_aware": opts.act_aware,
                "seconds": seconds,
            }
            if cross is not None:
                record["target_shift"] = output_error(original, weight, hessian)
        insert_weight_dequant(gm, linear, path, qweight, scale, spec.bits)
        logger.info("gptq %s: relative output error %.4g (round-to-nearest %.4g)",
                    path, record["gptq_error"], record["rtn_error"])
        return record
