"""The order of the rotated residual channels: RPTQ's reordering, in QuaRot's basis.

With activations quantized in groups of ``G`` contiguous channels, a group that holds one wide channel
and many narrow ones spends its 4-bit range on the wide one. The residual stream is shared by every
layer, so one permutation ``P`` of its channels, folded into the rotation (``Q -> Q P``, see
``RotatePass``), reorders every reader's input at once with no node added. ``ResidualOrder`` chooses
``P`` from each residual channel's largest magnitude at each reader input (a *site*: the normalized
residual a norm hands its Linears), each site's maxima divided by their mean:

* ``"range"``: sort by that normalized maximum averaged over the sites, so a group gathers channels of
  similar range;
* ``"kmeans"``: describe each channel by its log-normalized maxima at every site (one feature per site),
  find ``channels / G`` k-means clusters (scikit-learn), make every cluster exactly ``G`` channels by a
  balanced assignment (each channel to its nearest cluster with room left, the closest pairs first) and
  lay the clusters out one after the other, so each contiguous group is one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq_fx.errors import ConfigError

__all__ = ["ResidualOrder", "balanced_kmeans_order"]

METHODS = ("range", "kmeans")


@dataclass(frozen=True)
class ResidualOrder:
    """How ``RotatePass`` orders the rotated residual channels (config ``sort_residual``).

    Attributes:
        method: ``"range"`` or ``"kmeans"`` (module docstring).
        group: the activation group size (``a_group_size``); ``"kmeans"`` needs it.
        batches: the maxima come from the first this many calibration batches.
        seed, n_init: k-means determinism and restarts (config ``seed``, ``kmeans_n_init``).
    """

    method: str = "range"
    group: int | None = None
    batches: int = 2
    seed: int = 0
    n_init: int = 4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"ResidualOrder.method must be \"range\" or \"kmeans\", got {self.method!r}")
        if self.method == "kmeans" and not (isinstance(self.group, int) and self.group >= 1):
            raise ConfigError(f"ResidualOrder(method=\"kmeans\") needs the activation group size, got group={self.group!r}")

    def permutation(self, maxima: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """``(perm, record)`` for the per-site channel maxima ``maxima`` (each ``[channels]``): the new
        channel ``i`` is the old channel ``perm[i]``."""
        sites = [(m.float() / m.float().mean().clamp_min(1e-30)).cpu() for m in maxima]
        score = torch.stack(sites).mean(0)  # per channel: the normalized maximum averaged over the sites
        clusters = None
        if self.method == "kmeans":
            perm, clusters = balanced_kmeans_order(torch.stack(sites, 1), self.group, self.seed, self.n_init)
        else:
            perm = torch.argsort(score, stable=True)
        record = {"sorted": True, "method": self.method, "channels": int(perm.numel()), "sites": len(sites),
                  "range_min": float(score.min()), "range_max": float(score.max())}
        if clusters is not None:
            record.update(clusters)
        return perm, record


def balanced_kmeans_order(normalized: torch.Tensor, group: int, seed: int = 0, n_init: int = 4):
    """The channel order that makes each run of ``group`` channels one k-means cluster (see the module
    docstring) for ``normalized`` (``[channels, sites]``: each channel's maximum at each site over that
    site's mean), and a record: clusters, channels the balancing moved off their nearest center, and the
    spread of the averaged normalized maximum inside a group (largest / smallest, mean over groups)
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
