"""GPTQ: the observer Hessian, the column-wise error compensation, and the pass in the pipeline."""

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

import llmq_fx
from llmq_fx import qmath
from llmq_fx.calibrate import calibrate
from llmq_fx.graph import linear_nodes, module_path, observer_sites
from llmq_fx.passes import GPTQPass, InsertObserversPass
from llmq_fx.spec import WeightSpec
from llmq_fx.stats import ActivationObserver
from conftest import static_config

DEQ_W = torch.ops.llmq.dequantize_weight.default
LAYOUTS = [(None, False), (None, True), (8, False), (8, True)]  # (group size, act order)


def correlated_inputs(n_tokens=256, channels=32, seed=0):
    """Tokens with correlated channels of very different magnitudes, like a Linear's input."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) / channels**0.5 + 0.5 * torch.eye(channels)
    return torch.randn(n_tokens, channels, generator=g) @ mix * torch.exp(torch.randn(channels, generator=g))


def naive_gptq_codes(w, h, bits, group_size, act_order, damp):
    """Independent reference in float64: the OBS update with an explicit inverse per step, no Cholesky, no blocks.

    After rounding column j, the columns F not yet rounded move by ``-err_j * inv(H_FF)[j, :] / inv(H_FF)[j, j]``.
    """
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    qmax = 2 ** (bits - 1) - 1
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    g = group_size or n
    scale = w.reshape(w.shape[0], -1, g).abs().amax(2) / qmax  # static: from W before any update
    codes = torch.zeros_like(w)
    for k, j in enumerate(order.tolist()):
        rest = order[k:]
        hinv = torch.linalg.inv(h[rest][:, rest])
        if group_size is not None and not act_order and j % g == 0:  # dynamic: from the updated group
            scale[:, j // g] = w[:, j:j + g].abs().amax(1) / qmax
        s = scale[:, j // g]
        codes[:, j] = torch.round(w[:, j] / s).clamp(-qmax - 1, qmax)
        err = (w[:, j] - codes[:, j] * s) / hinv[0, 0]
        w[:, rest] -= err[:, None] * hinv[0][None, :]
    return codes, scale.squeeze(1) if group_size is None else scale


# ---- qmath.gptq_quantize_weight --------------------------------------------------------------
@pytest.mark.parametrize("group_size, act_order", LAYOUTS)
@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_gptq_equals_naive_obs_reference(group_size, act_order, block_size):
    x = correlated_inputs()
    x[:, 3] = 0  # a dead input channel
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    h = x.T @ x / len(x)
    ref_codes, ref_scale = naive_gptq_codes(w, h, 4, group_size, act_order, 0.01)
    q, scale = qmath.gptq_quantize_weight(w, h, 4, group_size, act_order, 0.01, block_size)
    # float32 vs float64 may flip a code at an exact rounding tie; none occurs with this seed
    assert int((q.double() != ref_codes).sum()) <= 1
    np.testing.assert_allclose(scale.numpy(), ref_scale.numpy(), rtol=1e-5)
    assert (q[:, 3] == 0).all()  # dead column zeroed


@pytest.mark.parametrize("group_size, act_order", LAYOUTS)
def test_gptq_output_error_below_round_to_nearest(group_size, act_order):
    x = correlated_inputs()
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    h = x.T @ x / len(x)

    def output_error(w_hat):
        return float(((x @ w.T - x @ w_hat.T) ** 2).sum())

    rtn = output_error(qmath.dequantize_weight(*qmath.quantize_weight(w, 4, group_size)))
    gptq = output_error(qmath.dequantize_weight(*qmath.gptq_quantize_weight(w, h, 4, group_size, act_order)))
    assert gptq < 0.8 * rtn, (rtn, gptq)


@pytest.mark.parametrize("group_size, act_order", LAYOUTS)
def test_diagonal_hessian_is_round_to_nearest(group_size, act_order):
    # Uncorrelated inputs: rounding one column says nothing about the others, nothing is compensated.
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    h = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(5)) + 0.5)
    q, scale = qmath.gptq_quantize_weight(w, h, 4, group_size, act_order)
    ref_q, ref_scale = qmath.quantize_weight(w, 4, group_size)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("group_size", [None, 8])
def test_codes_layout_and_dequantize_op(group_size):
    x = correlated_inputs()
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(6))
    q, scale = qmath.gptq_quantize_weight(w, x.T @ x, 3, group_size)
    assert q.dtype == torch.int8 and q.shape == (12, 32)
    assert int(q.min()) >= -4 and int(q.max()) <= 3
    assert scale.dtype == torch.float32 and scale.shape == ((12,) if group_size is None else (12, 32 // 8))
    assert torch.equal(DEQ_W(q, scale, 3), qmath.dequantize_weight(q, scale))


@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_factor_against_explicit_inverse(act_order):
    """One float64 Cholesky serves both uses: ``gptq_upper()`` is upper with ``U^T U`` the inverse of the damped
    Hessian in visiting order, and ``solve`` is the damped system's solution, each against ``torch.linalg.inv``
    / ``solve`` of the matrix built by hand (dead input set to 1, damping on the mean diagonal)."""
    x = correlated_inputs()
    x[:, 5] = 0
    h = x.T @ x / len(x)
    f = qmath.hessian_factor(h, 0.01, act_order)
    ref = h.double().clone()
    ref[5, 5] = 1.0
    ref += 0.01 * ref.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    order = torch.argsort(ref.diagonal(), descending=True, stable=True) if act_order else torch.arange(32)
    assert torch.equal(f.order, order)
    u = f.gptq_upper()
    assert u.dtype == torch.float32 and torch.equal(u, u.triu())
    expected = torch.linalg.inv(ref[order][:, order])
    torch.testing.assert_close(u.double().T @ u.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    b = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(f.solve(b), torch.linalg.solve(ref, b), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="act_order"):
        qmath.gptq_quantize_weight(torch.randn(4, 32), h, 4, act_order=not act_order, factor=f)


def test_rank_deficient_hessian_retries_damping(caplog):
    x = correlated_inputs(n_tokens=4)  # rank 4 of 32: singular without dampening
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    with caplog.at_level(logging.WARNING, logger="llmq_fx.qmath"):
        q, _ = qmath.gptq_quantize_weight(w, x.T @ x, 4, damp=0.0)
    assert "dampening" in caplog.text
    assert q.dtype == torch.int8


def test_indefinite_hessian_is_a_clear_error():
    with pytest.raises(llmq_fx.StatisticsError, match="not positive definite.*gptq_damp"):
        qmath.gptq_quantize_weight(torch.randn(4, 8), -torch.eye(8), 4)


# ---- the observer's Hessian -----------------------------------------------------------------
def _hooked_inputs(model, batches):
    """Every Linear's input over all batches, captured with forward hooks on the eager model (float64)."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for hk in hooks:
        hk.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_observer_hessian_is_xtx_over_all_tokens_and_follows_smoothing(opt_model, opt_gm, calib):
    g = copy.deepcopy(opt_gm)
    InsertObserversPass(hessian=True)(g)
    calibrate(g, calib, batch_size=3, progress=False)  # two batches summed
    ref = _hooked_inputs(opt_model, calib.split(3))
    for site in observer_sites(g):
        x = ref[site.record.consumers[0]]
        h_ref = x.T @ x / len(x)
        h = site.module.hessian_matrix()
        assert h.dtype == torch.float32
        np.testing.assert_allclose(h.double().numpy(), h_ref.numpy(), rtol=1e-4, atol=1e-5 * float(h_ref.abs().max()))
        # smoothing divides the input by s: the Hessian of x / s
        s = torch.rand(site.module.num_channels, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.5
        site.module.scale_channels(s)
        xs = x / s
        np.testing.assert_allclose(
            site.module.hessian_matrix().double().numpy(), (xs.T @ xs / len(xs)).numpy(), rtol=1e-4,
            atol=1e-5 * float(h_ref.abs().max() / s.min() ** 2),
        )


def test_observer_without_hessian_keeps_its_buffers():
    assert sorted(n for n, _ in ActivationObserver(4).named_buffers()) == [
        "count", "m2", "max_val", "mean", "min_val", "smoothing_scale"
    ]
    assert "hessian" in dict(ActivationObserver(4, hessian=True).named_buffers())
    with pytest.raises(llmq_fx.StatisticsError, match="hessian=True"):
        ActivationObserver(4).hessian_matrix()


# ---- the pass in the pipeline ---------------------------------------------------------------
def _logits_mse(qgm, ref_gm, ids):
    with torch.no_grad():
        return float(((qgm(ids) - ref_gm(ids)) ** 2).mean())


@pytest.mark.parametrize("group_size, act_order", [(None, True), (16, False)])
def test_quantize_with_gptq_beats_round_to_nearest(opt_gm, calib, eval_ids, group_size, act_order):
    base = dict(w_bits=4, a_bits=None, w_group_size=group_size)  # weight-only: the comparison is about weights
    rtn = llmq_fx.quantize(opt_gm, calib, static_config(**base), progress=False)
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(gptq=True, gptq_act_order=act_order, **base), progress=False)
    records = qgm.meta["llmq_fx"]["gptq"]
    for lin in linear_nodes(qgm.graph):
        path, w = module_path(lin), lin.args[1]
        if path == "lm_head":  # skipped: float, and not in the GPTQ records
            assert w.op == "get_attr" and path not in records
            continue
        assert w.op == "call_function" and w.target == DEQ_W, path
        assert qgm.get_buffer(w.args[0].target).dtype == torch.int8
        assert not hasattr(qgm.get_submodule(path), "weight")  # the float copy is gone
        assert records[path]["gptq_error"] < records[path]["rtn_error"], (path, records[path])
    assert len(records) == 2 * 6
    assert _logits_mse(qgm, opt_gm, eval_ids) < _logits_mse(rtn, opt_gm, eval_ids)


