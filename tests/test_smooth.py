import copy

import numpy as np
import pytest
import torch

import llmq_fx
from llmq_fx.calibrate import calibrate
from llmq_fx.graph import observer_sites
from llmq_fx.passes import InsertObserversPass, SmoothPass
from llmq_fx.stats import ActivationObserver
from conftest import static_config

FLOAT_ONLY = dict(w_bits=None, a_bits=None)


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_quantize_float_smoothing_keeps_logits_and_changes_weights(opt_gm, calib, eval_ids):
    before = {k: v.clone() for k, v in opt_gm.state_dict().items()}
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(**FLOAT_ONLY, smooth_alpha=0.5), progress=False)
    with torch.no_grad():
        assert _rel_err(qgm(eval_ids), opt_gm(eval_ids)) < 1e-4
    after = qgm.state_dict()
    for name in ("model.decoder.layers.0.self_attn_layer_norm.weight", "model.decoder.layers.0.self_attn_layer_norm.bias",
                 "model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.1.fc1.weight",
                 "model.decoder.layers.1.fc2.weight", "model.decoder.layers.1.self_attn.v_proj.weight",
                 "model.decoder.layers.1.self_attn.out_proj.weight"):
        assert not torch.allclose(after[name], before[name]), name
    # the input graph is not mutated
    for k, v in opt_gm.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "site, changed",
    [
        ("qkv", ["self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "self_attn.k_proj.weight"]),
        ("fc1", ["final_layer_norm.weight", "final_layer_norm.bias", "fc1.weight"]),
        ("fc2", ["fc1.weight", "fc1.bias", "fc2.weight"]),
        ("out_proj", ["self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight"]),
    ],
)
def test_each_site_alone_is_output_preserving(opt_gm, calib, eval_ids, site, changed):
    cfg = static_config(**FLOAT_ONLY, smooth_alpha=0.8, smooth_sites=[site])
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    with torch.no_grad():
        assert _rel_err(qgm(eval_ids), opt_gm(eval_ids)) < 1e-4
    sd, ref = qgm.state_dict(), opt_gm.state_dict()
    for layer in (0, 1):
        for leaf in changed:
            name = f"model.decoder.layers.{layer}.{leaf}"
            assert not torch.allclose(sd[name], ref[name]), name
    smoothed = [k for k, v in qgm.meta["llmq_fx"]["smoothing"].items() if v["smoothed"]]
    assert len(smoothed) == 2


def test_scales_follow_smoothquant_formula(opt_gm, calib):
    g = copy.deepcopy(opt_gm)
    InsertObserversPass()(g)
    calibrate(g, calib, progress=False)
    site = next(s for s in observer_sites(g) if s.role == "qkv")
    act_absmax = site.module.stats().absmax.numpy()
    ws = [g.get_parameter(c.args[1].target).detach().double().numpy() for c in site.consumers]
    w_absmax = np.max([np.abs(w).max(0) for w in ws], axis=0)
    ln_w = g.get_parameter("model.decoder.layers.0.self_attn_layer_norm.weight").detach().double().numpy().copy()
    alpha = 0.5
    SmoothPass(alpha=alpha, sites=("qkv",))(g)
    expected = act_absmax**alpha / w_absmax ** (1 - alpha)
    got = ln_w / g.get_parameter("model.decoder.layers.0.self_attn_layer_norm.weight").detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_transformed_stats_equal_recollected_stats(opt_gm, calib):
    g = copy.deepcopy(opt_gm)
    InsertObserversPass()(g)
    calibrate(g, calib, progress=False)
    SmoothPass(alpha=0.5, sites=("qkv", "fc1", "fc2", "out_proj"))(g)
    transformed = {s.name: s.module.stats() for s in observer_sites(g)}
    for s in observer_sites(g):  # fresh observers on the smoothed graph, same tokens
        setattr(g, s.observer.target, ActivationObserver(s.module.num_channels))
    calibrate(g, calib, progress=False)
    for s in observer_sites(g):
        fresh, t = s.module.stats(), transformed[s.name]
        for key in ("min", "max", "absmax", "mean", "std"):
            np.testing.assert_allclose(getattr(t, key).numpy(), getattr(fresh, key).numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{s.name} {key}")


def test_post_ln_and_tied_sites_are_skipped_with_reasons(opt350_model, calib, eval_ids):
    gm = llmq_fx.trace(opt350_model)
    qgm = llmq_fx.quantize(gm, calib, static_config(**FLOAT_ONLY, smooth_alpha=0.5), progress=False)
    with torch.no_grad():
        assert _rel_err(qgm(eval_ids), gm(eval_ids)) < 1e-4
    report = qgm.meta["llmq_fx"]["smoothing"]
    qkv = report["model.decoder.layers.0.self_attn.{q_proj,k_proj,v_proj}"]
    assert not qkv["smoothed"] and "no foldable pattern" in qkv["reason"]
    # fc2 (ReLU) and out_proj (attention V) folds do not depend on the norm placement
    assert report["model.decoder.layers.0.fc2"]["smoothed"]
    assert report["model.decoder.layers.0.self_attn.out_proj"]["smoothed"]


def test_tied_lm_head_is_never_folded(opt_gm, calib):
    cfg = static_config(**FLOAT_ONLY, smooth_alpha=0.5, skip=[])
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    assert torch.equal(qgm.state_dict()["lm_head.weight"], opt_gm.state_dict()["lm_head.weight"])
