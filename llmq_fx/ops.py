"""The ``llmq`` custom ops that quantize-dequantize nodes call, and the fused ops of the KV-cache decoder.

They are registered with ``torch.library`` (with fake implementations) so that a rewritten graph
still runs eagerly, re-exports with ``torch.export`` and translates to ONNX (see ``llmq_fx.export``):
the QDQ ops to ``QuantizeLinear``/``DequantizeLinear`` (or float ops, or MatMulNBits), ``rms_norm`` and
``group_query_attention`` to onnxruntime's ``SimplifiedLayerNormalization`` and
``com.microsoft.GroupQueryAttention``. The quantization numbers come from ``llmq_fx.qmath``, the one
place the quantization math lives.
"""

from __future__ import annotations

import torch

from llmq_fx import qmath

__all__ = ["quantize_dequantize", "quantize_dequantize_dynamic", "dequantize_weight", "rms_norm", "group_query_attention"]


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


# -- fused ops of the KV-cache decoder (``llmq_fx.passes.fuse_rms_norm`` / ``fuse_attention``) ----------
@torch.library.custom_op("llmq::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` in float32, the RMSNorm the graph computed op by op
    (exported as ``SimplifiedLayerNormalization``)."""
    xf = x.float()
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("llmq::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    seqlens_k: torch.Tensor, total_length: torch.Tensor, cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None, position_ids: torch.Tensor | None, num_heads: int, kv_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention over a KV cache, as onnxruntime's ``com.microsoft.GroupQueryAttention``.

    ``query`` ``[B, S, num_heads * D]``, ``key``/``value`` ``[B, S, kv_heads * D]`` (the new tokens),
    ``past_key``/``past_value`` ``[B, kv_heads, P, D]``. Returns the attention output ``[B, S,
    num_heads * D]`` and the grown caches ``[B, kv_heads, P + S, D]``. Query ``i`` sits at position
    ``seqlens_k + 1 - S + i`` of its sequence and attends to the keys up to it (``seqlens_k`` =
    valid length - 1 per sequence, the onnxruntime convention; unpadded or right-padded batches).
    Each key/value head serves ``num_heads / kv_heads`` query heads. With ``cos_cache``/``sin_cache``
    (``[max_positions, D / 2]``), query and key are first rotated (RoPE, halves rotated, not
    interleaved) at ``position_ids`` (``[B, S]``), as the op's ``do_rotary``.
    """
    b, s, _ = query.shape
    d = past_key.shape[-1]
    q = query.view(b, s, num_heads, d).transpose(1, 2)
    k_new = key.view(b, s, kv_heads, d).transpose(1, 2)
    if cos_cache is not None and sin_cache is not None and position_ids is not None:
        cos = torch.cat([cos_cache[position_ids]] * 2, -1)[:, None]  # [B, 1, S, D]
        sin = torch.cat([sin_cache[position_ids]] * 2, -1)[:, None]

        def rotate(x):
            half = x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

        q, k_new = rotate(q), rotate(k_new)
    k = torch.cat([past_key, k_new], 2)
    v = torch.cat([past_value, value.view(b, s, kv_heads, d).transpose(1, 2)], 2)
    total = k.shape[2]
    valid = seqlens_k.to(torch.long) + 1  # [B]
    keys = torch.arange(total, device=query.device)
    queries = valid[:, None] - s + torch.arange(s, device=query.device)[None, :]  # [B, S] positions
    mask = (keys[None, None, :] <= queries[:, :, None]) & (keys[None, None, :] < valid[:, None, None])
    group = num_heads // kv_heads
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask[:, None], scale=scale
    )
    return out.transpose(1, 2).reshape(b, s, num_heads * d), k, v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, position_ids,
      num_heads, kv_heads, scale):
    b, s, _ = query.shape
    grown = past_key.shape[2] + s
    present = past_key.new_empty(past_key.shape[0], past_key.shape[1], grown, past_key.shape[3])
    return query.new_empty(query.shape), present, present.new_empty(present.shape)
