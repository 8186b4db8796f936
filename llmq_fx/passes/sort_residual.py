"""Residual channel sorting pass: after the rotation, order the residual basis by channel range, so that
each contiguous group of a dynamic activation quantizer gathers channels of similar magnitude.

Pattern: the residual basis a ``RotatePass`` recorded (``gm.meta["llmq_fx"]["residual_basis"]``: the
embedding tables, the readers' weights after the norms, the writers' weights and biases, the norm
weights, an online rotation after post-norms) and the Linears that read the stream after a norm.

Rewrite: one permutation ``P`` of the residual channels for the whole model (the stream is shared by
every layer), folded into those tensors exactly as the rotation was (``Q -> Q P``): readers' and
embedding columns, writers' rows. The float model's output is unchanged (to float rounding); no node is
added. ``P`` sorts the channels by their largest magnitude at the readers' inputs over the first
calibration batches (each site's maxima divided by their mean, then averaged over the sites), so that,
with activations quantized in groups of ``G`` contiguous channels (RPTQ's reordering, here with the
rotation's basis), a group holds channels of similar range. Activations at other sites (attention
output, MLP down projection) are not in the residual basis and keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, is_linear, record_outputs, write_attr
from llmq_fx.passes.base import CalibratedPass
from llmq_fx.passes.rotate import residual_basis

__all__ = ["SortResidualPass", "SortResidualOptions"]


@dataclass(frozen=True)
class SortResidualOptions:
    """Options of ``SortResidualPass``: statistics from the first ``batches`` calibration batches."""

    batches: int = 2


class SortResidualPass(CalibratedPass):
    """Permute the rotated residual basis so that channels of similar range are contiguous."""

    Options = SortResidualOptions
    stage = "sort"

    @classmethod
    def from_config(cls, config) -> "SortResidualPass | None":
        if not config.sort_residual:
            return None
        if config.rotate is False:
            raise ConfigError("config key 'sort_residual' permutes the rotated residual basis: it needs 'rotate'")
        return cls(SortResidualOptions())

    def call(self, gm: fx.GraphModule) -> PassResult:
        meta = gm.meta.setdefault("llmq_fx", {})
        tensors = residual_basis(gm)
        if tensors is None:
            meta["residual_sort"] = {"sorted": False, "reason": "no rotated residual stream (rotation skipped)"}
            return PassResult(gm, False)
        readers = set(meta["residual_basis"]["readers"])
        score = self._channel_score(gm, readers)
        perm = torch.argsort(score.cpu(), stable=True)
        with torch.no_grad():
            for target, axis in tensors:  # each tensor once, also behind two names (tied weights)
                t = attr(gm, target)
                for a in (0, 1) if axis is None else (axis % t.dim(),):  # None: a map from the stream to itself
                    t = t.index_select(a, perm.to(t.device))
                write_attr(gm, target, t)
        meta["residual_sort"] = {"sorted": True, "channels": int(perm.numel()), "sites": len(readers),
                                 "range_min": float(score.min()), "range_max": float(score.max())}
        gm.recompile()
        return PassResult(gm, True)

    @torch.no_grad()
    def _channel_score(self, gm: fx.GraphModule, readers: set[str]) -> torch.Tensor:
        """Per residual channel: its largest magnitude at each reader's input, divided by that input's
        mean over channels, averaged over the inputs (each input counted once)."""
        maxima: dict[fx.Node, torch.Tensor] = {}
        inputs = {n.args[0] for n in gm.graph.nodes
                  if is_linear(n) and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"
                  and n.args[1].target in readers}

        def recorder(n: fx.Node):
            def add(out: torch.Tensor) -> None:
                m = out.abs().reshape(-1, out.shape[-1]).amax(0).float()
                maxima[n] = m if n not in maxima else torch.maximum(maxima[n], m)
            return add

        record_outputs(gm, self._require_batches()[: self.options.batches], {n: recorder(n) for n in inputs})
        if not maxima:
            raise ConfigError("sort_residual: no calibration batch reached the residual readers")
        return torch.stack([m / m.mean().clamp_min(1e-30) for m in maxima.values()]).mean(0)

