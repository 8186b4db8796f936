"""Quantization pass: observers become quantize-dequantize (QDQ) nodes, weights become integers.

Pattern: every observer site (observer node -> Linear consumers) after grouping.

Rewrite:
* activations -- the observer node is replaced by ``llmq.quantize_dequantize(x, scale, zero_point,
  qmin, qmax)`` whose per-channel ``scale``/``zero_point`` buffers hold one value per cluster,
  computed from the cluster's min/max (``qmath.minmax_scale_zero_point``). Skipped consumers read
  the raw producer; with ``a_bits=None`` the observer is simply removed. With ``a_dynamic`` it is
  ``llmq.quantize_dequantize_dynamic(x, bits, symmetric, clip_ratio, group_size)`` instead: ranges
  computed at run time per token, or per ``a_group_size`` channels of a token at sites wider than
  that which it divides (``qmath.activation_group``; a site it does not divide stays per token,
  with a warning).
  ``a_clip_ratio`` < 1 shrinks every range (static cluster or dynamic token) by that factor; a
  dynamic site whose observer meta carries its own ``a_clip_ratio`` (chosen by
  ``SequentialGPTQPass``'s clip search) uses that one.
* mixed precision (``a_outlier_bits``) -- the ``a_outlier_clusters`` clusters of widest calibrated
  range (``max - min`` over the cluster's channels) are quantized at ``a_outlier_bits``, the rest at
  ``a_bits``. The channels are *split*, not quantized twice and selected::

      x_lo = index_select(x, -1, channels)          -> quantize_dequantize(a_bits)
      x_hi = index_select(x, -1, outlier_channels)  -> quantize_dequantize(a_outlier_bits)
      x_hat = index_select(cat([x_lo, x_hi], -1), -1, restore)

  so every channel has exactly one integer code, of its own width: the ONNX file holds a UINT4
  (INT4) QuantizeLinear over the ``a_bits`` channels and a UINT8 (INT8) one over the outliers
  (Gather / Concat around them), and the effective bits are what the codes really take.
  At least one cluster always stays at ``a_bits`` (``a_outlier_clusters`` is capped at clusters - 1):
  with one cluster (per-tensor) there is nothing to pick and the site stays at ``a_bits``.
  Each quantized Linear's record in ``gm.meta["llmq_fx"]["linears"]`` gets ``a_effective_bits``
  (code bits averaged over its input channels; scales and zero points not counted) and
  ``gm.meta["llmq_fx"]["a_effective_bits"]`` is the model's mean weighted by each Linear's MACs per
  token (``in_features * out_features``), so q/k/v count three times for their shared input.
* weights -- each non-skipped consumer's float weight is replaced by an int8 buffer ``weight_int``
  (values in the ``w_bits`` range) and a ``scale`` buffer on the Linear's module path, read through
  ``llmq.dequantize_weight``; the exporter turns that into an INT4 initializer + DequantizeLinear.
  ``w_clip`` searches each row's (group's) clipping ratio (``qmath.weight_scale``). The float weight
  attribute is deleted when nothing else uses it.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx import qmath
from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, is_skipped, linear_nodes, module_path, observer_sites, set_attr

__all__ = ["InsertQDQPass", "cluster_ranges", "insert_weight_dequant", "is_integer_weight"]

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
                 a_symmetric: bool = False, skip: list[str] | None = None, a_dynamic: bool = False,
                 a_outlier_bits: int | None = None, a_outlier_clusters: int = 1, a_clip_ratio: float = 1.0,
                 w_clip: bool = False, a_group_size: int | None = None):
        super().__init__()
        self.a_group_size = a_group_size
        self.a_clip_ratio = float(a_clip_ratio)
        self.w_clip = w_clip
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.w_group_size = w_group_size
        self.a_symmetric = a_symmetric
        self.skip = list(skip or [])
        self.a_dynamic = a_dynamic
        self.a_outlier_bits = a_outlier_bits
        self.a_outlier_clusters = a_outlier_clusters
        if a_dynamic and a_outlier_bits is not None:
            raise ConfigError(
                "'a_outlier_bits' needs static per-cluster activations; it cannot be used with 'a_dynamic'"
            )

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
                qdq = self._dynamic_qdq(gm, site) if self.a_dynamic else self._activation_qdq(gm, site)
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
                    "clusters": (
                        (_dynamic_label(qdq) if self.a_dynamic else meta.get("clusters")) if (is_q and qdq is not None) else None
                    ),
                    "a_effective_bits": (
                        qdq.meta["llmq_site"]["a_effective_bits"] if (is_q and qdq is not None) else None
                    ),
                    "smoothed": bool(meta.get("smoothed", False)),
                }
        gm.meta["llmq_fx"]["a_effective_bits"] = _mean_effective_bits(gm, linears)
        graph.eliminate_dead_code()
        _delete_unused_attributes(gm)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _activation_qdq(self, gm: fx.GraphModule, site) -> fx.Node:
        st = site.module.stats()
        labels = getattr(site.module, "labels", torch.zeros(st.num_channels, dtype=torch.long, device=st.min.device))
        cmin, cmax = cluster_ranges(st.min, st.max, labels)
        if self.a_clip_ratio != 1.0:
            cmin, cmax = cmin * self.a_clip_ratio, cmax * self.a_clip_ratio
        base = site.observer.target.replace("llmq_observer_", "llmq_act_")
        set_attr(gm, f"{base}_permutation", getattr(site.module, "permutation", torch.arange(st.num_channels)))
        outlier = self._outlier_mask(cmin, cmax, labels)
        site_meta = dict(site.observer.meta.get("llmq_site", {}), a_bits=self.a_bits)
        graph = gm.graph
        # Before the observer's successor: nodes land in creation order (the observer is erased later).
        with graph.inserting_before(site.observer.next):
            if not bool(outlier.any()):
                qdq = self._cluster_qdq(gm, site.producer, base, cmin, cmax, self.a_bits)
                effective = float(self.a_bits)
            else:
                low = torch.nonzero(~outlier).flatten()
                high = torch.nonzero(outlier).flatten()
                set_attr(gm, f"{base}_channels", low)
                set_attr(gm, f"{base}_outlier_channels", high)
                set_attr(gm, f"{base}_restore", torch.argsort(torch.cat([low, high])))
                parts = []
                for name, index, idx, bits in (
                    (base, f"{base}_channels", low, self.a_bits),
                    (f"{base}_outlier", f"{base}_outlier_channels", high, self.a_outlier_bits),
                ):
                    channels = graph.call_function(
                        torch.ops.aten.index_select.default, (site.producer, -1, graph.get_attr(index))
                    )
                    part = self._cluster_qdq(gm, channels, name, cmin[idx], cmax[idx], bits)
                    part.meta["llmq_site"] = dict(site_meta, a_bits=bits)
                    if "nn_module_stack" in site.producer.meta:
                        part.meta["nn_module_stack"] = site.producer.meta["nn_module_stack"]
                    parts.append(part)
                joined = graph.call_function(torch.ops.aten.cat.default, (parts, -1))
                restore = graph.get_attr(f"{base}_restore")
                qdq = graph.call_function(torch.ops.aten.index_select.default, (joined, -1, restore))
                effective = (len(low) * self.a_bits + len(high) * self.a_outlier_bits) / st.num_channels
                site_meta.update(a_outlier_bits=self.a_outlier_bits, a_outlier_channels=len(high))
        qdq.meta["llmq_site"] = dict(site_meta, a_effective_bits=effective)
        for key in ("val", "nn_module_stack"):
            if key in site.producer.meta:
                qdq.meta[key] = site.producer.meta[key]
        return qdq

    def _outlier_mask(self, cmin: torch.Tensor, cmax: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bool per channel: member of one of the ``a_outlier_clusters`` clusters of widest range.

        At most clusters - 1 are picked, so a site is never promoted whole; ties go to the lower
        label (the narrower magnitude, GroupChannelsPass numbers clusters by magnitude).
        """
        present = torch.unique(labels)
        n_outliers = 0 if self.a_outlier_bits is None else min(self.a_outlier_clusters, len(present) - 1)
        if n_outliers == 0:
            return torch.zeros_like(labels, dtype=torch.bool)
        # Channels of a cluster share cmin/cmax; read one member's width per cluster.
        first = torch.stack([torch.nonzero(labels == c)[0, 0] for c in present])
        width = (cmax - cmin)[first]
        widest = present[torch.argsort(width, descending=True, stable=True)[:n_outliers]]
        return torch.isin(labels, widest)

    def _cluster_qdq(
        self, gm: fx.GraphModule, x: fx.Node, name: str, cmin: torch.Tensor, cmax: torch.Tensor, bits: int
    ) -> fx.Node:
        """A ``bits``-bit ``quantize_dequantize`` of ``x`` reading buffers ``<name>_scale``/``<name>_zero_point``."""
        scale, zero_point = qmath.minmax_scale_zero_point(cmin, cmax, bits, self.a_symmetric)
        qmin, qmax = qmath.integer_range(bits, self.a_symmetric)
        set_attr(gm, f"{name}_scale", scale)
        set_attr(gm, f"{name}_zero_point", zero_point)
        graph = gm.graph
        s_node = graph.get_attr(f"{name}_scale")
        z_node = graph.get_attr(f"{name}_zero_point")
        return graph.call_function(torch.ops.llmq.quantize_dequantize.default, (x, s_node, z_node, qmin, qmax))

    def _dynamic_qdq(self, gm: fx.GraphModule, site) -> fx.Node:
        channels = site.module.stats().num_channels
        group = qmath.activation_group(channels, self.a_group_size)
        if self.a_group_size and channels > self.a_group_size and not group:
            logger.warning(
                "a_group_size=%d does not divide the %d input channels of %s (observer node %s): one range per token there",
                self.a_group_size, channels, site.name, site.observer.name,
            )
        clip = float(site.info.get("a_clip_ratio", self.a_clip_ratio))  # a site's own, if a pass chose one
        args = (site.producer, self.a_bits, self.a_symmetric, clip, group)
        with gm.graph.inserting_after(site.observer):
            qdq = gm.graph.call_function(torch.ops.llmq.quantize_dequantize_dynamic.default, args)
        qdq.meta["llmq_site"] = dict(
            site.observer.meta.get("llmq_site", {}), a_bits=self.a_bits, dynamic=True, a_effective_bits=float(self.a_bits),
            a_clip_ratio=clip,
            a_group_size=group or None,
        )
        for key in ("val", "nn_module_stack"):
            if key in site.producer.meta:
                qdq.meta[key] = site.producer.meta[key]
        return qdq

    def _weight_dequant(self, gm: fx.GraphModule, linear: fx.Node, path: str) -> None:
        w_node = linear.args[1]
        if is_integer_weight(w_node):
            return  # already integer (an earlier weight pass, e.g. GPTQ, quantized it)
        weight = attr(gm, w_node.target)
        if self.w_group_size is not None and weight.shape[1] % self.w_group_size:
            raise ConfigError(
                f"config key 'w_group_size'={self.w_group_size} does not divide in_features={weight.shape[1]} of {path}"
            )
        qweight, scale = qmath.quantize_weight(weight, self.w_bits, self.w_group_size, self.w_clip)
        insert_weight_dequant(gm, linear, path, qweight, scale, self.w_bits)


