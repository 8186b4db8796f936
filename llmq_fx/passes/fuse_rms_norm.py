"""RMSNorm fusion pass: an RMS normalization computed op by op becomes one ``llmq.rms_norm`` node.

Pattern: ``weight * (x * rsqrt(mean(x^2, -1, keepdim) + eps))`` with casts anywhere in between and
``x^2`` as ``pow(x, 2)`` or ``x * x`` -- Llama's RMSNorm as ``torch.export`` decomposes it, and the
RMS form ``RotatePass`` gives OPT's LayerNorms.

Rewrite: ``llmq.rms_norm(x, weight, eps)``, the same float32 computation in one node, which the ``fast``
ONNX format writes as onnxruntime's ``SimplifiedLayerNormalization``. Used on the KV-cache decoder at
export (``export.decoder``): at one token per step a decode is dominated by the number of nodes
onnxruntime runs, and each norm is six of them.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx.graph import norm_affine

__all__ = ["FuseRMSNormPass", "rms_norm_parts"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


def _uncast(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def rms_norm_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``(x, weight, eps)`` when ``node`` is the last op of an RMSNorm (see the module docstring), else None."""
    affine = norm_affine(node)
    if affine is None or affine.kind != "rms_norm":
        return None
    other = node.args[1] if node.args[0] is affine.scale else node.args[0]
    y = _uncast(other)
    if not (y.op == "call_function" and y.target == aten.mul.Tensor and len(y.args) == 2):
        return None
    a, b = y.args
    rs, x = (a, b) if getattr(a, "target", None) == aten.rsqrt.default else (b, a)
    if getattr(rs, "target", None) != aten.rsqrt.default or not isinstance(x, fx.Node):
        return None
    add = rs.args[0]
    if not (add.op == "call_function" and add.target == aten.add.Tensor and isinstance(add.args[1], (int, float))):
        return None
    mean = add.args[0]
    if not (mean.op == "call_function" and mean.target == aten.mean.dim and list(mean.args[1]) in ([-1],)
            and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))):
        return None
    square = mean.args[0]
    if square.target == aten.pow.Tensor_Scalar and square.args[1] == 2:
        base = square.args[0]
    elif square.target == aten.mul.Tensor and square.args[0] is square.args[1]:
        base = square.args[0]
    else:
        return None
    if _uncast(base) is not _uncast(x):
        return None
    return x, affine.scale, float(add.args[1])  # scale: the weight, or Gemma's 1 + weight node


class FuseRMSNormPass(PassBase):
    """Replace every op-by-op RMSNorm by one ``llmq.rms_norm`` node."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            parts = rms_norm_parts(node)
            if parts is None:
                continue
            x, weight, eps = parts
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(torch.ops.llmq.rms_norm.default, (x, weight, eps))
            fused.meta = dict(node.meta)
            node.replace_all_uses_with(fused)
            count += 1
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        logger.debug("fused %d RMSNorms", count)
        return PassResult(gm, bool(count))
