"""GPTQ's column loop as one Triton kernel per block (CUDA only) against qmath's PyTorch loop."""

from __future__ import annotations

import pytest
import torch

from llmq_fx import gptq_kernel, qmath

needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and gptq_kernel.available(torch.empty(0, device="cuda"))),
    reason="the Triton GPTQ kernel runs on CUDA with Triton installed",
)


def _problem(rows, cols, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * torch.linspace(0.2, 3.0, cols)  # uneven input scales
    w = torch.randn(rows, cols, generator=g)
    return w.to(device), (x.T @ x / len(x)).to(device)


def test_no_kernel_on_the_cpu():
    assert not gptq_kernel.available(torch.empty(3))


@needs_kernel
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("cols", [256, 320])  # 320: a last block of 64 columns
def test_kernel_matches_the_pytorch_loop(monkeypatch, group_size, cols):
    w, h = _problem(96, cols)
    fast = qmath.gptq_quantize_weight(w, h, 4, group_size, act_order=True, block_size=128, clip=True)
    monkeypatch.setattr(gptq_kernel, "available", lambda t: False)
    slow = qmath.gptq_quantize_weight(w, h, 4, group_size, act_order=True, block_size=128, clip=True)
    assert torch.equal(fast[1], slow[1])  # scales are fixed before the loop
    same = (fast[0] == slow[0]).float().mean().item()
    assert same > 0.995, same  # a code on a rounding boundary may move with a fused multiply-add
    err = [((w - qmath.dequantize_weight(*r)) @ h * (w - qmath.dequantize_weight(*r))).sum().item() for r in (fast, slow)]
    assert err[0] == pytest.approx(err[1], rel=0.01)

