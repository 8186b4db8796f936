"""Triton kernels (CUDA) for the two places where the default recipe's time went to kernel launches
and memory passes: GPTQ's column loop and the dynamic activation quantizer. Each computes what its
``qmath`` counterpart computes, which stays the CPU path and the fallback; ``available()`` says
whether they can run (a CUDA tensor and an importable Triton).

**GPTQ's column loop** (``gptq_block``). Inside a block of ``B`` columns, GPTQ rounds column ``i``,
divides its rounding error by ``U[i, i]`` and subtracts ``e * U[i, i:]`` from the block's later
columns, for ``i = 0 .. B-1``. Written as PyTorch ops that is about ten kernel launches a column: on
an H200 the default recipe spent 54 s of 105 s on opt-1.3b's shape launching them (measured, TF32
on), every kernel a few microseconds of work. Rows are independent in that loop (each row's update
reads only its own error), so here one program holds a tile of rows times the whole block in
registers and runs the ``B`` steps itself: one launch per block. Same numbers as ``qmath``'s loop:
IEEE divisions (``div_rn``) and round-half-to-even (``rint``) as ``torch.round``; the products and
differences may be contracted into fused multiply-adds by the compiler, which can move a code whose
value sits on a rounding boundary (tested: codes agree with the PyTorch loop on all but a tiny
fraction of entries, the layer's output error within 1%).

**Dynamic activation QDQ** (``dynamic_qdq``), ``qmath.dynamic_fake_quantize`` in one pass: each
program loads a tile of groups (rows of ``group`` channels), takes each group's min and max, and
writes the quantized-dequantized values, where the PyTorch formula makes about a dozen passes over
the tensor (reductions, division, rounding, clamps, the dequantization, the casts). The walk calls
it for every batch at every site, in the quantized lane and five times more in the activation clip
search: on opt-1.3b's shape (H200, 128 x 2048 tokens) those calls took 37 s of the 67 s walk.
The arithmetic is the formula's operation by operation (IEEE divisions, ``rint``; no operation pair
that a compiler could fuse into a multiply-add), so the result is the same bit for bit (tested).

**The weight scales' clipping search** (``clip_scale``), ``qmath.weight_scale(..., clip=True)``: for each
of ``CLIP_GRID``'s 25 ratios the PyTorch formula makes seven passes over the whole weight (divide,
round, clamp, multiply, subtract, power, sum), 175 in all; on opt-13b's shape that was 6.4 s of the
gptq stage (242 calls, H200, CUDA-synchronized timers). Here one program takes a few rows and, per
ratio, sums the row's rounding error chunk by chunk, keeping the best ratio's scale: one read of the
weight from memory per ratio, nothing written but the scales. The per-element arithmetic is the
formula's (``rint``, IEEE division, a rounded product that cannot contract into the subtraction,
``powf``); the row sums are added in another order, so a row whose two best ratios tie to the last
bit may pick the other one (tested: the picks agree, and where they would not the errors are equal).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "clip_scale", "dynamic_qdq", "gptq_block"]


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except Exception:  # not installed (the CPU wheel of torch brings none), or a broken install
        return None
    return triton, tl, libdevice


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device."""
    return t.is_cuda and _triton() is not None


@functools.lru_cache(maxsize=1)
def _kernel():
    triton, tl, libdevice = _triton()

    @triton.jit
    def gptq_block_kernel(w_ptr, u_ptr, s_ptr, codes_ptr, err_ptr, rows, stride_w, stride_s, s_col_stride,
                          qmin, qmax, B: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, B)
        rmask = r < rows
        tile = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=rmask[:, None], other=0.0)
        for i in range(B):
            col = tl.sum(tl.where(c[None, :] == i, tile, 0.0), axis=1)
            s = tl.load(s_ptr + r * stride_s + i * s_col_stride, mask=rmask, other=1.0)
            q = libdevice.rint(libdevice.div_rn(col, s))
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            u_row = tl.load(u_ptr + i * B + c, mask=c >= i, other=0.0)
            u_ii = tl.load(u_ptr + i * B + i)
            e = libdevice.div_rn(col - q * s, u_ii)
            tl.store(codes_ptr + r * stride_w + i, q, mask=rmask)
            tl.store(err_ptr + r * stride_w + i, e, mask=rmask)
            tile = tile - e[:, None] * u_row[None, :]

    return gptq_block_kernel


