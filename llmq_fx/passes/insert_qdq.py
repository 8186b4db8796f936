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
  The scheme's ``clip_ratio`` < 1 shrinks every range (static cluster or dynamic token) by that
  factor; a dynamic site whose ``SiteRecord`` carries its own scheme (the clip ratio chosen by
  ``SequentialGPTQPass``'s search) uses that one.
* mixed precision (``outlier_bits``) -- the ``outlier_clusters`` clusters of widest calibrated
  range (``max - min`` over the cluster's channels) are quantized at ``outlier_bits``, the rest at
  ``a_bits``. The channels are *split*, not quantized twice and selected::

      x_lo = index_select(x, -1, channels)          -> quantize_dequantize(a_bits)
      x_hi = index_select(x, -1, outlier_channels)  -> quantize_dequantize(a_outlier_bits)
      x_hat = index_select(cat([x_lo, x_hi], -1), -1, restore)

  so every channel has exactly one integer code, of its own width: the ONNX file holds a UINT4
  (INT4) QuantizeLinear over the ``a_bits`` channels and a UINT8 (INT8) one over the outliers
  (Gather / Concat around them), and the effective bits are what the codes really take.
  At least one cluster always stays at ``a_bits`` (``outlier_clusters`` is capped at clusters - 1):
  with one cluster (per-tensor) there is nothing to pick and the site stays at ``a_bits``.
  Each quantized Linear's record in ``gm.meta["llmq_fx"]["linears"]`` gets ``a_effective_bits``
  (code bits averaged over its input channels; scales and zero points not counted) and
  ``gm.meta["llmq_fx"]["a_effective_bits"]`` is the model's mean weighted by each Linear's MACs per
  token (``in_features * out_features``), so q/k/v count three times for their shared input.
* weights -- each non-skipped consumer's float weight is replaced by an int8 buffer ``weight_int``
  (values in the ``w_bits`` range) and a ``weight_scale`` buffer on the Linear's module path (a
  module called at several places gets ``weight_int_2``... for the others), read through
  ``llmq.dequantize_weight``; the exporter turns that into an INT4 initializer + DequantizeLinear.
  The dequantize node's meta (``WEIGHT_META``) names the float weight it replaced. ``w_clip``
  searches each row's (group's) clipping ratio (``qmath.weight_scale``). The float weight attribute
  is deleted when nothing else uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx import qmath
from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, is_skipped, linear_nodes, module_path, moved, observer_sites, read_attr, set_attr
from llmq_fx.passes.base import LlmqPass
from llmq_fx.spec import SITE_META, ActivationSpec, SiteRecord, WeightSpec

__all__ = ["InsertQDQPass", "QDQOptions", "cluster_ranges", "insert_weight_dequant", "is_integer_weight", "WEIGHT_META",
           "delete_replaced_weights"]

logger = logging.getLogger(__name__)

# Meta key of a ``dequantize_weight`` node: ``{"replaces": <get_attr target of the float weight>}``.
WEIGHT_META = "llmq_weight"


def cluster_ranges(xmin: torch.Tensor, xmax: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) where every channel gets its cluster's min over members and max over members."""
    k = int(labels.max()) + 1
    cmin = torch.full((k,), float("inf"), dtype=xmin.dtype, device=xmin.device).scatter_reduce(0, labels, xmin, "amin")
    cmax = torch.full((k,), float("-inf"), dtype=xmax.dtype, device=xmax.device).scatter_reduce(0, labels, xmax, "amax")
    return cmin[labels], cmax[labels]