def test_gptq_with_w4a4_keeps_activation_qdq(opt_gm, calib):
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(gptq=True, n_clusters=4), progress=False)
    rows = {r["module"]: r for r in llmq_fx.summary(qgm)}
    assert rows["model.decoder.layers.1.fc2"]["w_bits"] == 4 and rows["model.decoder.layers.1.fc2"]["a_bits"] == 4
    assert "model.decoder.layers.1.fc2" in qgm.meta["llmq_fx"]["gptq"]


def test_gptq_config_errors(opt_gm, calib):
    with pytest.raises(llmq_fx.ConfigError, match="w_group_size"):
        llmq_fx.QuantConfig(gptq=True, w_group_size=0)
    with pytest.raises(llmq_fx.ConfigError, match="gptq_damp"):
        llmq_fx.QuantConfig(gptq=True, gptq_damp=1.5)
    g = copy.deepcopy(opt_gm)
    InsertObserversPass()(g)  # no Hessian
    calibrate(g, calib, progress=False)
    site = r"llmq_observer_.*\(model\.decoder\.layers\.0\.self_attn\.\{q_proj,k_proj,v_proj\}\)"
    with pytest.raises(llmq_fx.StatisticsError, match=site + ".*hessian=True"):
        GPTQPass(weight=WeightSpec(4))(g)
