"""Activation-aware GPTQ: the observers' moments of the quantized input, the least-squares target, the pass."""

import copy
import logging

import numpy as np
import pytest
import torch

import llmq_fx
from llmq_fx import qmath
from llmq_fx.calibrate import calibrate
from llmq_fx.errors import StatisticsError
from llmq_fx.graph import observer_sites
from llmq_fx.passes import GPTQPass, InsertObserversPass
from llmq_fx.spec import ActivationSpec, WeightSpec
from llmq_fx.stats import ActivationObserver
from conftest import static_config


def per_token_qdq(x: torch.Tensor, bits: int = 4, clip: float = 0.9, group: int = 0) -> torch.Tensor:
    """Reference asymmetric per-token (per-group) quantize-dequantize, written out from its definition."""
    if group:
        return per_token_qdq(x.reshape(*x.shape[:-1], -1, group), bits, clip).reshape(x.shape)
    x = x.double()
    levels = 2**bits - 1
    lo = (x.min(-1, keepdim=True).values * clip).clamp(max=0)
    hi = (x.max(-1, keepdim=True).values * clip).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zp = torch.round(-lo / scale).clamp(0, levels)
    return (torch.round(x / scale) + zp).clamp(0, levels).sub(zp).mul(scale)


def layer_inputs(n_tokens=512, channels=24, seed=0):
    """Correlated channels of different magnitudes with a few large tokens, like a rotated Linear input."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) / channels**0.5 + 0.5 * torch.eye(channels)
    x = torch.randn(n_tokens, channels, generator=g) @ mix * torch.exp(0.5 * torch.randn(channels, generator=g))
    x[:: 37] *= 6.0
    return x


def test_observer_records_moments_of_its_quantized_input():
    quant = ActivationSpec(4, symmetric=False, group_size=8, clip_ratio=0.9)
    obs = ActivationObserver(24, hessian=True, input_quant=quant)
    x = layer_inputs(60)
    for batch in x.reshape(3, 4, 5, 24):  # three [4, 5, 24] batches, summed
        assert torch.equal(obs(batch), batch)  # identity
    q = per_token_qdq(x, 4, 0.9, 8)
    np.testing.assert_allclose(obs.hessian_matrix().double().numpy(), (q.T @ q / 60).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(obs.cross_matrix().double().numpy(), (q.T @ x.double() / 60).numpy(), rtol=1e-4, atol=1e-4)
    st = obs.stats()  # the channel statistics stay those of the float input
    np.testing.assert_allclose(st.max.numpy(), x.double().amax(0).numpy(), rtol=1e-6)
    with pytest.raises(llmq_fx.StatisticsError, match="smoothing changes what the quantizer sees"):
        obs.scale_channels(torch.ones(24))
    with pytest.raises(ValueError, match="does not divide 20 channels"):
        ActivationObserver(20, hessian=True, input_quant=quant)
    with pytest.raises(llmq_fx.StatisticsError, match="input quantizer"):
        ActivationObserver(24, hessian=True).cross_matrix()


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_input_aware_weight_is_the_least_squares_solution(strength):
    x = layer_inputs().double()
    q = per_token_qdq(x)
    w = torch.randn(10, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # min_V  s ||X W^T - Q V^T||^2 + (1 - s) ||Q W^T - Q V^T||^2  as one stacked least-squares problem
    a = torch.cat([strength**0.5 * q, (1 - strength) ** 0.5 * q])
    b = torch.cat([strength**0.5 * x @ w.T, (1 - strength) ** 0.5 * q @ w.T])
    ref = torch.linalg.lstsq(a, b).solution.T
    got = qmath.input_aware_weight(w.float(), (q.T @ q / len(q)).float(), (q.T @ x / len(x)).float(), strength, damp=0.0)
    np.testing.assert_allclose(got.double().numpy(), ref.numpy(), rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="strength"):
        qmath.input_aware_weight(w, q.T @ q, q.T @ x, 1.5)


def test_act_aware_gptq_lowers_the_output_error_of_the_quantized_layer():
    x = layer_inputs(2048, 32, seed=4)
    q = per_token_qdq(x).float()
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    h, hq, c = x.T @ x / len(x), q.T @ q / len(q), q.T @ x / len(x)

    def error(w_hat):  # what the deployed W4A4 layer gets wrong: X W^T against Q(X) W_hat^T
        return float(((x @ w.T - q @ w_hat.T) ** 2).sum() / ((x @ w.T) ** 2).sum())

    plain = error(qmath.dequantize_weight(*qmath.gptq_quantize_weight(w, h, 4)))
    errors = {}
    for s in (0.5, 1.0):
        target = qmath.input_aware_weight(w, hq, c, s)
        errors[s] = error(qmath.dequantize_weight(*qmath.gptq_quantize_weight(target, hq, 4)))
    assert errors[1.0] < errors[0.5] < plain, (plain, errors)
    assert errors[1.0] < 0.8 * plain, (plain, errors)


# ---- the pipeline ---------------------------------------------------------------------------
def test_default_recipe_runs_act_aware_gptq(opt_gm, calib):
    cfg = llmq_fx.QuantConfig()
    assert cfg.gptq and cfg.a_dynamic and cfg.gptq_act_aware == 0.3 and cfg.gptq_sequential and cfg.a_clip_search
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    meta = qgm.meta["llmq_fx"]
    assert meta["gptq_act_aware_skipped"] is None
    records = meta["gptq"]
    assert len(records) == 2 * 6
    for path, rec in records.items():
        assert rec["act_aware"] == 0.3 and rec["sequential"], path
        assert rec["target_shift"] > 0, path  # the weight GPTQ rounded moved towards the quantized inputs
        assert rec["gptq_error"] < rec["rtn_error"], (path, rec)
    plain = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(gptq_act_aware=None), progress=False)
    assert all(r["act_aware"] is None and "target_shift" not in r for r in plain.meta["llmq_fx"]["gptq"].values())
    key = "model.decoder.layers.0.fc1.weight_int"
    assert not torch.equal(qgm.get_buffer(key), plain.get_buffer(key))


@pytest.mark.parametrize("overrides, reason", [
    (dict(a_dynamic=False, n_clusters=4, smooth_alpha=None), "a_dynamic is false"),
    (dict(a_dynamic=True, smooth_alpha=0.5), "smooth_alpha is set"),
])
def test_act_aware_falls_back_to_plain_gptq_where_the_quantizer_is_not_known(opt_gm, calib, caplog, overrides, reason):
    cfg = static_config(gptq=True, **overrides)
    with caplog.at_level(logging.WARNING, logger="llmq_fx.quantize"):
        qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    assert reason in qgm.meta["llmq_fx"]["gptq_act_aware_skipped"]
    assert any("plain GPTQ instead" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    plain = llmq_fx.quantize(opt_gm, calib, static_config(gptq=True, gptq_act_aware=None, **overrides), progress=False)
    key = "model.decoder.layers.1.fc2.weight_int"
    assert torch.equal(qgm.get_buffer(key), plain.get_buffer(key))


def test_act_aware_config_errors(opt_gm, calib):
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(llmq_fx.ConfigError, match="gptq_act_aware"):
            llmq_fx.QuantConfig(gptq_act_aware=bad)
    g = copy.deepcopy(opt_gm)
    InsertObserversPass(hessian=True)(g)  # a Hessian, but of the float input
    calibrate(g, calib, progress=False)
    with pytest.raises(llmq_fx.StatisticsError, match=r"llmq_observer_.*did not quantize its input"):
        GPTQPass(act_aware=0.5)(g)
    with pytest.raises(llmq_fx.ConfigError, match="gptq_act_aware"):
        GPTQPass(act_aware=2.0)


def test_gptq_releases_each_sites_moments_once_used(opt_gm, calib):
    g = copy.deepcopy(opt_gm)
    InsertObserversPass(input_quant=ActivationSpec(4, False, clip_ratio=0.9))(g)
    calibrate(g, calib, progress=False)
    sites = observer_sites(g)
    assert all({"hessian", "cross"} <= dict(s.module.named_buffers()).keys() for s in sites)
    GPTQPass(weight=WeightSpec(4), act_aware=0.5, skip=("lm_head",))(g)
    for s in sites:
        buffers = dict(s.module.named_buffers())
        quantized = any(p != "lm_head" for p in s.record.consumers)
        assert ("hessian" in buffers) == (not quantized), s.name  # lm_head's site was not used: kept
        assert s.module.stats().count > 0  # the channel statistics stay for InsertQDQPass


def test_act_aware_target_retries_with_more_damping(caplog):
    """A Hessian that rounding left slightly indefinite (one eigenvalue -5% of the mean diagonal): the
    asked dampening (1%) is not enough, 10x is; the solve says so and still returns the target. A
    hopeless one is one line naming the dampenings tried."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    eig = torch.ones(16, dtype=torch.float64)
    eig[0] = -0.05
    h = (basis * eig) @ basis.T
    w = torch.randn(8, 16, generator=g)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64))
    with caplog.at_level("WARNING", logger="llmq_fx.qmath"):
        v = qmath.input_aware_weight(w, h.float(), h.float(), 1.0, damp=0.01)
    assert torch.isfinite(v).all() and "act-aware target: Hessian needed dampening 0.1 (asked 0.01)" in caplog.text
    # Against the solve with that dampening, done independently in float64.
    damped = h + 0.1 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    expected = torch.linalg.solve(damped, h @ w.double().T).T
    assert torch.allclose(v.double(), expected, rtol=1e-4, atol=1e-5)
    eig[0] = -1e6
    with pytest.raises(StatisticsError, match="act-aware target: the Hessian is not positive definite even with dampening 0.01, 0.1, 1, 10"):
        qmath.input_aware_weight(w, ((basis * eig) @ basis.T).float(), h.float(), 1.0, damp=0.01)
