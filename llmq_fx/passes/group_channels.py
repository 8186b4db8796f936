"""Channel grouping pass (RPTQ, Yuan et al. 2023).

Pattern: every observer site (one per distinct Linear input).

Rewrite: no node changes. The site's input channels are clustered with k-means on per-channel
features from the observer -- ``minmax`` = (min, max) as RPTQ does, or ``maxstd`` = (absmax, std) --
and the result is recorded on the observer module (``labels``, ``permutation``) and in the
observer node's meta, for the quantization pass (one activation scale per cluster) and for a
kernel or exporter that wants clusters contiguous (``x[..., permutation]``).

Clusters are numbered by increasing magnitude, so labels are stable across runs; k-means is seeded.
``n_clusters == 1`` is per-tensor and ``n_clusters >= channels`` is per-channel: the two ends of
the same path.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from llmq_fx.graph import observer_sites
from llmq_fx.stats import ChannelStats

__all__ = ["GroupChannelsPass", "cluster_channels", "channel_features"]

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


class GroupChannelsPass(PassBase):
    """Cluster each site's input channels; record labels and the cluster-contiguous permutation."""

    def __init__(self, n_clusters, features: str = "minmax", seed: int = 0, n_init: int = 4):
        super().__init__()
        self.n_clusters = n_clusters  # callable role -> int
        self.features = features
        self.seed = seed
        self.n_init = n_init

    def call(self, gm: fx.GraphModule) -> PassResult:
        for site in observer_sites(gm):
            k = self.n_clusters(site.role)
            feats = channel_features(site.module.stats(), self.features)
            labels = cluster_channels(feats, k, self.seed, self.n_init)
            device = site.module.mean.device
            labels_t = torch.as_tensor(labels, device=device)
            site.module.register_buffer("labels", labels_t)
            site.module.register_buffer("permutation", torch.argsort(labels_t, stable=True))
            n_found = int(labels.max()) + 1
            site.observer.meta["llmq_site"].update(
                {"clusters": n_found, "clusters_requested": k, "cluster_features": self.features}
            )
            logger.debug("grouping %s: %d clusters", site.name, n_found)
        return PassResult(gm, False)
