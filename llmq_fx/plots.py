"""PNG plots of a ``llmq-fx quantize`` output folder: the figures one would otherwise draw by hand.

``llmq-fx inspect DIR --plots`` calls :func:`write_plots`, which reads ``DIR/stats.safetensors`` (per-site
channel statistics after smoothing, SmoothQuant scales and k-means labels, written by the quantize command)
and ``DIR/report.json`` and writes, next to them:

- ``channel_ranges.png``: per-input-channel [min, max] of one Linear input before and after SmoothQuant.
  The recorded statistics are those after smoothing; the input before smoothing was ``x = x_smoothed * s``
  per channel (``s`` > 0), so min and max before are the recorded ones times ``s``.
- ``clusters.png``: the RPTQ-style k-means clusters of that site over per-channel (min, max), with the one
  [min, max] range each cluster is quantized with.
- ``ppl_vs_clusters.png``: perplexity against ``n_clusters`` from ``report["cluster_sweep"]`` (written by
  ``llmq-fx quantize ... --eval eval --cluster-sweep 1 4 8 32``), with the float perplexity as a line.

The default site is the smoothed site whose activations had the strongest outlier channels before smoothing
(largest max/median ratio of the per-channel absmax): the one where smoothing and grouping matter most.

Example::

    from pathlib import Path
    from llmq_fx.plots import write_plots

    for path in write_plots(Path("runs/opt-mini")):
        print(path)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmq_fx.errors import CheckpointError, ConfigError

__all__ = ["SiteStats", "load_site_stats", "outlier_ratio", "default_site", "write_plots"]

logger = logging.getLogger(__name__)

_STATS_FILE = "stats.safetensors"
_REPORT_FILE = "report.json"
# Enough to draw 1024 channels as separate bars and to read an 8-cluster legend.
_DPI = 110


@dataclass(frozen=True)
class SiteStats:
    """Per-channel statistics of one observer site (one Linear input, shared by q/k/v), as float64 arrays.

    ``min``/``max``/``std`` are measured after smoothing; ``smoothing_scale`` is the product of the
    SmoothQuant scales ``s`` the input was divided by (all ones when the site was not smoothed);
    ``labels`` are the k-means cluster labels (``None`` when activations were not clustered).
    """

    name: str
    min: np.ndarray
    max: np.ndarray
    std: np.ndarray
    smoothing_scale: np.ndarray
    labels: np.ndarray | None

    @property
    def smoothed(self) -> bool:
        return not np.all(self.smoothing_scale == 1.0)

    @property
    def min_before(self) -> np.ndarray:
        # Smoothing divides channel j by s_j > 0, so the order of min and max is kept.
        return self.min * self.smoothing_scale

    @property
    def max_before(self) -> np.ndarray:
        return self.max * self.smoothing_scale


def outlier_ratio(xmin: np.ndarray, xmax: np.ndarray) -> float:
    """max / median of the per-channel absmax: how far the worst channel sticks out (1 = flat)."""
    absmax = np.maximum(np.abs(xmin), np.abs(xmax))
    median = float(np.median(absmax))
    return float(absmax.max()) / median if median > 0 else float("inf")


def load_site_stats(out_dir: Path) -> dict[str, SiteStats]:
    """Read ``out_dir/stats.safetensors`` into one :class:`SiteStats` per site, in file order."""
    from safetensors.numpy import load_file

    path = Path(out_dir) / _STATS_FILE
    if not path.is_file():
        raise CheckpointError(f"no {_STATS_FILE} in {out_dir}: run `llmq-fx quantize --out {out_dir}` first")
    tensors = load_file(str(path))
    # Site names hold dots and braces ("...self_attn.{q_proj,k_proj,v_proj}") but never "/".
    names = list(dict.fromkeys(key.rpartition("/")[0] for key in tensors))
    sites = {}
    for name in names:
        try:
            sites[name] = SiteStats(
                name=name,
                min=tensors[f"{name}/min"].astype(np.float64),
                max=tensors[f"{name}/max"].astype(np.float64),
                std=tensors[f"{name}/std"].astype(np.float64),
                smoothing_scale=tensors[f"{name}/smoothing_scale"].astype(np.float64),
                labels=tensors[f"{name}/labels"].astype(np.int64) if f"{name}/labels" in tensors else None,
            )
        except KeyError as err:
            raise CheckpointError(f"{path}: site {name!r} lacks tensor {err.args[0]!r}") from None
    if not sites:
        raise CheckpointError(f"{path} holds no site statistics")
    return sites


def default_site(sites: dict[str, SiteStats]) -> str:
    """The smoothed site with the largest max/median absmax ratio before smoothing (any site if none smoothed)."""
    candidates = [s for s in sites.values() if s.smoothed] or list(sites.values())
    return max(candidates, key=lambda s: outlier_ratio(s.min_before, s.max_before)).name


def write_plots(out_dir: Path, site: str | None = None) -> list[Path]:
    """Write ``channel_ranges.png``, ``clusters.png`` and ``ppl_vs_clusters.png`` into ``out_dir``.

    Args:
        out_dir: a ``llmq-fx quantize --out`` folder holding ``stats.safetensors`` and ``report.json``.
        site: observer site to draw channel ranges and clusters of (a key of ``stats.safetensors`` such as
            ``model.decoder.layers.0.fc2``); default :func:`default_site`.

    Returns:
        The paths written. ``clusters.png`` is skipped when the site has no cluster labels (activations not
        quantized) and ``ppl_vs_clusters.png`` when the report has no ``cluster_sweep``.

    Raises:
        CheckpointError: ``stats.safetensors`` or ``report.json`` is missing.
        ConfigError: ``site`` names no site of the run.
    """
    out_dir = Path(out_dir)
    sites = load_site_stats(out_dir)
    report_path = out_dir / _REPORT_FILE
    if not report_path.is_file():
        raise CheckpointError(f"no {_REPORT_FILE} in {out_dir}: run `llmq-fx quantize --out {out_dir}` first")
    report = json.loads(report_path.read_text())

    if site is None:
        chosen, why = default_site(sites), "default: largest outlier ratio before smoothing"
    elif site in sites:
        chosen, why = site, "as requested"
    else:
        shown = ", ".join(list(sites)[:5]) + (", ..." if len(sites) > 5 else "")
        raise ConfigError(f"unknown site {site!r} in {out_dir / _STATS_FILE}; available sites ({len(sites)}): {shown}")
    stats = sites[chosen]

    written = [_save(_channel_ranges_figure(stats, why), out_dir / "channel_ranges.png")]
    if stats.labels is not None:
        a_bits = report.get("config", {}).get("a_bits")
        written.append(_save(_clusters_figure(stats, a_bits), out_dir / "clusters.png"))
    else:
        cfg = report.get("config", {})
        reason = ("per-token dynamic activations have no clusters" if cfg.get("a_dynamic") and cfg.get("a_bits")
                  else "activations not quantized")
        logger.warning("no cluster labels for site %s (%s): clusters.png skipped", chosen, reason)
    if report.get("cluster_sweep"):
        written.append(_save(_ppl_figure(report), out_dir / "ppl_vs_clusters.png"))
    else:
        logger.warning("no cluster_sweep in %s (quantize with --eval and --cluster-sweep): ppl_vs_clusters.png skipped",
                    report_path)
    return written


def _figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot global state, no display, safe in threads and under pytest.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    # Temp name then rename, so a reader never sees a half-written PNG.
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _channel_ranges_figure(stats: SiteStats, why: str):
    fig = _figure(11, 6.5)
    axes = fig.subplots(2, 1, sharex=True)
    channels = np.arange(stats.min.size)
    panels = [
        ("before smoothing", stats.min_before, stats.max_before, "tab:red"),
        ("after smoothing" if stats.smoothed else "after smoothing (site not smoothed: identical)", stats.min, stats.max, "tab:blue"),
    ]
    for ax, (label, lo, hi, color) in zip(axes, panels):
        # One bar per channel from min to max: outlier channels show as isolated tall bars.
        ax.bar(channels, hi - lo, bottom=lo, width=1.0, color=color, alpha=0.75, linewidth=0, label="[min, max] per channel")
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        median = float(np.median(absmax))
        ax.axhline(median, color="k", linestyle="--", linewidth=0.9, label=f"± median absmax ({median:.3g})")
        if lo.min() < 0:  # ReLU outputs (fc2 inputs) have no negative side worth the space
            ax.axhline(-median, color="k", linestyle="--", linewidth=0.9)
        ax.axhline(0, color="0.5", linewidth=0.5)
        ax.set_title(f"{label}: max/median absmax = {outlier_ratio(lo, hi):.2f}", fontsize=10)
        ax.set_ylabel("activation value")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("input channel")
    axes[-1].set_xlim(-0.5, channels.size - 0.5)
    s = stats.smoothing_scale
    fig.suptitle(f"Per-channel activation range of {stats.name} ({why})\n"
                 f"SmoothQuant scale s in [{s.min():.3g}, {s.max():.3g}]; y-axes differ: compare the ratios",
                 fontsize=11)
    return fig


def _clusters_figure(stats: SiteStats, a_bits: int | None):
    from matplotlib.patches import Rectangle

    labels = stats.labels
    clusters = np.unique(labels)
    # Tall enough for one readable row per cluster in the right panel (32 clusters is a common sweep point).
    fig = _figure(12, max(5.5, 1.8 + 0.2 * (clusters.size + 1)))
    ax_scatter, ax_ranges = fig.subplots(1, 2, width_ratios=[1.3, 1])
    star_size = 12 if clusters.size <= 10 else 7
    cmap = _cluster_colors(clusters.size)
    rows = []
    for i, k in enumerate(clusters):
        member = labels == k
        mins, maxs = stats.min[member], stats.max[member]
        color = cmap[i]
        # Past ten clusters a legend entry each would cover the scatter; the right panel names them anyway.
        label = f"cluster {k} ({member.sum()} ch)" if clusters.size <= 10 else None
        ax_scatter.scatter(mins, maxs, s=12, color=color, alpha=0.8, linewidths=0, label=label)
        # Members fill a box in the (min, max) plane; the cluster is quantized with [min of mins, max of
        # maxes], which is that box's top-left corner.
        ax_scatter.add_patch(Rectangle((mins.min(), maxs.min()), np.ptp(mins), np.ptp(maxs), fill=False,
                                       edgecolor=color, linewidth=1.0, linestyle="--"))
        ax_scatter.plot(mins.min(), maxs.max(), marker="*", markersize=star_size, color=color, markeredgecolor="k",
                        markeredgewidth=0.6)
        rows.append((f"cluster {k}", mins.min(), maxs.max(), int(member.sum()), color))
    ax_scatter.plot([], [], "*", color="0.6", markeredgecolor="k", markersize=star_size, label="cluster range [min, max]")
    ax_scatter.set_xlabel("channel min")
    ax_scatter.set_ylabel("channel max")
    ax_scatter.set_title("channels over (min, max), box = cluster extent", fontsize=10)
    ax_scatter.legend(fontsize=7, loc="best")
    ax_scatter.grid(alpha=0.3)

    # The range each cluster is quantized with, widened to contain zero as the quantizer does
    # (qmath.minmax_scale_zero_point), and the resulting step: what the clustering buys.
    # The top bar is the one range a single cluster (per-tensor quantization) would use, for comparison.
    levels = 2**a_bits - 1 if a_bits else None
    rows.sort(key=lambda r: max(r[2], 0.0) - min(r[1], 0.0))  # by step, narrowest at the bottom
    rows.append(("all (1 cluster)", stats.min.min(), stats.max.max(), labels.size, "0.6"))
    for y, (_, lo, hi, n, color) in enumerate(rows):
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        ax_ranges.barh(y, hi0 - lo0, left=lo0, height=0.6, color=color, alpha=0.8)
        step = f", step {(hi0 - lo0) / levels:.3g}" if levels else ""
        ax_ranges.text(hi0, y, f" {n} ch{step}", va="center", fontsize=8)
    ax_ranges.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax_ranges.axvline(0, color="0.5", linewidth=0.5)
    ax_ranges.set_xlabel("quantization range (widened to contain 0)")
    # Room on the right for the text labels, which autoscaling does not count.
    lo_all, hi_all = min(stats.min.min(), 0.0), max(stats.max.max(), 0.0)
    span = hi_all - lo_all or 1.0
    ax_ranges.set_xlim(lo_all - 0.05 * span, hi_all + 0.45 * span)
    ax_ranges.set_title(f"per-cluster range{f' and A{a_bits} step' if a_bits else ''}", fontsize=10)
    ax_ranges.grid(axis="x", alpha=0.3)
    fig.suptitle(f"k-means channel clusters of {stats.name}: {clusters.size} clusters, {labels.size} channels",
                 fontsize=11)
    return fig


def _cluster_colors(n: int) -> list:
    from matplotlib import colormaps

    # tab10/tab20 keep neighbouring clusters distinguishable; beyond 20 a continuous map is the best left.
    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"
    cmap = colormaps[name]
    return [cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]


def _ppl_figure(report: dict):
    from matplotlib.ticker import ScalarFormatter

    sweep = sorted(report["cluster_sweep"], key=lambda r: r["n_clusters"])
    ks = np.array([r["n_clusters"] for r in sweep])
    ppl = np.array([r["ppl"] for r in sweep])
    fig = _figure(7.5, 5)
    ax = fig.subplots()
    ax.plot(ks, ppl, "o-", color="tab:blue", label="W4A4 quantized")
    for k, p in zip(ks, ppl):
        ax.annotate(f"{p:.4g}", (k, p), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ev = report.get("eval", {})
    if "float" in ev:
        ax.axhline(ev["float"]["ppl"], color="k", linestyle="--", label=f"float ({ev['float']['ppl']:.3g})")
    ax.set_yscale("log")
    # Plain numbers on the log axis; within one decade only minor ticks fall in range, so label those too
    # (the default would print 2.6x10^1), but not over several decades where they would pile up.
    lo, hi = ax.get_ylim()
    setters = [ax.yaxis.set_major_formatter] + ([ax.yaxis.set_minor_formatter] if hi / lo < 10 else [])
    for setter in setters:
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        setter(formatter)
    # Sweeps are usually powers of two; a log2 x-axis spaces them evenly but still labels the real k.
    if ks.min() > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("n_clusters (activation ranges per Linear input)")
    ax.set_ylabel("perplexity (log)")
    cfg = report.get("config", {})
    bits = f"W{cfg.get('w_bits') or 16}A{cfg.get('a_bits') or 16}"
    windows = f", {ev['windows']} x {ev['seq_len']} tokens" if "windows" in ev else ""
    ax.set_title(f"{report.get('model', '')} {bits}: perplexity vs. clusters\n(eval text {ev.get('text', '?')}{windows})",
                 fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend()
    return fig