@dataclass(frozen=True)
class QDQOptions:
    """Options of ``InsertQDQPass``.

    Attributes:
        weight: the weight scheme of Linears no earlier pass made integer (round-to-nearest), or None
            to keep float weights.
        activation: the activation scheme (dynamic: group size an upper bound resolved per site;
            static: one range per cluster), or None to keep float activations.
        outlier_bits: static activations: bits of the ``outlier_clusters`` widest clusters (mixed precision).
        outlier_clusters: how many clusters get ``outlier_bits``.
        skip: module-path patterns of Linears left entirely in float.
    """

    weight: WeightSpec | None = None
    activation: ActivationSpec | None = None
    outlier_bits: int | None = None
    outlier_clusters: int = 1
    skip: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.outlier_bits is not None and (self.activation is None or self.activation.dynamic):
            raise ConfigError(
                "'a_outlier_bits' needs static per-cluster activations; it cannot be used with 'a_dynamic'"
            )


class InsertQDQPass(LlmqPass):
    """Replace observers by activation QDQ nodes and float weights by integer weights + dequantize."""

    Options = QDQOptions
    stage = "quantize"

    @classmethod
    def from_config(cls, config) -> "InsertQDQPass":
        return cls(QDQOptions(config.weight_spec(), config.activation_spec(), config.a_outlier_bits,
                              config.a_outlier_clusters, tuple(config.skip)))

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        opts = self.options
        linears = gm.meta.setdefault("llmq_fx", {}).setdefault("linears", {})
        site_stats = gm.meta["llmq_fx"].setdefault("site_stats", {})
        for site in observer_sites(gm):
            site_stats[site.name] = _site_record(site)
            obs, x = site.observer, site.producer
            quantized = [c for c in site.consumers if not is_skipped(module_path(c), opts.skip)]
            qdq = None
            if opts.activation is not None and quantized:
                qdq = self._dynamic_qdq(gm, site) if opts.activation.dynamic else self._activation_qdq(gm, site)
            for c in site.consumers:
                c.replace_input_with(obs, qdq if (qdq is not None and c in quantized) else x)
            for u in list(obs.users):  # non-Linear users (none from our pass) read the raw value
                u.replace_input_with(obs, x)
            graph.erase_node(obs)
            delattr(gm, obs.target)
            record = qdq.meta[SITE_META] if qdq is not None else site.record
            for c in site.consumers:
                path = module_path(c)
                is_q = c in quantized
                w_spec = opts.weight if is_q else None
                if w_spec is not None:  # the Linear's own scheme (its input width)
                    w_spec = w_spec.for_features(site_stats[site.name]["min"].numel())
                if w_spec is not None:
                    self._weight_dequant(gm, c, path)
                a_q = is_q and qdq is not None
                linears[path] = {
                    "site": site.name,
                    "role": site.role,
                    "w_bits": w_spec.bits if w_spec else None,
                    "w_group_size": w_spec.group_size if w_spec else None,
                    "a_bits": opts.activation.bits if a_q else None,
                    "clusters": _clusters_label(record) if a_q else None,
                    "a_effective_bits": record.effective_bits if a_q else None,
                    "smoothed": site.record.smoothed,
                }
        gm.meta["llmq_fx"]["a_effective_bits"] = _mean_effective_bits(gm, linears)
        graph.eliminate_dead_code()
        delete_replaced_weights(gm)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _activation_qdq(self, gm: fx.GraphModule, site) -> fx.Node:
        spec = self.options.activation
        st = site.module.stats()
        clusters = site.record.clusters
        labels = clusters.labels if clusters is not None else torch.zeros(st.num_channels, dtype=torch.long, device=st.min.device)
        cmin, cmax = cluster_ranges(st.min, st.max, labels)
        if spec.clip_ratio != 1.0:
            cmin, cmax = cmin * spec.clip_ratio, cmax * spec.clip_ratio
        base = site.observer.target.replace("llmq_observer_", "llmq_act_")
        outlier = self._outlier_mask(cmin, cmax, labels)
        record = dataclasses.replace(site.record, activation=spec)
        graph = gm.graph
        # Before the observer's successor: nodes land in creation order (the observer is erased later).
        with graph.inserting_before(site.observer.next):
            if not bool(outlier.any()):
                qdq = self._cluster_qdq(gm, site.producer, base, cmin, cmax, spec.bits)
                record.effective_bits = float(spec.bits)
            else:
                high_bits = self.options.outlier_bits
                low = torch.nonzero(~outlier).flatten()
                high = torch.nonzero(outlier).flatten()
                set_attr(gm, f"{base}_channels", low)
                set_attr(gm, f"{base}_outlier_channels", high)
                set_attr(gm, f"{base}_restore", torch.argsort(torch.cat([low, high])))
                parts = []
                for name, index, idx, bits in (
                    (base, f"{base}_channels", low, spec.bits),
                    (f"{base}_outlier", f"{base}_outlier_channels", high, high_bits),
                ):
                    channels = graph.call_function(
                        torch.ops.aten.index_select.default, (site.producer, -1, graph.get_attr(index))
                    )
                    part = self._cluster_qdq(gm, channels, name, cmin[idx], cmax[idx], bits)
                    part.meta[SITE_META] = dataclasses.replace(
                        record, activation=dataclasses.replace(spec, bits=bits), effective_bits=float(bits)
                    )
                    if "nn_module_stack" in site.producer.meta:
                        part.meta["nn_module_stack"] = site.producer.meta["nn_module_stack"]
                    parts.append(part)
                joined = graph.call_function(torch.ops.aten.cat.default, (parts, -1))
                restore = graph.get_attr(f"{base}_restore")
                qdq = graph.call_function(torch.ops.aten.index_select.default, (joined, -1, restore))
                record.effective_bits = (len(low) * spec.bits + len(high) * high_bits) / st.num_channels
                record.outlier_channels = len(high)
        qdq.meta[SITE_META] = record
        for key in ("val", "nn_module_stack"):
            if key in site.producer.meta:
                qdq.meta[key] = site.producer.meta[key]
        return qdq

    def _outlier_mask(self, cmin: torch.Tensor, cmax: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Bool per channel: member of one of the ``outlier_clusters`` clusters of widest range.

        At most clusters - 1 are picked, so a site is never promoted whole; ties go to the lower
        label (the narrower magnitude, GroupChannelsPass numbers clusters by magnitude).
        """
        present = torch.unique(labels)
        opts = self.options
        n_outliers = 0 if opts.outlier_bits is None else min(opts.outlier_clusters, len(present) - 1)
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
        symmetric = self.options.activation.symmetric
        scale, zero_point = qmath.minmax_scale_zero_point(cmin, cmax, bits, symmetric)
        qmin, qmax = qmath.integer_range(bits, symmetric)
        set_attr(gm, f"{name}_scale", scale)
        set_attr(gm, f"{name}_zero_point", zero_point)
        graph = gm.graph
        s_node = graph.get_attr(f"{name}_scale")
        z_node = graph.get_attr(f"{name}_zero_point")
        return graph.call_function(torch.ops.llmq.quantize_dequantize.default, (x, s_node, z_node, qmin, qmax))

    def _dynamic_qdq(self, gm: fx.GraphModule, site) -> fx.Node:
        config_spec = self.options.activation
        channels = site.module.stats().num_channels
        spec = site.record.activation or config_spec.for_site(channels)  # a site's own, if a pass chose one
        if config_spec.group_size and channels > config_spec.group_size and not spec.group_size:
            logger.warning(
                "a_group_size=%d does not divide the %d input channels of %s (observer node %s): one range per token there",
                config_spec.group_size, channels, site.name, site.observer.name,
            )
        with gm.graph.inserting_after(site.observer):
            qdq = gm.graph.call_function(
                torch.ops.llmq.quantize_dequantize_dynamic.default, (site.producer, *spec.op_args())
            )
        qdq.meta[SITE_META] = dataclasses.replace(site.record, activation=spec, effective_bits=float(spec.bits))
        for key in ("val", "nn_module_stack"):
            if key in site.producer.meta:
                qdq.meta[key] = site.producer.meta[key]
        return qdq

    def _weight_dequant(self, gm: fx.GraphModule, linear: fx.Node, path: str) -> None:
        w_node = linear.args[1]
        if is_integer_weight(w_node):
            return  # already integer (an earlier weight pass, e.g. GPTQ, quantized it)
        weight = read_attr(gm, w_node.target)
        spec = self.options.weight.for_features(weight.shape[1])
        qweight, scale = spec.quantize(weight)
        insert_weight_dequant(gm, linear, path, qweight, scale, spec.bits)


def _clusters_label(record: SiteRecord) -> int | str | None:
    """The summary's ``clusters`` column: the cluster count (static), or ``per-token[/G]`` (dynamic)."""
    spec = record.activation
    if spec is not None and spec.dynamic:
        return f"per-token/{spec.group_size}" if spec.group_size else "per-token"
    return record.clusters.count if record.clusters is not None else None


def is_integer_weight(node) -> bool:
    """True when a Linear's weight input is already ``llmq.dequantize_weight`` of integer codes."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == torch.ops.llmq.dequantize_weight.default


def insert_weight_dequant(
    gm: fx.GraphModule, linear: fx.Node, path: str, qweight: torch.Tensor, scale: torch.Tensor, bits: int, index: int = 1
) -> fx.Node:
    """Make ``linear`` read its weight as ``llmq.dequantize_weight(path.weight_int, path.weight_scale, bits)``.

    ``index`` is the weight's argument position (1 for ``aten.linear``, 0 for ``aten.embedding``).

    ``qweight``/``scale`` are in ``qmath.quantize_weight``'s layout; they become buffers on the Linear's
    module path (``weight_int_2``/``weight_scale_2``... when that module is called at another place
    too and its first call already took the names). Shared by every weight quantizer (round-to-nearest
    here, GPTQ) so the exporter sees one pattern. Returns the dequantize node, whose ``WEIGHT_META``
    names the float weight it replaced. They are stored where the weight they replace lives (on the host
    when the passes compute elsewhere).
    """
    w_node = linear.args[index]
    if isinstance(w_node, fx.Node) and w_node.op == "get_attr":
        home = attr(gm, w_node.target).device
        qweight, scale = moved(qweight, home), moved(scale, home)
    owner = gm.get_submodule(path.rpartition(".")[0]) if "." in path else gm
    leaf = path.rpartition(".")[2]
    module = getattr(owner, leaf, None) if leaf else None
    suffix, i = "", 1
    while module is not None and hasattr(module, f"weight_int{suffix}"):
        i += 1
        suffix = f"_{i}"
    q_target, s_target = f"{path}.weight_int{suffix}", f"{path}.weight_scale{suffix}"
    set_attr(gm, q_target, qweight)
    set_attr(gm, s_target, scale)
    graph = gm.graph
    with graph.inserting_before(linear):
        q_node = graph.get_attr(q_target)
        s_node = graph.get_attr(s_target)
        deq = graph.call_function(torch.ops.llmq.dequantize_weight.default, (q_node, s_node, bits))
    deq.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
    deq.meta[WEIGHT_META] = {"replaces": w_node.target if isinstance(w_node, fx.Node) and w_node.op == "get_attr" else None}
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
    if site.record.clusters is not None:
        rec["labels"] = site.record.clusters.labels
    return {k: v.detach().cpu() for k, v in rec.items()}


def delete_replaced_weights(gm: fx.GraphModule) -> None:
    """Drop the float weights integer weights replaced once no get_attr node reads them, so the model
    does not carry both copies."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    replaced = {n.meta.get(WEIGHT_META, {}).get("replaces") for n in gm.graph.nodes if is_integer_weight(n)}
    dropped = []
    for target in sorted(t for t in replaced if t and t not in used):
        owner, _, leaf = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if hasattr(module, leaf):
            dropped.append(getattr(module, leaf))
            delattr(module, leaf)
    # Other names of a dropped tensor (a tied table's second name) that no node reads go with it.
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        if name not in used and any(t is d for d in dropped):
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
