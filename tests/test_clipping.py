"""Specification of range clipping: ``w_clip`` (per-row clipping search) and ``a_clip_ratio``.

References are written here, independently of ``llmq_fx.qmath``: a brute-force per-row search in
numpy, cluster ranges recomputed from the recorded channel statistics, onnxruntime for the export.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmq_fx
from llmq_fx import qmath
from llmq_fx.errors import ConfigError
from llmq_fx.export import OnnxCausalLM, to_onnx
from conftest import static_config

GRID = [1.0 - 0.02 * i for i in range(25)]


def np_clipped_scale(row: np.ndarray, bits: int) -> tuple[float, float]:
    """Brute force: the shrink of the row's absmax (from GRID) with the least sum |err|^2.4; (scale, error)."""
    qmax = 2 ** (bits - 1) - 1
    best = (None, np.inf)
    for r in GRID:
        s = max(np.float32(np.abs(row).max() * np.float32(r) / np.float32(qmax)), np.float32(1e-8))
        err = float((np.abs(row - np.clip(np.round(row / s), -qmax - 1, qmax) * s) ** 2.4).sum())
        if err < best[1]:
            best = (s, err)
    return best


def _heavy_tailed_weight(out_features=24, in_features=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w[:, :2] *= 8  # a few large columns: the absmax grid wastes most codes
    return w


@pytest.mark.parametrize("bits, group", [(4, None), (4, 16), (3, None), (8, 32)])
def test_weight_clip_matches_brute_force_and_never_hurts(bits, group):
    w = _heavy_tailed_weight()
    q, s = qmath.quantize_weight(w, bits, group, clip=True)
    q0, s0 = qmath.quantize_weight(w, bits, group, clip=False)
    rows = w.numpy().reshape(-1, group or w.shape[1])
    ref = np.array([np_clipped_scale(r, bits)[0] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(s.numpy().reshape(-1), ref, rtol=1e-6)
    err = lambda qq, ss: (w - qmath.dequantize_weight(qq, ss)).abs().pow(2.4).reshape(len(rows), -1).sum(1)
    assert bool((err(q, s) <= err(q0, s0) * (1 + 1e-6)).all())  # ratio 1.0 is in the grid
    if bits == 4:
        assert float(err(q, s).sum()) < 0.9 * float(err(q0, s0).sum())  # and heavy tails gain a lot


def test_gptq_with_clip_uses_clipped_scales():
    w = _heavy_tailed_weight()
    x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(3))
    h = x.T @ x / len(x)
    _, s = qmath.gptq_quantize_weight(w, h, 4, None, act_order=True, clip=True)
    _, s_rtn = qmath.quantize_weight(w, 4, None, clip=True)
    torch.testing.assert_close(s, s_rtn, rtol=0, atol=0)
    # Dynamic groups (no act_order): each group's clipped scale comes from its updated columns; the
    # layer output error tr(E H E^T) stays below round-to-nearest's.
    output_error = lambda w_hat: float(((w - w_hat) @ h * (w - w_hat)).sum())
    w_gptq = qmath.dequantize_weight(*qmath.gptq_quantize_weight(w, h, 4, 16, act_order=False, clip=True))
    w_rtn = qmath.dequantize_weight(*qmath.quantize_weight(w, 4, 16))
    assert torch.isfinite(w_gptq).all()
    assert output_error(w_gptq) < output_error(w_rtn)


def test_static_clip_shrinks_every_cluster_range(opt_gm, calib):
    base = llmq_fx.quantize(opt_gm, calib, static_config(n_clusters=4), progress=False)
    clipped = llmq_fx.quantize(opt_gm, calib, static_config(n_clusters=4, a_clip_ratio=0.8), progress=False)
    scales = {n: b for n, b in base.named_buffers() if n.endswith("_scale") and "llmq_act_" in n}
    assert scales
    for name, s in scales.items():
        s_clip = dict(clipped.named_buffers())[name]
        # Asymmetric ranges contain zero, so [0.8 min, 0.8 max] is 0.8 of the width wherever the
        # scale is above its floor.
        torch.testing.assert_close(s_clip, s * 0.8, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("search", [None, [0.5, 0.7, 0.9, 1.0]])
def test_dynamic_clip_model_exports_and_matches_pytorch(opt_gm, calib, eval_ids, tmp_path, search):
    cfg = llmq_fx.QuantConfig(a_dynamic=True, a_clip_ratio=0.9, w_clip=True, a_clip_search=search)
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    qdq = [n for n in qgm.graph.nodes if n.target == torch.ops.llmq.quantize_dequantize_dynamic.default and "llmq_site" in n.meta]
    if search is None:
        assert qdq and all(n.args[3] == 0.9 for n in qdq)
    else:  # one ratio per site, chosen by the sequential GPTQ pass, each exported as it is
        assert qdq and all(n.args[3] in search and n.meta["llmq_site"].activation.clip_ratio == n.args[3] for n in qdq)
    path = to_onnx(qgm, tmp_path / "clip.onnx", format="qdq")
    with torch.no_grad():
        ref = qgm(eval_ids)
    torch.testing.assert_close(OnnxCausalLM(path)(eval_ids), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2, True, "0.9"])
def test_bad_clip_ratio_is_a_config_error(value):
    with pytest.raises(ConfigError, match="a_clip_ratio"):
        llmq_fx.QuantConfig(a_clip_ratio=value)


def test_bad_w_clip_is_a_config_error():
    with pytest.raises(ConfigError, match="w_clip"):
        llmq_fx.QuantConfig(w_clip="yes")


@pytest.mark.parametrize("group_size", [None, 16])
def test_round_to_scale_is_round_to_nearest_at_given_scales(group_size):
    """GPTQ's record of round-to-nearest reuses its scales: codes equal an independent rounding at them."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    q, scale = qmath.quantize_weight(w, 4, group_size, clip=True)
    s = scale[:, None].expand(24, 64) if group_size is None else scale.repeat_interleave(group_size, dim=1)
    expected = torch.clamp(torch.round(w / s), -8, 7).to(torch.int8)
    assert torch.equal(qmath.round_to_scale(w, scale, 4), expected)
    assert torch.equal(q, expected)
