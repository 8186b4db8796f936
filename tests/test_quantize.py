import copy

import numpy as np
import pytest
import torch

import llmq_fx
from llmq_fx import qmath
from llmq_fx.calibrate import calibrate
from llmq_fx.graph import is_linear, linear_nodes, module_path, observer_sites
from llmq_fx.passes import GroupChannelsPass, InsertObserversPass, cluster_channels
from conftest import static_config

QDQ = torch.ops.llmq.quantize_dequantize.default
DEQ_W = torch.ops.llmq.dequantize_weight.default


# ---- numpy references, written independently of llmq_fx.qmath ------------------------------
def np_scale_zp(lo, hi, bits):
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / (2**bits - 1), 1e-8).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 2**bits - 1)
    return scale, zp


def np_fake_quant(x, scale, zp, bits):
    q = np.clip(np.round(x / scale) + zp, 0, 2**bits - 1)  # np.round: half to even, like ONNX
    return ((q - zp) * scale).astype(np.float32)


def _act_qdq_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ]


def _buffer(gm, node):
    return gm.get_buffer(node.target)


@pytest.mark.parametrize("groups", ["tensor", "cluster", "channel"])
def test_custom_op_matches_numpy(groups):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 16)) * np.linspace(0.1, 8, 16)).astype(np.float32)
    x[0, 0, :4] = 0.5 * (np.arange(4) + 0.5)  # values at exact .5 multiples exercise tie rounding
    labels = {"tensor": np.zeros(16, int), "cluster": np.arange(16) // 4, "channel": np.arange(16)}[groups]
    flat = x.reshape(-1, 16)
    lo = np.array([flat[:, labels == labels[j]].min() for j in range(16)])
    hi = np.array([flat[:, labels == labels[j]].max() for j in range(16)])
    scale, zp = np_scale_zp(lo, hi, 4)
    ref = np_fake_quant(x, scale, zp, 4)
    got = QDQ(torch.tensor(x), torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), 0, 15)
    np.testing.assert_array_equal(got.numpy(), ref)
    # and the scale/zero point from the shared math module agree with the reference
    s, z = qmath.minmax_scale_zero_point(torch.tensor(lo), torch.tensor(hi), 4, symmetric=False)
    np.testing.assert_allclose(s.numpy(), scale, rtol=1e-6)
    np.testing.assert_array_equal(z.numpy(), zp)


@pytest.mark.parametrize("group_size", [None, 8])
def test_weight_quantization_matches_numpy(group_size):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 16)).astype(np.float32)
    q, scale = qmath.quantize_weight(torch.tensor(w), 4, group_size)
    g = group_size or 16
    wg = w.reshape(6, 16 // g, g)
    ref_scale = np.abs(wg).max(-1) / 7
    ref_q = np.clip(np.round(wg / ref_scale[..., None]), -8, 7).reshape(6, 16)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_allclose(scale.numpy().reshape(6, -1), ref_scale, rtol=1e-6)
    deq = DEQ_W(q, scale, 4).numpy()
    np.testing.assert_allclose(deq, (ref_q.reshape(6, -1, g) * ref_scale[..., None]).reshape(6, 16), rtol=1e-6)


def test_every_quantized_linear_has_one_activation_qdq(opt_gm, calib):
    k = 4
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(n_clusters=k), progress=False)
    for lin in linear_nodes(qgm.graph):
        path = module_path(lin)
        x, w = lin.args[0], lin.args[1]
        if path == "lm_head":  # skipped by default: float input and weight
            assert not (x.op == "call_function" and x.target == QDQ)
            assert w.op == "get_attr"
            continue
        assert x.op == "call_function" and x.target == QDQ, path
        assert not (x.args[0].op == "call_function" and x.args[0].target == QDQ)  # exactly one
        assert w.op == "call_function" and w.target == DEQ_W, path
        assert qgm.get_buffer(w.args[0].target).dtype == torch.int8
        scale = _buffer(qgm, x.args[1])
        distinct = torch.unique(scale).numel()
        assert 1 < distinct <= k, (path, distinct)
    assert len(_act_qdq_nodes(qgm)) == 2 * 4  # q/k/v share one QDQ node per layer


