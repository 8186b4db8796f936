"""Quantization math shared by the passes, the custom ops, the ONNX export and the tests.

Conventions follow ONNX ``QuantizeLinear``/``DequantizeLinear`` so that PyTorch and onnxruntime
compute the same integers:

* ``q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)``
* ``x_hat = (q - zero_point) * scale``

``torch.round`` rounds half to even, as ONNX does. Division (not multiplication by a reciprocal)
is used on purpose: it is what onnxruntime does, and a reciprocal changes rounding at ties.
"""

from __future__ import annotations

import torch

__all__ = [
    "integer_range",
    "minmax_scale_zero_point",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "dequantize_weight",
    "SCALE_EPS",
]

# Smallest scale: a channel that never moved from zero still gets a finite, positive scale.
SCALE_EPS = 1e-8


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: signed for symmetric, unsigned for asymmetric."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def minmax_scale_zero_point(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map ``[xmin, xmax]`` onto ``bits`` bits.

    The range is widened to contain zero so that zero is exactly representable (padding and ReLU
    zeros stay zeros). Symmetric codes use ``scale = absmax / qmax`` and zero point 0; asymmetric
    codes spread ``[min, max]`` over ``[0, 2^bits - 1]`` with a rounded, clamped zero point.
    """
    qmin, qmax = integer_range(bits, symmetric)
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = (absmax / qmax).clamp_min(SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((xmax - xmin) / (qmax - qmin)).clamp_min(SCALE_EPS)
        zero_point = torch.round(qmin - xmin / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape a per-axis vector so that it broadcasts along ``axis`` of ``x``."""
    if v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis] = v.numel()
    return v.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int = -1
) -> torch.Tensor:
    """Integer codes (int32) of ``x``; ``scale``/``zero_point`` are scalars or vectors along ``axis``."""
    s = _broadcast(scale.to(torch.float32), x, axis)
    z = _broadcast(zero_point.to(torch.float32), x, axis)
    return (torch.round(x.to(torch.float32) / s) + z).clamp(qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = -1) -> torch.Tensor:
    s = _broadcast(scale.to(torch.float32), q, axis)
    z = _broadcast(zero_point.to(torch.float32), q, axis)
    return (q.to(torch.float32) - z) * s


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int = -1
) -> torch.Tensor:
    """Quantize then dequantize, in float32, returned in ``x``'s dtype."""
    s = _broadcast(scale.to(torch.float32), x, axis)
    z = _broadcast(zero_point.to(torch.float32), x, axis)
    q = (torch.round(x.to(torch.float32) / s) + z).clamp(qmin, qmax)
    return ((q - z) * s).to(x.dtype)


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight quantization, per output channel or per group of input channels.

    Returns ``(qweight, scale)``: ``qweight`` int8 ``[out, in]`` holding values in
    ``[-2^(bits-1), 2^(bits-1)-1]``; ``scale`` float32 ``[out]`` (per channel) or
    ``[out, in // group_size]`` (grouped, the ONNX blocked layout along axis 1).
    """
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32)
    qmin, qmax = integer_range(bits, symmetric=True)
    if group_size is None:
        absmax = w.abs().amax(dim=1)
        scale = (absmax / qmax).clamp_min(SCALE_EPS)
        q = torch.round(w / scale[:, None]).clamp(qmin, qmax)
    else:
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features={in_features}")
        wg = w.reshape(out_features, in_features // group_size, group_size)
        scale = (wg.abs().amax(dim=2) / qmax).clamp_min(SCALE_EPS)
        q = torch.round(wg / scale[:, :, None]).clamp(qmin, qmax).reshape(out_features, in_features)
    return q.to(torch.int8), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight from ``quantize_weight``'s output; the layout of ``scale`` says per-channel or grouped."""
    q = qweight.to(torch.float32)
    if scale.dim() == 1:
        return q * scale[:, None]
    out_features, in_features = q.shape
    n_groups = scale.shape[1]
    return (q.reshape(out_features, n_groups, in_features // n_groups) * scale[:, :, None]).reshape(
        out_features, in_features
    )