def _dynamic_label(qdq: fx.Node) -> str:
    group = qdq.meta["llmq_site"].get("a_group_size")
    return f"per-token/{group}" if group else "per-token"


def is_integer_weight(node) -> bool:
    """True when a Linear's weight input is already ``llmq.dequantize_weight`` of integer codes."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == torch.ops.llmq.dequantize_weight.default


def insert_weight_dequant(
    gm: fx.GraphModule, linear: fx.Node, path: str, qweight: torch.Tensor, scale: torch.Tensor, bits: int
) -> fx.Node:
    """Make ``linear`` read its weight as ``llmq.dequantize_weight(path.weight_int, path.weight_scale, bits)``.

    ``qweight``/``scale`` are in ``qmath.quantize_weight``'s layout; they become buffers on the Linear's
    module path. Shared by every weight quantizer (round-to-nearest here, GPTQ) so the exporter sees
    one pattern. Returns the dequantize node.
    """
    w_node = linear.args[1]
    set_attr(gm, f"{path}.weight_int", qweight)
    set_attr(gm, f"{path}.weight_scale", scale)
    graph = gm.graph
    with graph.inserting_before(linear):
        q_node = graph.get_attr(f"{path}.weight_int")
        s_node = graph.get_attr(f"{path}.weight_scale")
        deq = graph.call_function(torch.ops.llmq.dequantize_weight.default, (q_node, s_node, bits))
    deq.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
    linear.replace_input_with(w_node, deq)
    return deq


def _mean_effective_bits(gm: fx.GraphModule, linears: dict[str, dict]) -> float | None:
    """Activation code bits averaged over the quantized Linears, weighted by MACs per token (in x out)."""
    total = weighted = 0.0
    for node in linear_nodes(gm.graph):
        bits = linears.get(module_path(node), {}).get("a_effective_bits")
        if bits is None:
            continue
        w = node.args[1]
        out_features, in_features = attr(gm, w.target if w.op == "get_attr" else w.args[0].target).shape
        total += in_features * out_features
        weighted += bits * in_features * out_features
    return weighted / total if total else None


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
