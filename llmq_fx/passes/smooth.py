"""Smoothing pass (SmoothQuant, Xiao et al. 2023), with two extra fold sites.

For an activation site with recorded per-channel absmax ``a_j`` and consumer weights ``W`` the pass
computes ``s_j = a_j^alpha / max_i |W_ij|^(1-alpha)`` (max over all consumers), and rewrites
``x -> x / s`` upstream and ``W[:, j] -> W[:, j] * s_j`` in every consumer, so
``(x / s) @ (W * s)^T == x @ W^T`` and the float output is unchanged. Where ``x / s`` is absorbed
depends on the pattern that produces ``x``:

* ``qkv`` / ``fc1`` -- norm -> observer -> Linears: the norm's weight and bias are divided by ``s``
  (``LN(x) * g / s + b / s``). Skipped when the norm output has any other user.
* ``fc2`` -- Linear(fc1) -> ReLU -> observer -> fc2: fc1's output rows and bias are divided by
  ``s``; valid because ReLU is positively homogeneous, ``relu(z / s) = relu(z) / s`` for ``s > 0``.
  SiLU/GELU are not, so a gated MLP's down_proj is not folded here.
* ``fc2`` of a gated MLP (Llama) -- ``silu(gate(x)) * up(x)`` -> observer -> down_proj: SiLU is *not*
  positively homogeneous, so nothing can be folded through the gate's activation; the up projection's
  output rows absorb ``1/s`` instead, since ``silu(g) * (u / s) = (silu(g) * u) / s``.
* ``out_proj`` -- v_proj -> attention -> views -> observer -> out_proj: v_proj's output rows and bias
  are divided by ``s``; attention output channel ``j`` is a convex combination of V's channel ``j``
  only, so scaling V's channels scales the output's channels alike (same head split on both sides).

The observers' statistics are transformed by the same ``s`` instead of being re-collected. Sites
that match no pattern, or whose weights are shared with another op (tied embeddings), are skipped
and the reason is recorded in ``gm.meta["llmq_fx"]["smoothing"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.passes.base import LlmqPass
from llmq_fx.stats import weight_stats
from llmq_fx.graph import (
    ObserverSite,
    BROADCAST_OPS,
    attention_value_source,
    attr,
    gated_up_source,
    attr_users_elsewhere,
    is_linear,
    is_skipped,
    module_path,
    norm_affine,
    observer_sites,
    VIEW_OPS,
    write_attr,
)

__all__ = ["SmoothPass", "SmoothOptions", "SmoothingSite", "smoothing_scales"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
# s is clamped to this range: a dead channel (absmax 0) keeps s = 1 rather than a huge fold.
_S_MIN, _S_MAX = 1e-5, 1e5


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1-alpha)``; channels with a zero on either side keep ``s_j = 1``."""
    a = act_absmax.to(torch.float64)
    w = weight_absmax.to(torch.float64)
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(_S_MIN, _S_MAX)


class SmoothingSite:
    """Where a site's ``1/s`` is absorbed: the upstream tensors (norm weight/bias, or a Linear's
    output rows and bias) whose channel ``j`` (dim 0) is divided by ``s_j``."""

    def __init__(self, site: ObserverSite, kind: str, upstream: list[str]):
        self.site = site
        self.kind = kind  # "norm" | "relu_fc1" | "gated_up" | "attention_v"
        self.upstream = upstream  # get_attr targets

    def describe(self) -> str:
        return f"{', '.join(self.upstream)} -> [{', '.join(module_path(c) for c in self.site.consumers)}]"


@dataclass(frozen=True)
class SmoothOptions:
    """Options of ``SmoothPass``: migration strength ``alpha`` in (0, 1], the site roles to smooth
    (``qkv``, ``fc1``, ``fc2``, ``out_proj``) and the module-path patterns left in float (``skip``)."""

    alpha: float = 0.5
    sites: tuple[str, ...] = ("qkv", "fc1", "fc2", "out_proj")
    skip: tuple[str, ...] = ("lm_head",)


