"""``summary(gm)``: one row per Linear of a (quantized) graph, and a printable table of it."""

from __future__ import annotations

from torch import fx

from llmq_fx.graph import attr, linear_nodes, module_path

__all__ = ["summary", "format_summary"]

_COLUMNS = (
    "module", "role", "in_features", "out_features", "w_bits", "w_group_size", "a_bits", "a_effective_bits", "clusters",
    "smoothed",
)


def summary(gm: fx.GraphModule) -> list[dict]:
    """Rows with ``module``, ``in_features``, ``out_features``, ``w_bits``, ``a_bits``, ``clusters``, ``smoothed``...

    ``a_effective_bits`` is the activation code width averaged over the input channels: ``a_bits``
    unless mixed precision (``a_outlier_bits``) put some clusters at more bits. Works on a float
    graph too (all quantization fields None).
    """
    info = gm.meta.get("llmq_fx", {}).get("linears", {})
    rows = []
    for node in linear_nodes(gm.graph):
        path = module_path(node)
        w = node.args[1]
        if w.op == "get_attr":
            out_f, in_f = attr(gm, w.target).shape
        else:  # dequantize_weight(weight_int, scale, bits)
            out_f, in_f = attr(gm, w.args[0].target).shape
        rec = info.get(path, {})
        rows.append(
            {
                "module": path,
                "role": rec.get("role"),
                "in_features": int(in_f),
                "out_features": int(out_f),
                "w_bits": rec.get("w_bits"),
                "w_group_size": rec.get("w_group_size"),
                "a_bits": rec.get("a_bits"),
                "a_effective_bits": rec.get("a_effective_bits"),
                "clusters": rec.get("clusters"),
                "smoothed": rec.get("smoothed", False),
            }
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    """A fixed-width text table of ``summary`` rows."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return "-" if v is None else str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) if rows else len(c) for c in _COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in _COLUMNS)]
    lines.append("  ".join("-" * widths[c] for c in _COLUMNS))
    for r in rows:
        lines.append("  ".join(cell(r.get(c)).ljust(widths[c]) for c in _COLUMNS))
    return "\n".join(lines)
