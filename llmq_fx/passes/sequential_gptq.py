"""Sequential activation-aware GPTQ: each site's weights are rounded on the inputs of the quantized model.

Pattern: the same as ``GPTQPass`` (every observer site's non-skipped Linear consumers whose weight
is still a float ``get_attr``), visited in graph order, on a graph that carries observers (from
``InsertObserversPass``, no moments needed) and per-token dynamic activations (``input_quant``).

``GPTQPass`` rounds every Linear against the float model's inputs. Downstream of the first
quantized layer the deployed model never sees those: its inputs carry every upstream layer's
weight and activation error. This pass calibrates and quantizes in one walk
(``lockstep.run_lockstep``): the float model and the model quantized so far run side by side over
all calibration batches, and at each site, with ``X`` the float model's input and ``X~`` the
quantized model's input there, it accumulates ``Hq = Q(X~)^T Q(X~)`` and ``C = Q(X~)^T X`` and
rounds ``V = W + s (W C^T Hq^-1 - W)`` with Hessian ``Hq`` (``qmath.input_aware_weight``). ``V``
minimizes ``s ||X W^T - Q(X~) Wq^T||^2 + (1 - s) ||Q(X~) W^T - Q(X~) Wq^T||^2``: at strength 1 the
quantized layer, fed what the quantized model feeds it, is fitted to the *float model's* output
there, so each layer also absorbs the error that reaches it from upstream (GPTAQ, Li et al. 2025,
with the layer's own activation quantizer in ``Q``). The observers still record their channel
statistics, of the float model's inputs, as ``calibrate`` would.

Rewrite: as ``GPTQPass`` (``llmq.dequantize_weight`` of integer codes per Linear, records in
``gm.meta["llmq_fx"]["gptq"]``, with ``sequential: True``). The quantized lane then reads the
site's activations through ``input_quant`` and the new integer weights, as the deployed graph will
once ``InsertQDQPass`` has turned the observer into the same dynamic QDQ; the observers stay for
that pass. Cost: two float forwards over the calibration set instead of one (two lanes), and every
batch's state at the last site passed kept in memory; where a site's states exceed ``cache_gib``,
its inputs are recomputed from the previous site on each pass instead (``lockstep``).

With ``clip_search`` (a list of ratios), each site's activation clip ratio is chosen before its
moments are taken: the one minimizing ``sum ||(Q(X~) - X~) W^T||^2`` over the site's Linears on the
quantized model's inputs. The site's scheme with that ratio is recorded in its ``SiteRecord``
(``activation``) and ``InsertQDQPass`` builds that site's dynamic QDQ from it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx import qmath
from llmq_fx.calibrate import check_statistics
from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, compute_device, is_skipped, module_path, read_attr, traced_dtype
from llmq_fx.lockstep import SiteInputs, SiteResult, run_lockstep
from llmq_fx.passes.base import CalibratedPass
from llmq_fx.passes.gptq import GPTQOptions, GPTQPass
from llmq_fx.passes.insert_qdq import is_integer_weight
from llmq_fx.spec import ActivationSpec

__all__ = ["SequentialGPTQPass", "SequentialGPTQOptions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequentialGPTQOptions(GPTQOptions):
    """Options of ``SequentialGPTQPass``: ``GPTQOptions`` (``act_aware`` the strength in [0, 1]: 1 fits
    the float model's output, 0 is plain GPTQ on ``Q(X~)``) and

    Attributes:
        activation: the dynamic activation scheme the Linears will read through (its group size an
            upper bound, resolved per site by ``ActivationSpec.for_site``).
        clip_search: candidate activation clip ratios, one chosen per site; None keeps ``activation``'s.
        clip_search_tokens: the search sums its errors over the first batches holding at least this
            many tokens (every batch still passes the observers); None: over all batches.
        calib_dtype: the floating dtype of the walk's two lanes ("float32" or "bfloat16");
            the moments are taken and GPTQ computes in float32 either way.
        cache_gib: the most GiB of activations the walk keeps across batches (``run_lockstep``'s
            budget); None: no cap on the CPU, a fifth of the device's memory on CUDA.
    """

    act_aware: float | None = 0.5
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    clip_search: tuple[float, ...] | None = None
    clip_search_tokens: int | None = None
    calib_dtype: str = "float32"
    cache_gib: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.act_aware is None:
            raise ConfigError("sequential GPTQ is activation-aware: 'gptq_act_aware' must be a strength in [0, 1]")
        if not self.activation.dynamic:
            raise ConfigError("sequential GPTQ needs dynamic activations (a_dynamic: true)")


class SequentialGPTQPass(CalibratedPass, GPTQPass):
    """Calibrate and GPTQ-quantize site by site on the quantized model's inputs (see the module docstring).

    Runs on the calibration batches bound by ``with_calibration`` (``quantize()`` binds them). After
    the pass, ``gm.meta["llmq_fx"]["calib_tokens"]`` holds the number of tokens seen.
    """

    Options = SequentialGPTQOptions
    stage = "gptq"

    @classmethod
    def from_config(cls, config) -> "SequentialGPTQPass | None":
        if not config.runs_sequential_gptq():
            return None
        clip = tuple(float(r) for r in config.a_clip_search) if config.a_clip_search else None
        return cls(SequentialGPTQOptions(
            act_aware=float(config.gptq_act_aware), activation=config.activation_spec(), clip_search=clip,
            clip_search_tokens=config.a_clip_search_tokens,
            calib_dtype=config.calib_dtype, cache_gib=config.calib_cache_gib,
            **GPTQOptions.config_fields(config),
        ))

    def call(self, gm: fx.GraphModule) -> PassResult:
        meta = gm.meta.setdefault("llmq_fx", {})
        records = meta.setdefault("gptq", {})
        modified = False

        clock = _PhaseClock(compute_device(gm))

        def on_site(inputs: SiteInputs) -> SiteResult:
            nonlocal modified
            site = inputs.site
            linears = [c for c in site.consumers if not is_skipped(module_path(c), self.options.skip)]
            raw = [c for c in site.consumers if c not in linears]
            linears = [c for c in linears if not is_integer_weight(c.args[1])]

            def observed():  # the inputs per batch; the float lane's channel statistics, as calibrate() records
                for x_ref, x_q in inputs:
                    site.module(x_ref.to(site.module.mean.device))  # a batch walked on another GPU
                    yield x_ref, x_q

            if not linears:
                for _ in observed():
                    pass
                return SiteResult(None, raw_readers=raw)
            channels = site.module.num_channels
            quant = self.options.activation.for_site(channels)
            pairs = observed()
            if self.options.clip_search:  # one pass over the inputs to choose the ratio, a second for the moments
                with clock("clip_search"):
                    quant = self._search_clip(gm, linears, quant, (x_q for _, x_q in pairs))
                site.record.activation = quant
                pairs = iter(inputs)
            device = compute_device(gm)
            precision = _moments_precision(device)
            with clock("moments"):
                hessian, cross = _moments(pairs, quant, channels, device, precision)
            with clock("factor"):
                # Factored once for the site's Linears (the act-aware solve and GPTQ's inverse factor).
                factor = qmath.damped_hessian_factor(hessian, self.options.damp, self.options.act_order)
            if precision == "tf32" and factor is None:
                # TF32's rounding left the damped Hessian short of positive definite: float32, one more pass.
                logger.info("%s: TF32 Hessian not positive definite at dampening %g; recomputed in float32",
                            site.name, self.options.damp)
                precision = "float32"
                with clock("moments"):
                    hessian, cross = _moments(iter(inputs), quant, channels, device, precision)
            if factor is None:  # float32 moments: more dampening where rounding needs it, or a clear error
                with clock("factor"):
                    factor = self._site_factor(hessian, site.name)
            overrides = {}
            for linear in linears:
                weight = attr(gm, linear.args[1].target)
                weight = weight.to(traced_dtype(linear.args[1]) or weight.dtype)  # as the float lane computes
                with clock("round"):
                    record = self._quantize_linear(gm, linear, hessian, site.name, cross, factor)
                records[module_path(linear)] = dict(record, sequential=True, moments=precision)
                overrides[linear.args[1]] = weight  # the float lane keeps the float weight
                modified = True
            return SiteResult(functools.partial(_quantized, quant, channels), overrides, raw)

        batches = self._require_batches()
        walk = run_lockstep(gm, batches, on_site, self.progress, dtype=getattr(torch, self.options.calib_dtype),
                            budget=self._budget(compute_device(gm)))
        check_statistics(gm)
        meta["calib_tokens"] = sum(b.numel() for b in batches)
        meta["lockstep"] = dict(walk, device=str(compute_device(gm)), dtype=self.options.calib_dtype,
                                site_seconds=clock.seconds())
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    def _budget(self, device: torch.device) -> int | None:
        """Bytes of activations the walk may keep across batches."""
        if self.options.cache_gib is not None:
            return int(self.options.cache_gib * 2**30)
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory // 5
        return None

    def _search_clip(self, gm, linears, quant: ActivationSpec, xs: Iterable[torch.Tensor]) -> ActivationSpec:
        """``quant`` with the clip ratio among ``clip_search`` minimizing ``sum ||(Q(X~) - X~) W^T||^2``
        over the site's Linears (``qmath.activation_error``; ``xs`` read once)."""
        weight = torch.cat([read_attr(gm, c.args[1].target) for c in linears])
        candidates = [dataclasses.replace(quant, clip_ratio=r) for r in self.options.clip_search]
        errors = qmath.activation_error(weight, _first_tokens(xs, self.options.clip_search_tokens), candidates)
        return candidates[int(torch.stack(errors).argmin())]


def _first_tokens(xs: Iterable[torch.Tensor], tokens: int | None) -> Iterable[torch.Tensor]:
    """The batches of ``xs`` up to the first one that brings the count of tokens (rows of ``[..., C]``)
    to ``tokens``; the rest are still drawn from ``xs`` (the walk and the observers advance), not yielded."""
    seen = 0
    for x in xs:
        if tokens is None or seen < tokens:
            yield x
        seen += x.numel() // x.shape[-1]


class _PhaseClock:
    """Seconds spent per phase of the sites' own work (``clip_search``, ``moments``, ``factor``, ``round``),
    summed over the sites; the walk's two lanes are the rest of the stage. On CUDA the phases are timed
    with events on the compute device's stream, read once at the end, so timing adds no waits."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.spans: list[tuple[str, object, object]] = []
        self.host: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        if not self.cuda:
            t0 = time.perf_counter()
            yield
            self.host[phase] += time.perf_counter() - t0
            return
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record(torch.cuda.current_stream(self.device))
        yield
        end.record(torch.cuda.current_stream(self.device))
        self.spans.append((phase, start, end))

    def seconds(self) -> dict[str, float]:
        out = defaultdict(float, self.host)
        if self.spans:
            torch.cuda.synchronize(self.device)
        for phase, start, end in self.spans:
            out[phase] += start.elapsed_time(end) / 1000
        return {k: round(v, 3) for k, v in out.items()}


def _moments_precision(device: torch.device) -> str:
    """The Gram's precision: TF32 where the walk's products are TF32 (CUDA, ``calib_precision: "tf32"``),
    checked by ``qmath.damped_hessian_factor``; float32 otherwise."""
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "float32"


def _moments(pairs, quant: ActivationSpec, channels: int, device: torch.device,
             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``Hq = Q(X~)^T Q(X~)`` and ``C = Q(X~)^T X`` over the ``(X, X~)`` batches of ``pairs``
    (``qmath.add_moments_``, the Gram in ``precision``), on ``device``. Batches on other devices (a walk
    spread over GPUs) are accumulated where they are and the sums added on ``device``."""
    sums: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    tokens = 0
    for x_ref, x_q in pairs:
        if x_q.device not in sums:
            h = torch.zeros(channels, channels, dtype=torch.float32, device=x_q.device)
            sums[x_q.device] = h, torch.zeros_like(h)
        q = quant(x_q.reshape(-1, channels).float())
        qmath.add_moments_(*sums[x_q.device], q, x_ref.reshape(-1, channels).float(), precision)
        tokens += q.shape[0]
    if device in sums:
        hessian, cross = sums.pop(device)
    else:  # every batch was walked on another device
        hessian, cross = torch.zeros(channels, channels, device=device), torch.zeros(channels, channels, device=device)
    for h, c in sums.values():  # batches walked on other devices
        hessian += h.to(device)
        cross += c.to(device)
    hessian /= tokens
    cross /= tokens
    return hessian, cross


def _quantized(quant: ActivationSpec, channels: int, x: torch.Tensor) -> torch.Tensor:
    """The quantized lane's value after a visited site: its activation QDQ, in the lane's dtype."""
    return quant(x.reshape(-1, channels).float()).reshape(x.shape).to(x.dtype)
