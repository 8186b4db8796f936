"""The Triton kernels (CUDA only) against qmath's PyTorch formulas: GPTQ's column loop, the dynamic activation QDQ."""

from __future__ import annotations

import pytest
import torch

from llmq_fx import kernels, qmath

needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.available(torch.empty(0, device="cuda"))),
    reason="the Triton kernels run on CUDA with Triton installed",
)


def _problem(rows, cols, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * torch.linspace(0.2, 3.0, cols)  # uneven input scales
    w = torch.randn(rows, cols, generator=g)
    return w.to(device), (x.T @ x / len(x)).to(device)


def test_no_kernel_on_the_cpu():
    assert not kernels.available(torch.empty(3))


@needs_kernel
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("cols", [256, 320])  # 320: a last block of 64 columns
def test_kernel_matches_the_pytorch_loop(monkeypatch, group_size, cols):
    w, h = _problem(96, cols)
    fast = qmath.gptq_quantize_weight(w, h, 4, group_size, act_order=True, block_size=128, clip=True)
    monkeypatch.setattr(kernels, "available", lambda t: False)
    slow = qmath.gptq_quantize_weight(w, h, 4, group_size, act_order=True, block_size=128, clip=True)
    assert torch.equal(fast[1], slow[1])  # scales are fixed before the loop
    same = (fast[0] == slow[0]).float().mean().item()
    assert same > 0.995, same  # a code on a rounding boundary may move with a fused multiply-add
    err = [((w - qmath.dequantize_weight(*r)) @ h * (w - qmath.dequantize_weight(*r))).sum().item() for r in (fast, slow)]
    assert err[0] == pytest.approx(err[1], rel=0.01)



@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip_ratio", [1.0, 0.85])
@pytest.mark.parametrize("channels, group_size", [(2048, 64), (576, 64), (576, 0), (8192, 0), (96, 32)])
def test_dynamic_qdq_kernel_is_the_pytorch_formula(monkeypatch, dtype, symmetric, clip_ratio, channels, group_size):
    g = torch.Generator(device="cuda").manual_seed(channels + group_size)
    x = torch.randn(3, 50, channels, device="cuda", generator=g) * torch.rand(channels, device="cuda", generator=g).exp()
    x[0, 0] = 0.0  # a token of zeros: the smallest scale
    x[0, 1] = 2.5  # one value everywhere
    x[1, :, :7] *= 40.0  # outlier channels
    x = x.to(dtype)
    fast = qmath.dynamic_fake_quantize(x, 4, symmetric, clip_ratio, group_size)
    monkeypatch.setattr(kernels, "available", lambda t: False)
    slow = qmath.dynamic_fake_quantize(x, 4, symmetric, clip_ratio, group_size)
    assert fast.dtype == slow.dtype == dtype
    assert torch.equal(fast, slow)


@needs_kernel
def test_dynamic_qdq_kernel_leaves_wide_rows_to_pytorch():
    x = torch.randn(2, kernels.QDQ_MAX_GROUP * 2, device="cuda")
    assert kernels.dynamic_qdq(x, -8, 7, True, 1.0, x.shape[-1], qmath.SCALE_EPS) is None
    assert torch.isfinite(qmath.dynamic_fake_quantize(x, 4, True)).all()  # PyTorch took it


@needs_kernel
@pytest.mark.parametrize("rows, cols", [(96, 256), (4000, 32), (7, 3000), (33, 64)])
def test_clip_scale_kernel_picks_the_pytorch_search_ratio(monkeypatch, rows, cols):
    g = torch.Generator(device="cuda").manual_seed(rows + cols)
    w = torch.randn(rows, cols, device="cuda", generator=g) * torch.rand(rows, 1, device="cuda", generator=g).exp()
    w[0] = 0.0  # an all-zero row: the smallest scale
    w[1, :5] *= 30.0  # outliers: a clipped pick
    w[2] = 0.25  # one value everywhere
    fast = qmath.weight_scale(w, 7, clip=True)
    monkeypatch.setattr(kernels, "available", lambda t: False)
    slow = qmath.weight_scale(w, 7, clip=True)
    assert fast.shape == slow.shape == (rows,) and fast[0] == qmath.SCALE_EPS
    same = fast == slow
    assert same.float().mean() >= 0.99, same.float().mean()
    # Where a pick differs, the two ratios' errors tie (to float32 rounding of the row sums).
    def err(s):
        q = torch.round(w.double() / s.double()[:, None]).clamp(-8, 7)
        return (w.double() - q * s.double()[:, None]).abs().pow(qmath.CLIP_NORM).sum(1)
    assert torch.allclose(err(fast)[~same], err(slow)[~same], rtol=1e-5)
    assert (slow[1] < w[1].abs().max() / 7) and (fast[1] < w[1].abs().max() / 7)  # the outlier row is clipped
