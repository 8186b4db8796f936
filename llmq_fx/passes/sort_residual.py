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

``method="kmeans"`` (RPTQ's clusters as the dynamic groups): each channel is described by its
log-normalized maxima at every reader input (one feature per site), k-means (scikit-learn) finds
``channels / G`` clusters, and a balanced assignment (each channel to its nearest cluster with room left,
the closest pairs first) makes every cluster exactly ``G`` channels; the clusters are laid out one after
the other, so each contiguous group of ``G`` is one cluster.
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
    """Options of ``SortResidualPass``: statistics from the first ``batches`` calibration batches;
    ``method``: ``"range"`` (sort by the averaged normalized maximum) or ``"kmeans"`` (balanced k-means
    clusters of ``group`` channels, the activation group size); ``seed``, ``n_init``: k-means determinism
    and restarts (config ``seed``, ``kmeans_n_init``, as ``GroupChannelsPass``)."""

    batches: int = 2
    method: str = "range"
    group: int | None = None
    seed: int = 0
    n_init: int = 4

    def __post_init__(self):
        if self.method not in ("range", "kmeans"):
            raise ConfigError(f"SortResidualOptions.method must be \"range\" or \"kmeans\", got {self.method!r}")
        if self.method == "kmeans" and not (isinstance(self.group, int) and self.group >= 1):
            raise ConfigError(f"SortResidualOptions(method=\"kmeans\") needs the activation group size, got group={self.group!r}")


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
        method = "range" if config.sort_residual is True else config.sort_residual
        if method == "kmeans" and not (config.a_dynamic and config.a_group_size):
            raise ConfigError("config key 'sort_residual': \"kmeans\" makes the clusters the dynamic activation groups: "
                              "it needs 'a_dynamic' and an 'a_group_size'")
        return cls(SortResidualOptions(method=method, group=config.a_group_size, seed=config.seed, n_init=config.kmeans_n_init))

    def call(self, gm: fx.GraphModule) -> PassResult:
        meta = gm.meta.setdefault("llmq_fx", {})
        tensors = residual_basis(gm)
        if tensors is None:
            meta["residual_sort"] = {"sorted": False, "reason": "no rotated residual stream (rotation skipped)"}
            return PassResult(gm, False)
        readers = set(meta["residual_basis"]["readers"])
        sites = [(m / m.mean().clamp_min(1e-30)).cpu() for m in self._reader_maxima(gm, readers)]
        score = torch.stack(sites).mean(0)  # per channel: the normalized maximum averaged over the reader inputs
        if self.options.method == "kmeans":
            perm, clusters = balanced_kmeans_order(torch.stack(sites, 1), self.options.group, self.options.seed, self.options.n_init)
        else:
            perm, clusters = torch.argsort(score, stable=True), None
        with torch.no_grad():
            for target, axis in tensors:  # each tensor once, also behind two names (tied weights)
                t = attr(gm, target)
                for a in (0, 1) if axis is None else (axis % t.dim(),):  # None: a map from the stream to itself
                    t = t.index_select(a, perm.to(t.device))
                write_attr(gm, target, t)
        meta["residual_sort"] = {"sorted": True, "method": self.options.method, "channels": int(perm.numel()),
                                 "sites": len(readers), "range_min": float(score.min()), "range_max": float(score.max())}
        if clusters is not None:
            meta["residual_sort"].update(clusters)
        gm.recompile()
        return PassResult(gm, True)

    @torch.no_grad()
    def _reader_maxima(self, gm: fx.GraphModule, readers: set[str]) -> list[torch.Tensor]:
        """Per reader input (each counted once): every residual channel's largest magnitude there."""
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
        return list(maxima.values())


def balanced_kmeans_order(normalized: torch.Tensor, group: int, seed: int = 0, n_init: int = 4):
    """The channel order that makes each run of ``group`` channels one k-means cluster (see the module
    docstring) for ``normalized`` (``[channels, sites]``: each channel's maximum at each reader input over
    that input's mean), and a record: clusters, channels the balancing moved off their nearest center, and
    the spread of the averaged normalized maximum inside a group (largest / smallest, mean over groups)
    before and after."""
    from sklearn.cluster import KMeans

    score = normalized.mean(1)
    features = normalized.clamp_min(1e-6).log().double()
    channels = features.shape[0]
    k = -(-channels // group)
    room = [group] * (k - 1) + [channels - group * (k - 1)]
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(features.numpy())
    centers = torch.from_numpy(km.cluster_centers_)
    # Clusters in the order of their centers' mean log range, so groups run from narrow to wide as with "range".
    centers = centers[torch.argsort(centers.mean(1), stable=True)]
    dist = torch.cdist(features, centers)
    label = [-1] * channels
    left = channels
    for flat in torch.argsort(dist.flatten(), stable=True).tolist():  # the closest (channel, cluster) pairs first
        c, j = divmod(flat, k)
        if label[c] < 0 and room[j] > 0:
            label[c], room[j], left = j, room[j] - 1, left - 1
            if not left:
                break
    label = torch.tensor(label)
    nearest = dist.argmin(1)
    by_score = torch.argsort(score, stable=True)
    perm = by_score[torch.argsort(label[by_score], stable=True)]  # by cluster, by score inside one

    def spread(p: torch.Tensor) -> float:
        s = score[p][: group * (channels // group)].reshape(-1, group)
        return float((s.amax(1) / s.amin(1).clamp_min(1e-30)).mean())

    return perm, {"clusters": k, "moved_by_balancing": int((label != nearest).sum()),
                  "group_spread_before": spread(torch.arange(channels)), "group_spread_after": spread(perm)}

