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
that pass. Cost: two float forwards over the calibration set instead of one, all batches' live
activations in memory at once.

With ``clip_search`` (a list of ratios), each site's activation clip ratio is chosen before its
moments are taken: the one minimizing ``sum ||(Q(X~) - X~) W^T||^2`` over the site's Linears on the
quantized model's inputs. It is recorded in the observer node's ``llmq_site`` meta
(``a_clip_ratio``) and ``InsertQDQPass`` builds that site's dynamic QDQ with it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.calibrate import calibration_batches, check_statistics
from llmq_fx.graph import attr, is_skipped, module_path
from llmq_fx.lockstep import SiteInputs, SiteResult, run_lockstep
from llmq_fx.passes.gptq import GPTQPass
from llmq_fx.passes.insert_qdq import is_integer_weight
from llmq_fx.stats import InputQuantizer

__all__ = ["SequentialGPTQPass"]


class SequentialGPTQPass(GPTQPass):
    """Calibrate and GPTQ-quantize site by site on the quantized model's inputs (see the module docstring).

    Args:
        calib: calibration token ids (``[N, T]`` LongTensor or an iterable of them).
        input_quant: the per-token dynamic activation quantizer the Linears will read through
            (its group size is an upper bound, resolved per site by ``InputQuantizer.for_site``).
        act_aware: strength in [0, 1] (1 = fit the float model's output, 0 = plain GPTQ on ``Q(X~)``).
        clip_search: candidate activation clip ratios, one chosen per site; None keeps ``input_quant``'s.
        batch_size, progress: as ``calibrate``.
        The other arguments are ``GPTQPass``'s.

    After the pass, ``gm.meta["llmq_fx"]["calib_tokens"]`` holds the number of tokens seen.
    """

    def __init__(self, calib, w_bits: int, input_quant: InputQuantizer, act_aware: float = 0.5,
                 batch_size: int = 4, progress: bool = True, clip_search: list[float] | None = None, **gptq_kwargs):
        super().__init__(w_bits, act_aware=act_aware, **gptq_kwargs)
        self.clip_search = list(clip_search or [])
        self.batches = calibration_batches(calib, batch_size)
        self.input_quant = input_quant
        self.progress = progress

    def call(self, gm: fx.GraphModule) -> PassResult:
        meta = gm.meta.setdefault("llmq_fx", {})
        records = meta.setdefault("gptq", {})
        modified = False

        def on_site(inputs: SiteInputs) -> SiteResult:
            nonlocal modified
            site = inputs.site
            for x in inputs.ref:  # channel statistics of the float model's input, as calibrate() records
                site.module(x)
            linears = [c for c in site.consumers if not is_skipped(module_path(c), self.skip)]
            raw = [c for c in site.consumers if c not in linears]
            linears = [c for c in linears if not is_integer_weight(c.args[1])]
            if not linears:
                return SiteResult(inputs.quant, raw_readers=raw)
            channels = site.module.num_channels
            quant = self.input_quant.for_site(channels)
            if self.clip_search:
                quant = self._search_clip(gm, site, linears, quant, inputs.quant)
            device = inputs.quant[0].device
            hessian = torch.zeros(channels, channels, dtype=torch.float32, device=device)
            cross = torch.zeros_like(hessian)
            outputs, tokens = [], 0
            for x_ref, x_q in zip(inputs.ref, inputs.quant):
                q = quant(x_q.reshape(-1, channels).float())
                hessian.addmm_(q.T, q)
                cross.addmm_(q.T, x_ref.reshape(-1, channels).float())
                outputs.append(q.reshape(x_q.shape).to(x_q.dtype))
                tokens += q.shape[0]
            hessian /= tokens
            cross /= tokens
            overrides = {}
            for linear in linears:
                weight = attr(gm, linear.args[1].target)
                record = self._quantize_linear(gm, linear, hessian, site.name, cross)
                records[module_path(linear)] = dict(record, sequential=True)
                overrides[linear.args[1]] = weight  # the float lane keeps the float weight
                modified = True
            return SiteResult(outputs, overrides, raw)

        run_lockstep(gm, self.batches, on_site, self.progress)
        check_statistics(gm)
        meta["calib_tokens"] = sum(b.numel() for b in self.batches)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    def _search_clip(self, gm, site, linears, quant: InputQuantizer, xs: list[torch.Tensor]) -> InputQuantizer:
        """The clip ratio among ``clip_search`` minimizing ``sum ||(Q(X~) - X~) W^T||^2`` over the site's Linears.

        The choice is kept in the observer node's ``llmq_site`` meta as ``a_clip_ratio``, where
        ``InsertQDQPass`` reads it for that site's dynamic QDQ.
        """
        weight = torch.cat([attr(gm, c.args[1].target).detach().float() for c in linears])
        errors = []
        for ratio in self.clip_search:
            candidate = dataclasses.replace(quant, clip_ratio=ratio)
            err = torch.zeros((), dtype=torch.float64, device=weight.device)
            for x in xs:
                flat = x.reshape(-1, weight.shape[1]).float()
                err += ((candidate(flat) - flat) @ weight.T).square().sum().double()
            errors.append(err)
        best = self.clip_search[int(torch.stack(errors).argmin())]
        site.observer.meta.setdefault("llmq_site", {})["a_clip_ratio"] = best
        return dataclasses.replace(quant, clip_ratio=best)
