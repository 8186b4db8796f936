"""ONNX translations of the ``llmq`` custom ops, for ``torch.onnx.export(custom_translation_table=...)``.

* ``llmq.quantize_dequantize(x, scale, zero_point, qmin, qmax)`` becomes
  ``QuantizeLinear -> DequantizeLinear`` along the last axis (per-axis scale and zero point).
* ``llmq.quantize_dequantize_dynamic(x, bits, symmetric, clip_ratio, group_size)`` becomes the per-token range subgraph
  ``ReduceMin/ReduceMax(axis=-1) -> scale, zero point -> QuantizeLinear -> DequantizeLinear``
  (``DynamicQuantizeLinear`` is UINT8 and per-tensor only, so it cannot express 4-bit per-token codes).
* ``llmq.dequantize_weight(weight_int, scale, bits)`` becomes ``DequantizeLinear`` of the integer
  weight: per output channel (``axis=0``) or blocked (``axis=1, block_size=G``).

The integer element type is chosen from the code's range: a range that fits 4 bits is UINT4/INT4,
anything wider UINT8/INT8. ``QuantizeLinear`` saturates to the *type's* range, so a narrower code
(2 or 3 bits) first clamps ``x`` to the float image of ``[qmin, qmax]``; that is exactly
``qmath.fake_quantize``'s clamp, because ``round(((qmin - z) * s) / s) == qmin - z``.

The zero point and the weight are cast to the ONNX integer type inside the function; the exporter
then folds those casts of initializers into real INT4/INT8 initializers
(``llmq_fx.export.onnx_export``), so no float weight is quantized at run time.
"""

from __future__ import annotations

import logging

import onnx
import torch
from onnxscript import opset21 as op

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx import qmath
from llmq_fx.spec import ActivationSpec

__all__ = [
    "onnx_integer_type",
    "quantize_dequantize_onnx",
    "quantize_dequantize_dynamic_onnx",
    "dequantize_weight_onnx",
    "TRANSLATION_TABLE",
    "FAST_TRANSLATION_TABLE",
]

logger = logging.getLogger(__name__)

# (ONNX element type, its integer range), narrowest first: the first one that holds a code wins.
_INTEGER_TYPES = (
    (onnx.TensorProto.UINT4, 0, 15),
    (onnx.TensorProto.INT4, -8, 7),
    (onnx.TensorProto.UINT8, 0, 255),
    (onnx.TensorProto.INT8, -128, 127),
)


def onnx_integer_type(qmin: int, qmax: int) -> tuple[int, int, int]:
    """``(onnx element type, type min, type max)`` of the narrowest ONNX integer type holding ``[qmin, qmax]``."""
    for elem_type, lo, hi in _INTEGER_TYPES:
        if lo <= qmin and qmax <= hi:
            return elem_type, lo, hi
    raise ValueError(f"integer range [{qmin}, {qmax}] does not fit an 8-bit ONNX type")


def _clamp_to_codes(x, scale, zero_point_float, qmin: int, qmax: int):
    """Clamp ``x`` to the float image ``[(qmin - z) s, (qmax - z) s]`` of a code range narrower than its
    ONNX type (2- and 3-bit codes held in 4-bit types): QuantizeLinear saturates at the *type's*
    bounds only, so without this a 3-bit code could take 4-bit values."""
    lo = op.Mul(op.Sub(op.Constant(value_float=float(qmin)), zero_point_float), scale)
    hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zero_point_float), scale)
    return op.Min(op.Max(x, lo), hi)


def quantize_dequantize_onnx(x, scale, zero_point, qmin: int, qmax: int):
    """Activation QDQ along the last axis, as ``torch.ops.llmq.quantize_dequantize``."""
    elem_type, type_min, type_max = onnx_integer_type(qmin, qmax)
    if (qmin, qmax) != (type_min, type_max):
        x = _clamp_to_codes(x, scale, op.Cast(zero_point, to=onnx.TensorProto.FLOAT), qmin, qmax)
    zp = op.Cast(zero_point, to=elem_type)
    q = op.QuantizeLinear(x, scale, zp, axis=-1)
    return op.DequantizeLinear(q, scale, zp, axis=-1)


