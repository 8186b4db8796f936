"""Quantization pass: observers become quantize-dequantize (QDQ) nodes, weights become integers.

Pattern: every observer site (observer node -> Linear consumers) after grouping.

Rewrite:
* activations -- the observer node is replaced by ``llmq.quantize_dequantize(x, scale, zero_point,
  qmin, qmax)`` whose per-channel ``scale``/``zero_point`` buffers hold one value per cluster,
  computed from the cluster's min/max (``qmath.minmax_scale_zero_point``). Skipped consumers read
  the raw producer; with ``a_bits=None`` the observer is simply removed.
* weights -- each non-skipped consumer's float weight is replaced by an int8 buffer ``weight_int``
  (values in the ``w_bits`` range) and a ``scale`` buffer on the Linear's module path, read through
  ``llmq.dequantize_weight``; the exporter turns that into an INT4 initializer + DequantizeLinear.
  The float weight attribute is deleted when nothing else uses it.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx import qmath
from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, is_skipped, module_path, observer_sites, set_attr

__all__ = ["InsertQDQPass", "cluster_ranges"]

logger = logging.getLogger(__name__)


def cluster_ranges(xmin: torch.Tensor, xmax: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) where every channel gets its cluster's min over members and max over members."""
    k = int(labels.max()) + 1
    cmin = torch.full((k,), float("inf"), dtype=xmin.dtype, device=xmin.device).scatter_reduce(0, labels, xmin, "amin")
    cmax = torch.full((k,), float("-inf"), dtype=xmax.dtype, device=xmax.device).scatter_reduce(0, labels, xmax, "amax")
    return cmin[labels], cmax[labels]


class InsertQDQPass(PassBase):
    """Replace observers by activation QDQ nodes and float weights by integer weights + dequantize."""

    def __init__(self, w_bits: int | None, a_bits: int | None, w_group_size: int | None = None,
                 a_symmetric: bool = False, skip: list[str] | None = None):
        super().__init__()
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.w_group_size = w_group_size
        self.a_symmetric = a_symmetric
        self.skip = list(skip or [])

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        linears = gm.meta.setdefault("llmq_fx", {}).setdefault("linears", {})
        site_stats = gm.meta["llmq_fx"].setdefault("site_stats", {})
        for site in observer_sites(gm):
            site_stats[site.name] = _site_record(site)
            obs, x = site.observer, site.producer
            quantized = [c for c in site.consumers if not is_skipped(module_path(c), self.skip)]
            qdq = None
            if self.a_bits is not None and quantized:
                qdq = self._activation_qdq(gm, site)
            for c in site.consumers:
                c.replace_input_with(obs, qdq if (qdq is not None and c in quantized) else x)
            for u in list(obs.users):  # non-Linear users (none from our pass) read the raw value
                u.replace_input_with(obs, x)
            meta = obs.meta.get("llmq_site", {})
            graph.erase_node(obs)
            delattr(gm, obs.target)
            for c in site.consumers:
                path = module_path(c)
                is_q = c in quantized
                w_bits = self.w_bits if is_q else None
                if w_bits is not None:
                    self._weight_dequant(gm, c, path)
                linears[path] = {
                    "site": site.name,
                    "role": site.role,
                    "w_bits": w_bits,
                    "w_group_size": self.w_group_size if w_bits is not None else None,
                    "a_bits": self.a_bits if (is_q and qdq is not None) else None,
                    "clusters": meta.get("clusters") if (is_q and qdq is not None) else None,
                    "smoothed": bool(meta.get("smoothed", False)),
                }
        graph.eliminate_dead_code()
        _delete_unused_attributes(gm)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _activation_qdq(self, gm: fx.GraphModule, site) -> fx.Node:
        st = site.module.stats()
        labels = getattr(site.module, "labels", torch.zeros(st.num_channels, dtype=torch.long, device=st.min.device))
        cmin, cmax = cluster_ranges(st.min, st.max, labels)
        scale, zero_point = qmath.minmax_scale_zero_point(cmin, cmax, self.a_bits, self.a_symmetric)
        qmin, qmax = qmath.integer_range(self.a_bits, self.a_symmetric)
        base = site.observer.target.replace("llmq_observer_", "llmq_act_")
        set_attr(gm, f"{base}_scale", scale)
        set_attr(gm, f"{base}_zero_point", zero_point)
        set_attr(gm, f"{base}_permutation", getattr(site.module, "permutation", torch.arange(st.num_channels)))
        graph = gm.graph
        with graph.inserting_after(site.observer):
            s_node = graph.get_attr(f"{base}_scale")
        with graph.inserting_after(s_node):
            z_node = graph.get_attr(f"{base}_zero_point")
        with graph.inserting_after(z_node):
            qdq = graph.call_function(
                torch.ops.llmq.quantize_dequantize.default, (site.producer, s_node, z_node, qmin, qmax)
            )
        qdq.meta["llmq_site"] = dict(site.observer.meta.get("llmq_site", {}), a_bits=self.a_bits)
        for key in ("val", "nn_module_stack"):
            if key in site.producer.meta:
                qdq.meta[key] = site.producer.meta[key]
        return qdq

    def _weight_dequant(self, gm: fx.GraphModule, linear: fx.Node, path: str) -> None:
        w_node = linear.args[1]
        weight = attr(gm, w_node.target)
        if self.w_group_size is not None and weight.shape[1] % self.w_group_size:
            raise ConfigError(
                f"config key 'w_group_size'={self.w_group_size} does not divide in_features={weight.shape[1]} of {path}"
            )
        qweight, scale = qmath.quantize_weight(weight, self.w_bits, self.w_group_size)
        set_attr(gm, f"{path}.weight_int", qweight)
        set_attr(gm, f"{path}.weight_scale", scale)
        graph = gm.graph
        with graph.inserting_before(linear):
            q_node = graph.get_attr(f"{path}.weight_int")
            s_node = graph.get_attr(f"{path}.weight_scale")
            deq = graph.call_function(torch.ops.llmq.dequantize_weight.default, (q_node, s_node, self.w_bits))
        deq.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
        linear.replace_input_with(w_node, deq)


def _site_record(site) -> dict[str, torch.Tensor]:
    """Per-channel statistics kept after the observer is gone (for reports and plots), on the CPU."""
    st = site.module.stats()
    rec = {"min": st.min, "max": st.max, "std": st.std, "smoothing_scale": site.module.smoothing_scale}
    if hasattr(site.module, "labels"):
        rec["labels"] = site.module.labels
    return {k: v.detach().cpu() for k, v in rec.items()}


def _delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop float weights no get_attr node reads any more, so the model does not carry both copies."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name not in used and name.endswith(".weight") and hasattr(gm.get_submodule(name.rpartition(".")[0]), "weight_int"):
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)