def gptq_block(w1: torch.Tensor, u1: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
               codes: torch.Tensor, err: torch.Tensor) -> None:
    """Round the block ``w1`` (``[rows, B]`` float32) with the upper factor ``u1`` (``[B, B]``) and scales
    ``scale`` (``[rows]`` per channel, or ``[rows, B]`` one per column), writing the codes and the
    scaled errors into ``codes`` and ``err`` (``[rows, B]`` float32). ``w1`` is left as it was."""
    rows, b = w1.shape
    if b & (b - 1):
        raise ValueError(f"the Triton GPTQ block needs a power-of-two width, got {b}")
    w1, u1, scale = w1.contiguous(), u1.contiguous(), scale.contiguous()
    per_column = scale.dim() == 2
    rows_per_program = max(1, min(32, 4096 // b))
    grid = (-(-rows // rows_per_program),)
    with torch.cuda.device(w1.device):  # Triton launches on the current device
        _kernel()[grid](
            w1, u1, scale, codes, err, rows, w1.stride(0), scale.stride(0) if per_column else 1, 1 if per_column else 0,
            float(qmin), float(qmax), B=b, ROWS=rows_per_program,
        )


# Widest group one program takes in registers (a whole token when there are no groups); wider: PyTorch.
QDQ_MAX_GROUP = 16384


@functools.lru_cache(maxsize=1)
def _qdq_kernel():
    triton, tl, libdevice = _triton()

    @triton.jit
    def dynamic_qdq_kernel(x_ptr, out_ptr, n_groups, group, qmin, qmax, inv_steps, ratio, eps,
                           SYMMETRIC: tl.constexpr, CLIP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        mask = (r < n_groups)[:, None] & (c < group)[None, :]
        offsets = r[:, None] * group + c[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        if CLIP:
            lo = lo * ratio
            hi = hi * ratio
        lo = tl.minimum(lo, 0.0)  # the range holds zero (qmath.minmax_scale_zero_point)
        hi = tl.maximum(hi, 0.0)
        # PyTorch divides a CUDA tensor by a Python number as a product with its float32 reciprocal
        # (``inv_steps``), so the scale is that product here too.
        if SYMMETRIC:
            scale = tl.maximum(tl.maximum(-lo, hi) * inv_steps, eps)
            zero = tl.zeros_like(scale)
        else:
            scale = tl.maximum((hi - lo) * inv_steps, eps)
            zero = tl.minimum(tl.maximum(libdevice.rint(qmin - libdevice.div_rn(lo, scale)), qmin), qmax)
        q = libdevice.rint(libdevice.div_rn(x, scale[:, None])) + zero[:, None]
        q = tl.minimum(tl.maximum(q, qmin), qmax)
        y = (q - zero[:, None]) * scale[:, None]
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)

    return dynamic_qdq_kernel


def dynamic_qdq(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, clip_ratio: float, group: int,
                eps: float) -> torch.Tensor | None:
    """``x`` (last axis = channels, ``group`` consecutive channels per range) quantized to ``[qmin, qmax]``
    with each group's own min/max (times ``clip_ratio``) and dequantized, in ``x``'s dtype; the formula of
    ``qmath.dynamic_fake_quantize``. ``None`` where this kernel does not take the case (a group wider
    than ``QDQ_MAX_GROUP``, an empty tensor): the caller computes it in PyTorch."""
    if group > QDQ_MAX_GROUP or x.numel() == 0 or x.shape[-1] % group:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    n_groups = x.numel() // group
    block = 1 << (group - 1).bit_length()
    rows = max(1, min(64, 4096 // block))
    grid = (-(-n_groups // rows),)
    steps = qmax if symmetric else qmax - qmin  # qmath.minmax_scale_zero_point: range / steps
    with torch.cuda.device(x.device):  # Triton launches on the current device; a walk may run on another GPU
        _qdq_kernel()[grid](
            x, out, n_groups, group, float(qmin), float(qmax), _reciprocal(steps), float(clip_ratio), float(eps),
            SYMMETRIC=symmetric, CLIP=clip_ratio != 1.0, ROWS=rows, BLOCK=block,
            num_warps=4 if block * rows <= 4096 else min(16, block * rows // 1024),
        )
    return out


@functools.lru_cache(maxsize=None)
def _reciprocal(steps: int) -> float:
    """``1 / steps`` rounded to float32, as PyTorch computes it for a tensor divided by a Python number (once
    per integer range, not per call: the walk calls the kernel thousands of times)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / steps)


@functools.lru_cache(maxsize=1)
def _clip_kernel():
    triton, tl, libdevice = _triton()

    @triton.jit
    def clip_scale_kernel(w_ptr, ratio_ptr, out_ptr, rows, cols, n_ratios, inv_qmax, qmin, qmax, eps, norm,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = r < rows
        c0 = tl.arange(0, BLOCK)
        absmax = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            c = start + c0
            m = rmask[:, None] & (c < cols)[None, :]
            x = tl.load(w_ptr + r[:, None] * cols + c[None, :], mask=m, other=0.0)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        best = tl.full([ROWS], float("inf"), tl.float32)
        scale = tl.maximum(libdevice.mul_rn(absmax, inv_qmax), eps)
        for k in range(n_ratios):
            ratio = tl.load(ratio_ptr + k)
            s = tl.maximum(libdevice.mul_rn(libdevice.mul_rn(absmax, ratio), inv_qmax), eps)
            err = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, cols, BLOCK):
                c = start + c0
                m = rmask[:, None] & (c < cols)[None, :]
                x = tl.load(w_ptr + r[:, None] * cols + c[None, :], mask=m, other=0.0)
                q = libdevice.rint(libdevice.div_rn(x, s[:, None]))
                q = tl.minimum(tl.maximum(q, qmin), qmax)
                e = tl.abs(x - libdevice.mul_rn(q, s[:, None]))
                err += tl.sum(tl.where(m, libdevice.pow(e, norm), 0.0), axis=1)
            better = err < best
            best = tl.where(better, err, best)
            scale = tl.where(better, s, scale)
        tl.store(out_ptr + r, scale, mask=rmask)

    return clip_scale_kernel


def clip_scale(w: torch.Tensor, qmax: int, ratios: tuple[float, ...], norm: float, eps: float) -> torch.Tensor:
    """Per row of ``w`` (``[rows, cols]`` float32): the scale ``max(absmax * ratio / qmax, eps)`` of the
    ratio in ``ratios`` (first wins a tie) that minimizes ``sum |w - clamp(round(w / s)) * s|^norm``;
    ``qmath.weight_scale(..., clip=True)``'s search."""
    w = w.detach().to(torch.float32).contiguous()
    rows, cols = w.shape
    out = torch.empty(rows, dtype=torch.float32, device=w.device)
    if rows == 0:
        return out
    block = min(1024, 1 << max(cols - 1, 1).bit_length())
    per_program = max(1, min(16, 4096 // block))
    with torch.cuda.device(w.device):
        ratio = torch.tensor(ratios, dtype=torch.float32, device=w.device)
        _clip_kernel()[(-(-rows // per_program),)](
            w, ratio, out, rows, cols, len(ratios), _reciprocal(qmax), float(-qmax - 1), float(qmax), float(eps), float(norm),
            ROWS=per_program, BLOCK=block,
        )
    return out