def quantize_dequantize_dynamic_onnx(x, bits: int, symmetric: bool, clip_ratio: float = 1.0, group_size: int = 0,
                                     integer_codes: bool = True):
    """Per-token QDQ, as ``torch.ops.llmq.quantize_dequantize_dynamic`` (``qmath.dynamic_fake_quantize``):
    the op's arguments are read back into the ``spec.ActivationSpec`` they were built from.

    The range of each token (last axis) is reduced at run time and turned into a scale and zero
    point with ``qmath.minmax_scale_zero_point``'s formulas, op for op (division, round half to
    even, clamp to ``SCALE_EPS``), so onnxruntime computes the same floats as PyTorch. The
    ``[..., 1]`` scale is a *blocked* QuantizeLinear/DequantizeLinear scale (``axis=-1``,
    ``block_size=channels``: one block per token), which keeps the codes real UINT4/INT4 tensors;
    onnxruntime runs it bit-exact with its QDQ fusion on or off. Symmetric codes have no zero
    point: ``output_dtype`` names the signed type. A ``clip_ratio`` other than 1 multiplies the
    reduced min and max (float32, as in PyTorch); values beyond saturate in QuantizeLinear.
    With ``group_size`` > 0 the channels are first reshaped to ``[..., channels / G, G]`` (``Reshape``
    copying the leading dims), the same subgraph runs with one block per group, and the result is
    reshaped back.

    ``integer_codes=False`` (the ``fast`` format) computes the same values with float ops only:
    ``(clip(round(x / s) + z, qmin, qmax) - z) * s``, the formula of ``qmath.dynamic_fake_quantize``,
    instead of QuantizeLinear/DequantizeLinear to and from a UINT4 tensor. onnxruntime has no kernel
    that multiplies 4-bit activations, so both forms end in a float tensor of 4-bit levels; the float
    form skips packing and unpacking 4-bit codes (measured on this CPU: 0.55 ms against 0.77 ms per
    [512, 576] activation, bit-identical results).
    """
    spec = ActivationSpec.from_op_args(bits, symmetric, clip_ratio, group_size)
    channels = x.shape[-1]
    if not isinstance(channels, int):
        raise ValueError(f"dynamic activation QDQ needs a static channel count, got shape {x.shape}")
    if spec.group_size:
        g = spec.group_size
        if channels % g:
            raise ValueError(f"activation group size {g} does not divide {channels} channels")
        lead = [0] * (len(x.shape) - 1)  # Reshape's 0: copy that dim (batch, sequence stay dynamic)
        grouped = op.Reshape(x, op.Constant(value_ints=lead + [channels // g, g]))
        out = op.Reshape(_dynamic_rows(grouped, g, spec, integer_codes), op.Constant(value_ints=lead + [channels]))
        if not integer_codes and (spec.bits, spec.symmetric, spec.clip_ratio) == (8, True, 1.0):
            # What MatMulNBits does to its input at accuracy level 4 (int8 per block, absmax / 127): tagged
            # so that onnx_export hands it to the kernel when this feeds one with blocks of this group.
            out.producer().metadata_props["llmq.int8_kernel_input"] = str(g)
            grouped.producer().metadata_props["llmq.int8_kernel_input_start"] = str(g)
        return out
    return _dynamic_rows(x, channels, spec, integer_codes)


def _dynamic_rows(x, channels: int, spec: ActivationSpec, integer_codes: bool = True):
    """QDQ with one range per row of ``channels`` values (the last axis of ``x``)."""
    symmetric, clip_ratio = spec.symmetric, spec.clip_ratio
    qmin, qmax = spec.qrange
    elem_type, type_min, type_max = onnx_integer_type(qmin, qmax)
    last_axis = op.Constant(value_ints=[-1])
    zero = op.Constant(value_float=0.0)
    lo = op.ReduceMin(x, last_axis, keepdims=1)
    hi = op.ReduceMax(x, last_axis, keepdims=1)
    if clip_ratio != 1.0:
        ratio = op.Constant(value_float=float(clip_ratio))
        lo = op.Mul(lo, ratio)
        hi = op.Mul(hi, ratio)
    # Widened to contain zero, as minmax_scale_zero_point does: zero stays exactly representable.
    lo = op.Min(lo, zero)
    hi = op.Max(hi, zero)
    eps = op.Constant(value_float=qmath.SCALE_EPS)
    if symmetric:
        scale = op.Max(op.Div(op.Max(op.Neg(lo), hi), op.Constant(value_float=float(qmax))), eps)
        if not integer_codes:
            return _fake_quantize(x, scale, None, qmin, qmax)
        zero_point = zero
    else:
        scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(qmax - qmin))), eps)
        if not integer_codes:
            # Codes clamped around zero instead of shifted by the zero point z = round(qmin - lo / s):
            # with qmin = 0 (every unsigned range), -z = round(lo / s) (round half to even is odd), and on
            # integers, held exactly, clip(round(x / s) + z, 0, qmax) - z = clip(round(x / s), -z, qmax - z).
            # The same floats as qmath's formula with two nodes and one full-size pass fewer per site.
            if qmin != 0:
                raise ValueError(f"asymmetric activation codes start at 0, got [{qmin}, {qmax}]")
            low = op.Round(op.Div(lo, scale))
            high = op.Add(low, op.Constant(value_float=float(qmax)))
            return op.Mul(op.Min(op.Max(op.Round(op.Div(x, scale)), low), high), scale)
        # qmath clamps this to [qmin, qmax]; here that clamp is a no-op, so it is left out: lo <= 0 <= hi
        # and scale >= (hi - lo) / (qmax - qmin) give -lo / scale in [0, qmax - qmin], so qmin - lo / scale
        # rounds into [qmin, qmax].
        zero_point = op.Round(op.Sub(op.Constant(value_float=float(qmin)), op.Div(lo, scale)))
    if (qmin, qmax) != (type_min, type_max):
        x = _clamp_to_codes(x, scale, zero_point, qmin, qmax)
    if symmetric:
        q = op.QuantizeLinear(x, scale, axis=-1, block_size=channels, output_dtype=elem_type)
        return op.DequantizeLinear(q, scale, axis=-1, block_size=channels)
    zp = op.Cast(zero_point, to=elem_type)
    q = op.QuantizeLinear(x, scale, zp, axis=-1, block_size=channels)
    return op.DequantizeLinear(q, scale, zp, axis=-1, block_size=channels)