def test_one_cluster_is_per_tensor_static_quantization(opt_gm, calib):
    cfg = static_config(n_clusters=1, smooth_alpha=None, w_bits=None)
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    g = copy.deepcopy(opt_gm)
    InsertObserversPass()(g)
    calibrate(g, calib, progress=False)
    stats = {s.name: s.module.stats() for s in observer_sites(g)}
    for node in _act_qdq_nodes(qgm):
        st = stats[node.meta["llmq_site"].name]
        lo, hi = float(st.min.min()), float(st.max.max())
        scale, zp = np_scale_zp(np.array([lo]), np.array([hi]), 4)
        got_s, got_z = _buffer(qgm, node.args[1]), _buffer(qgm, node.args[2])
        assert torch.unique(got_s).numel() == 1 and torch.unique(got_z).numel() == 1
        np.testing.assert_allclose(got_s[0].item(), scale[0], rtol=1e-6)
        assert got_z[0].item() == zp[0]


def _site_mse(gm, calib, k, features="minmax"):
    """Calibration-set MSE of each site's quantized activations with k clusters."""
    g = copy.deepcopy(gm)
    InsertObserversPass()(g)
    calibrate(g, calib, progress=False)
    GroupChannelsPass(n_clusters=k, features=features)(g)
    mses = {}
    for s in observer_sites(g):
        acts = []
        h = s.module.register_forward_hook(lambda m, a, out: acts.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            g(calib)
        h.remove()
        x = torch.cat(acts)
        from llmq_fx.passes.insert_qdq import cluster_ranges

        st = s.module.stats()
        lo, hi = cluster_ranges(st.min, st.max, s.record.clusters.labels)
        scale, zp = qmath.minmax_scale_zero_point(lo, hi, 4, symmetric=False)
        mses[s.name] = float(((qmath.fake_quantize(x, scale, zp, 0, 15) - x) ** 2).mean())
    return mses


@pytest.mark.parametrize("features", ["minmax", "maxstd"])
def test_more_clusters_never_raise_calibration_mse(opt_gm, calib, features):
    ks = [1, 2, 4, 8, 10_000]
    per_k = [_site_mse(opt_gm, calib, k, features) for k in ks]
    for site in per_k[0]:
        curve = [m[site] for m in per_k]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(curve, curve[1:])), (site, curve)
        assert curve[-1] < curve[0]


def test_kmeans_is_deterministic_and_ordered():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (5, 2)), rng.normal(50, 1, (3, 2))])
    a = cluster_channels(feats, 3, seed=0)
    b = cluster_channels(feats, 3, seed=0)
    assert np.array_equal(a, b)
    assert a[:20].tolist() == [0] * 20 and a[20:25].tolist() == [1] * 5 and a[25:].tolist() == [2] * 3
    assert cluster_channels(feats, 1).tolist() == [0] * 28
    assert sorted(cluster_channels(feats, 100).tolist()) == list(range(28))  # per channel


def test_w4a4_output_close_and_skip_keeps_float(opt_gm, calib, eval_ids):
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(w_bits=8, a_bits=8, n_clusters=8), progress=False)
    with torch.no_grad():
        ref = opt_gm(eval_ids)
        err8 = float((qgm(eval_ids) - ref).norm() / ref.norm())
        q4 = llmq_fx.quantize(opt_gm, calib, static_config(), progress=False)
        err4 = float((q4(eval_ids) - ref).norm() / ref.norm())
    assert err8 < 0.05 and err8 < err4
    rows = {r["module"]: r for r in llmq_fx.summary(q4)}
    assert rows["lm_head"]["w_bits"] is None and rows["lm_head"]["a_bits"] is None
    assert rows["model.decoder.layers.0.fc2"]["w_bits"] == 4 and rows["model.decoder.layers.0.fc2"]["a_bits"] == 4
    assert rows["model.decoder.layers.0.self_attn.q_proj"]["smoothed"] is True
    assert rows["model.decoder.layers.0.fc1"]["out_features"] == 64


def test_grouped_weights_and_a_group_size_that_fits_nowhere(opt_gm, calib):
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(w_group_size=16), progress=False)
    scale = qgm.get_buffer("model.decoder.layers.0.fc2.weight_scale")
    assert scale.shape == (32, 64 // 16)
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(w_group_size=24), progress=False)
    assert qgm.get_buffer("model.decoder.layers.0.fc2.weight_scale").shape == (32,)  # one per output channel


