"""The ``llmq`` custom ops that quantize-dequantize nodes call.

They are registered with ``torch.library`` (with fake implementations) so that a rewritten graph
still runs eagerly, re-exports with ``torch.export`` and translates to ONNX
``QuantizeLinear``/``DequantizeLinear`` (see ``llmq_fx.export``). The numbers come from
``llmq_fx.qmath``, the one place the quantization math lives.
"""

from __future__ import annotations

import torch

from llmq_fx import qmath

__all__ = ["quantize_dequantize", "quantize_dequantize_dynamic", "dequantize_weight"]


@torch.library.custom_op("llmq::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Static activation QDQ along the last (channel) axis; channels of one cluster share values."""
    return qmath.fake_quantize(x, scale, zero_point, qmin, qmax, axis=-1)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("llmq::quantize_dequantize_dynamic", mutates_args=())
def quantize_dequantize_dynamic(
    x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0, group_size: int = 0
) -> torch.Tensor:
    """Dynamic activation QDQ: scale/zero point from each token's own min/max (times ``clip_ratio``),
    per token or per ``group_size`` consecutive channels of a token."""
    return qmath.dynamic_fake_quantize(x, bits, symmetric, clip_ratio, group_size)


@quantize_dequantize_dynamic.register_fake
def _(x, bits, symmetric, clip_ratio=1.0, group_size=0):
    return torch.empty_like(x)


@torch.library.custom_op("llmq::dequantize_weight", mutates_args=())
def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weight ``[out, in]`` to float; ``scale`` is ``[out]`` or ``[out, in/group]``."""
    return qmath.dequantize_weight(qweight, scale)


@dequantize_weight.register_fake
def _(qweight, scale, bits):
    return torch.empty(qweight.shape, dtype=torch.float32, device=qweight.device)

