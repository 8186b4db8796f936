"""GPTQ's inner loop over one block of columns as one Triton kernel (CUDA), the same math as ``qmath``'s loop.

Inside a block of ``B`` columns, GPTQ rounds column ``i``, divides its rounding error by ``U[i, i]``
and subtracts ``e * U[i, i:]`` from the block's later columns, for ``i = 0 .. B-1``. Written as
PyTorch ops that is about ten kernel launches a column: on an H200 the default recipe spent 54 s
of 105 s on opt-1.3b's shape launching them (measured, TF32 on), every kernel a few microseconds
of work. Rows are independent in that loop (each row's update reads only its own error), so here one
program holds a tile of rows times the whole block in registers and runs the ``B`` steps itself:
one launch per block.

Same numbers as ``qmath``'s loop: IEEE divisions (``div_rn``) and round-half-to-even (``rint``) as
``torch.round``; the products and differences may be contracted into fused multiply-adds by the
compiler, which can move a code whose value sits on a rounding boundary (tested: codes agree with
the PyTorch loop on all but a tiny fraction of entries, the layer's output error within 1%).
``available()`` says whether it can run (a CUDA tensor and an importable Triton); ``qmath`` falls
back to its PyTorch loop otherwise, and on the CPU.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "gptq_block"]


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
    """Whether ``gptq_block`` can run on ``t``'s device."""
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
    _kernel()[grid](
        w1, u1, scale, codes, err, rows, w1.stride(0), scale.stride(0) if per_column else 1, 1 if per_column else 0,
        float(qmin), float(qmax), B=b, ROWS=rows_per_program,
    )