def _fake_quantize(x, scale, zero_point_float, qmin: int, qmax: int):
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s`` in float ops (``qmath.fake_quantize``); z None = 0."""
    q = op.Round(op.Div(x, scale))
    if zero_point_float is not None:
        q = op.Add(q, zero_point_float)
    q = op.Clip(q, op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
    if zero_point_float is not None:
        q = op.Sub(q, zero_point_float)
    return op.Mul(q, scale)


def quantize_dequantize_fast(x, scale, zero_point, qmin: int, qmax: int):
    """Static activation fake quantization in float ops (the ``fast`` format of ``quantize_dequantize_onnx``):
    ``clip(round(x / s), qmin - z, qmax - z) * s``, which on integers (held exactly) is ``(clip(round(x / s)
    + z, qmin, qmax) - z) * s``; the bounds are constants onnxruntime folds, so the full-size passes are
    five (division, rounding, the two bounds, the product) instead of six."""
    z = op.Cast(zero_point, to=onnx.TensorProto.FLOAT)
    low = op.Sub(op.Constant(value_float=float(qmin)), z)
    high = op.Sub(op.Constant(value_float=float(qmax)), z)
    return op.Mul(op.Min(op.Max(op.Round(op.Div(x, scale)), low), high), scale)


def quantize_dequantize_dynamic_fast(x, bits: int, symmetric: bool, clip_ratio: float = 1.0, group_size: int = 0):
    """Dynamic activation fake quantization in float ops (see ``quantize_dequantize_dynamic_onnx``)."""
    return quantize_dequantize_dynamic_onnx(x, bits, symmetric, clip_ratio, group_size, integer_codes=False)


def dequantize_weight_onnx(weight_int, scale, bits: int):
    """Symmetric weight dequantization, as ``torch.ops.llmq.dequantize_weight`` (zero point 0)."""
    elem_type, _, _ = onnx_integer_type(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    w = op.Cast(weight_int, to=elem_type)
    if len(scale.shape) == 1:
        return op.DequantizeLinear(w, scale, axis=0)
    # Grouped scale [out, in/G]: ONNX blocked quantization along the input axis.
    in_features, n_groups = weight_int.shape[1], scale.shape[1]
    if not isinstance(in_features, int) or not isinstance(n_groups, int):
        raise ValueError(f"grouped weight needs static shapes, got weight {weight_int.shape} and scale {scale.shape}")
    return op.DequantizeLinear(w, scale, axis=1, block_size=in_features // n_groups)


TRANSLATION_TABLE = {
    torch.ops.llmq.quantize_dequantize.default: quantize_dequantize_onnx,
    torch.ops.llmq.quantize_dequantize_dynamic.default: quantize_dequantize_dynamic_onnx,
    torch.ops.llmq.dequantize_weight.default: dequantize_weight_onnx,
}
"""``custom_translation_table`` for ``torch.onnx.export``: llmq custom op -> ONNX function (standard QDQ)."""

def rms_norm_fast(x, weight, eps: float):
    """``llmq.rms_norm`` as onnxruntime's ``SimplifiedLayerNormalization`` (float32 statistics)."""
    from llmq_fx.export.contrib import SimplifiedLayerNormalization

    return SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=float(eps), stash_type=1)


def group_query_attention_fast(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache,
                               sin_cache, position_ids, num_heads: int, kv_heads: int, scale: float):
    """``llmq.group_query_attention`` as ``com.microsoft.GroupQueryAttention`` (``do_rotary`` with caches)."""
    from llmq_fx.export.contrib import GroupQueryAttention

    if cos_cache is None:
        return GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_length,
                                   num_heads=num_heads, kv_num_heads=kv_heads, scale=float(scale))
    return GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                               position_ids, num_heads=num_heads, kv_num_heads=kv_heads, scale=float(scale),
                               do_rotary=1, rotary_interleaved=0)


FAST_TRANSLATION_TABLE = {
    torch.ops.llmq.quantize_dequantize.default: quantize_dequantize_fast,
    torch.ops.llmq.quantize_dequantize_dynamic.default: quantize_dequantize_dynamic_fast,
    torch.ops.llmq.dequantize_weight.default: dequantize_weight_onnx,  # then rewritten to MatMulNBits
    torch.ops.llmq.rms_norm.default: rms_norm_fast,
    torch.ops.llmq.group_query_attention.default: group_query_attention_fast,
}
"""The ``fast`` format: activations fake-quantized in float ops; weights as in ``TRANSLATION_TABLE``,
which ``onnx_export`` then rewrites with the MatMul reading them into ``com.microsoft.MatMulNBits``."""
