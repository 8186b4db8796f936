"""Channel grouping pass (RPTQ, Yuan et al. 2023).

Pattern: every observer site (one per distinct Linear input).

Rewrite: no node changes. The site's input channels are clustered with k-means on per-channel
features from the observer -- ``minmax`` = (min, max) as RPTQ does, or ``maxstd`` = (absmax, std) --
and the result is recorded in the site's ``SiteRecord`` (``clusters``: labels, and the
cluster-contiguous ``permutation`` a kernel or exporter would use, ``x[..., permutation]``), for the
quantization pass (one activation scale per cluster).

Clusters are numbered by increasing magnitude, so labels are stable across runs; k-means is seeded.
``n_clusters == 1`` is per-tensor and ``n_clusters >= channels`` is per-channel: the two ends of
the same path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.graph import observer_sites
from llmq_fx.passes.base import LlmqPass
from llmq_fx.spec import Clusters
from llmq_fx.stats import ChannelStats

__all__ = ["GroupChannelsPass", "GroupOptions", "cluster_channels", "channel_features"]

logger = logging.getLogger(__name__)


def channel_features(stats: ChannelStats, kind: str) -> np.ndarray:
    if kind == "minmax":
        return torch.stack([stats.min, stats.max], dim=1).cpu().numpy()
    if kind == "maxstd":
        return torch.stack([stats.absmax, stats.std], dim=1).cpu().numpy()
    raise ValueError(f"unknown cluster feature kind {kind!r}")


def cluster_channels(features: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 4) -> np.ndarray:
    """Deterministic k-means labels for ``[channels, d]`` features, relabelled by increasing range.

    Returns an int64 array of labels in ``[0, k)`` with ``k = min(n_clusters, distinct points)``.
    """
    n = features.shape[0]
    k = min(n_clusters, n)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if k >= n:
        raw = np.arange(n)
    else:
        with warnings.catch_warnings():
            # Fewer distinct points than k: sklearn warns and returns fewer clusters, which is right.
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(features.astype(np.float64))
        raw = km.labels_
    # Renumber clusters by increasing magnitude (largest |feature| in the cluster), ties by label.
    uniq = np.unique(raw)
    magnitude = np.array([np.abs(features[raw == u]).max() for u in uniq])
    order = uniq[np.lexsort((uniq, magnitude))]
    remap = {int(old): new for new, old in enumerate(order)}
    return np.array([remap[int(r)] for r in raw], dtype=np.int64)


@dataclass(frozen=True)
class GroupOptions:
    """Options of ``GroupChannelsPass``.

    Attributes:
        n_clusters: clusters per site, an int or a mapping by site role (roles absent: 1).
        features: ``minmax`` (RPTQ) or ``maxstd`` k-means features.
        seed, n_init: k-means determinism and restarts.
    """

    n_clusters: int | Mapping[str, int] = 8
    features: str = "minmax"
    seed: int = 0
    n_init: int = 4

    def clusters_for(self, role: str) -> int:
        if isinstance(self.n_clusters, Mapping):
            return self.n_clusters.get(role, 1)
        return self.n_clusters


class GroupChannelsPass(LlmqPass):
    """Cluster each site's input channels; record the clusters in the site's ``SiteRecord``."""

    Options = GroupOptions
    stage = "group"

    @classmethod
    def from_config(cls, config) -> "GroupChannelsPass | None":
        if config.a_bits is None or config.a_dynamic:
            return None
        n = dict(config.n_clusters) if isinstance(config.n_clusters, dict) else config.n_clusters
        return cls(GroupOptions(n, config.cluster_features, config.seed, config.kmeans_n_init))

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = observer_sites(gm)
        for site in sites:
            k = self.options.clusters_for(site.role)
            feats = channel_features(site.module.stats(), self.options.features)
            labels = cluster_channels(feats, k, self.options.seed, self.options.n_init)
            site.record.clusters = Clusters(torch.as_tensor(labels, device=site.module.mean.device), k, self.options.features)
            logger.debug("grouping %s: %d clusters", site.name, site.record.clusters.count)
        return PassResult(gm, bool(sites))