class SmoothPass(LlmqPass):
    """Fold SmoothQuant scales into norms / upstream Linears and consumer weight columns."""

    Options = SmoothOptions
    stage = "smooth"

    @classmethod
    def from_config(cls, config) -> "SmoothPass | None":
        if config.smooth_alpha is None or not config.smooth_sites:
            return None
        return cls(SmoothOptions(float(config.smooth_alpha), tuple(config.smooth_sites), tuple(config.skip)))

    def call(self, gm: fx.GraphModule) -> PassResult:
        report = gm.meta.setdefault("llmq_fx", {}).setdefault("smoothing", {})
        modified = False
        for site in observer_sites(gm):
            if site.role not in self.options.sites:
                report[site.name] = {"smoothed": False, "reason": f"role {site.role!r} not in smooth_sites"}
                continue
            match, reason = self._match(gm, site)
            if match is None:
                report[site.name] = {"smoothed": False, "reason": reason}
                logger.info("smoothing: skip %s (%s)", site.name, reason)
                continue
            s = self._apply(gm, match)
            site.record.smoothed = True
            report[site.name] = {
                "smoothed": True,
                "kind": match.kind,
                "fold": match.describe(),
                "alpha": self.options.alpha,
                "s_min": float(s.min()),
                "s_max": float(s.max()),
            }
            logger.info("smoothing: %s (%s)", match.describe(), match.kind)
            modified = True
        gm.recompile()
        return PassResult(gm, modified)

    # -- pattern matching ------------------------------------------------------------------
    def _match(self, gm: fx.GraphModule, site: ObserverSite) -> tuple[SmoothingSite | None, str]:
        obs = site.observer
        if len(site.consumers) != len(obs.users):
            return None, "observer output feeds a non-Linear op"
        for c in site.consumers:
            path = module_path(c)
            if is_skipped(path, self.options.skip):
                return None, f"consumer {path} is skipped (stays float)"
            w = c.args[1]
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                return None, f"consumer {path} weight is not a parameter"
            shared = attr_users_elsewhere(gm, w, c)
            if shared:
                return None, f"consumer {path} weight is shared with {shared[0]} (tied)"
        producer = site.producer

        norm = norm_affine(producer)
        if norm is not None:
            if len(producer.users) != 1:
                others = [u.name for u in producer.users if u is not obs]
                return None, f"norm {producer.name} output also feeds {others} (e.g. post-LN residual)"
            if norm.offset:
                return None, f"norm {producer.name} multiplies by weight + {norm.offset:g}: 1/s cannot fold into its weight alone"
            params = [norm.weight] + ([norm.bias] if norm.bias is not None else [])
            upstream = [p.target for p in params]
            for node in params:
                if attr_users_elsewhere(gm, node, producer):
                    return None, f"norm parameter {node.target} is shared"
            return SmoothingSite(site, "norm", upstream), ""

        if producer.op == "call_function" and producer.target == aten.relu.default:
            fc1 = producer.args[0]
            if not is_linear(fc1):
                return None, "ReLU input is not a Linear"
            if len(fc1.users) != 1 or len(producer.users) != 1:
                return None, "fc1/ReLU output has other users"
            return self._linear_rows(gm, site, fc1, "relu_fc1")

        gated = gated_up_source(producer)
        if gated is not None:
            mul, up = gated
            if len(up.users) != 1 or len(mul.users) != 1:
                return None, "up_proj / gated product has other users"
            return self._linear_rows(gm, site, up, "gated_up")

        av = attention_value_source(producer)
        if av is not None:
            attn, v_proj, rows = av
            if rows != slice(0, attr(gm, v_proj.args[1].target).shape[0]):
                return None, "V is a slice of a fused projection: 1/s would scale its other outputs too"
            if attn.kwargs.get("enable_gqa", False) or attr(gm, v_proj.args[1].target).shape[0] != site.module.num_channels:
                return None, "grouped-query attention: one V channel feeds several heads' out_proj channels"
            if any(not (u.op == "call_function" and u.target in VIEW_OPS | BROADCAST_OPS) for u in v_proj.users):
                return None, "v_proj output has non-view users"
            n = producer
            while n is not attn:
                if len(n.users) != 1:
                    return None, f"attention output {n.name} has other users"
                n = n.args[0]
            return self._linear_rows(gm, site, v_proj, "attention_v")
        return None, f"no foldable pattern produces the input (producer {producer.op} {producer.target})"

    def _linear_rows(self, gm, site, upstream_linear, kind):
        w = upstream_linear.args[1]
        path = module_path(upstream_linear)
        if is_skipped(path, self.options.skip):
            return None, f"upstream {path} is skipped"
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or attr_users_elsewhere(gm, w, upstream_linear):
            return None, f"upstream {path} weight is shared or not a parameter"
        if attr(gm, w.target).shape[0] != site.module.num_channels:
            return None, f"upstream {path} has {attr(gm, w.target).shape[0]} outputs, site has {site.module.num_channels}"
        upstream = [w.target]
        b = upstream_linear.args[2] if len(upstream_linear.args) > 2 else None
        if isinstance(b, fx.Node):
            if b.op != "get_attr":
                return None, f"upstream {path} bias is not a parameter"
            upstream.append(b.target)
        return SmoothingSite(site, kind, upstream), ""

    # -- rewrite ---------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, gm: fx.GraphModule, match: SmoothingSite) -> torch.Tensor:
        site = match.site
        weights = [attr(gm, c.args[1].target) for c in site.consumers]
        w_absmax = torch.stack([weight_stats(w).in_absmax for w in weights]).amax(dim=0)
        s = smoothing_scales(site.module.stats().absmax, w_absmax, self.options.alpha)
        for target in match.upstream:
            t = attr(gm, target)  # channel j along dim 0: norm vectors, Linear output rows and biases
            write_attr(gm, target, t / s.to(t).reshape([-1] + [1] * (t.dim() - 1)))
        for c, w in zip(site.consumers, weights):
            write_attr(gm, c.args[1].target, w * s.to(w)[None, :])
        site.module.scale_channels(s)
        return s