@pytest.mark.parametrize(
    "data, key",
    [({"w_bitz": 4}, "w_bitz"), ({"w_bits": 1}, "w_bits"), ({"smooth_alpha": 1.5}, "smooth_alpha"),
     ({"n_clusters": {"qkvv": 4}}, "qkvv"), ({"cluster_features": "kmeans"}, "cluster_features"),
     ({"smooth_sites": ["lm_head"]}, "smooth_sites")],
)
def test_bad_config_keys_are_named(data, key):
    with pytest.raises(llmq_fx.ConfigError, match=key):
        llmq_fx.QuantConfig.from_dict(data)


def test_config_from_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text("w_bits: 8\nn_clusters: {qkv: 4, fc2: 16}\n")
    (tmp_path / "c.toml").write_text("a_bits = 8\nsmooth_alpha = 0.8\n")
    y = llmq_fx.QuantConfig.from_file(tmp_path / "c.yaml")
    assert y.w_bits == 8 and y.clusters_for("fc2") == 16 and y.clusters_for("out_proj") == 1
    t = llmq_fx.QuantConfig.from_file(tmp_path / "c.toml")
    assert t.a_bits == 8 and t.smooth_alpha == 0.8
    with pytest.raises(llmq_fx.ConfigError, match="not found"):
        llmq_fx.QuantConfig.from_file(tmp_path / "missing.yaml")


def test_a_weight_group_size_the_widths_do_not_allow_keeps_one_scale_per_channel_there(caplog):
    """A w_group_size that does not divide a Linear's input width: that Linear keeps one scale per output
    channel (as a_group_size does for activations), named in one warning before any work; the others are grouped."""
    from llmq_fx.models import load_model

    model, _ = load_model("opt-tiny-random")
    gm = llmq_fx.trace(model)
    widths = {module_path(n): n.args[1].meta["val"].shape[1] for n in gm.graph.nodes if is_linear(n)}
    assert set(widths.values()) == {64, 256}  # the tiny OPT: d=64, ffn 256
    with caplog.at_level("WARNING", logger="llmq_fx.quantize"):
        qgm = llmq_fx.quantize(gm, torch.randint(0, 50, (2, 16)), {"w_group_size": 128}, progress=False)
    assert any("w_group_size=128 does not divide the input width of" in r.getMessage() for r in caplog.records)
    layers = qgm.meta["llmq_fx"]["linears"]
    for path, width in widths.items():
        if path in layers and layers[path]["w_bits"] == 4:  # the lm_head has its own 8-bit scheme
            assert layers[path]["w_group_size"] == (128 if width == 256 else None), path


@pytest.mark.parametrize("cfg", [
    {},  # rotation, sequential GPTQ, embeddings
    {"sort_residual": True, "learn_rotation_steps": 2},
    static_config(smooth_alpha=0.5, n_clusters=2).to_dict(),  # SmoothQuant folds into norms and weights
    {"rotate": False, "embed_bits": None, "lm_head_bits": None},
])
def test_quantize_shares_the_input_tensors_and_leaves_them_alone(opt_gm, calib, cfg):
    """quantize()'s copy of the graph holds the input graph's tensors until a pass replaces them (no
    second copy of the weights), and no pass writes into them: the input graph is the same, bit for bit."""
    before = {k: v.clone() for k, v in opt_gm.state_dict().items()}
    storages = {t.untyped_storage().data_ptr() for t in before.values()}
    inputs = {t.untyped_storage().data_ptr() for t in opt_gm.state_dict().values()}
    qgm = llmq_fx.quantize(opt_gm, calib, dict(cfg, calib_batch_size=2), progress=False)
    after = opt_gm.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert not storages & inputs
    if cfg.get("rotate") is False:  # the embedding is neither rotated nor quantized: the same tensor
        shared = {t.untyped_storage().data_ptr() for t in qgm.state_dict().values()} & inputs
        assert opt_gm.get_parameter("model.decoder.embed_tokens.weight").untyped_storage().data_ptr() in shared


def test_quantize_inplace_rewrites_the_input_to_the_same_model(opt_gm, calib):
    """inplace=True returns the input graph itself, rewritten into the model the copying call returns."""
    copied = llmq_fx.quantize(opt_gm, calib, dict(calib_batch_size=2), progress=False)
    own = copy.deepcopy(opt_gm)
    out = llmq_fx.quantize(own, calib, dict(calib_batch_size=2), progress=False, inplace=True)
    assert out is own
    state, other = out.state_dict(), copied.state_dict()
    assert state.keys() == other.keys()
    for key in state:
        assert torch.equal(state[key], other[key]), key
    assert str(out.graph) == str(copied.graph)
