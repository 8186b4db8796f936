"""Specification of dynamic per-token activations and mixed-precision (outlier) clusters.

References are independent of ``llmq_fx.qmath``: a per-row numpy quantizer written here, cluster
widths recomputed from the recorded channel statistics, logits from running the GraphModule.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import llmq_fx
from llmq_fx.errors import ConfigError
from llmq_fx.export import OnnxCausalLM, onnx_qdq_report, to_onnx
from llmq_fx.export.translation import FAST_TRANSLATION_TABLE, TRANSLATION_TABLE
from llmq_fx.passes import InsertQDQPass
from llmq_fx.spec import ActivationSpec, WeightSpec
from conftest import STATIC, static_config

QDQ = torch.ops.llmq.quantize_dequantize.default
QDQ_DYNAMIC = torch.ops.llmq.quantize_dequantize_dynamic.default
N_SITES = 2 * 4  # conftest's OPT: 2 layers x (qkv, out_proj, fc1, fc2)
N_LINEARS = 2 * 6


# ---- numpy reference, written independently of llmq_fx.qmath --------------------------------
def np_dynamic_fake_quant(x: np.ndarray, bits: int, symmetric: bool, clip: float = 1.0) -> np.ndarray:
    """Row by row (last axis = channels), in float32, rounding half to even as ONNX does; ``clip``
    shrinks each row's min and max before the range is widened to contain zero."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    f = np.float32
    rows = x.reshape(-1, x.shape[-1]).astype(f)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        lo, hi = min(row.min() * f(clip), f(0)), max(row.max() * f(clip), f(0))
        if symmetric:
            scale, zp = max(max(-lo, hi) / f(qmax), f(1e-8)), f(0)
        else:
            scale = max((hi - lo) / f(qmax - qmin), f(1e-8))
            zp = np.clip(np.round(f(qmin) - lo / scale), qmin, qmax)
        q = np.clip(np.round(row / scale) + zp, qmin, qmax)
        out[i] = (q - zp) * scale
    return out.reshape(x.shape)


def _activations(seed: int = 0) -> torch.Tensor:
    """Random tokens with uneven channels, plus rows that hit rounding ties, an all-zero and an all-positive row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 16, generator=g) * torch.exp(torch.randn(16, generator=g))
    x[0, 0] = torch.randint(-15, 16, (16,), generator=g) * 0.5  # a grid of halves: x / scale lands on .5
    x[0, 0, :2] = torch.tensor([-7.5, 7.5])  # range 15 (scale 1 at 4 bits), absmax 7.5
    x[0, 1] = 0.0
    x[0, 2] = torch.rand(16, generator=g) + 1.0
    return x


BIT_CASES = [(2, False, 1.0), (3, True, 1.0), (4, False, 1.0), (4, True, 1.0), (8, False, 1.0),
             (4, False, 0.9), (4, True, 0.8)]


@pytest.mark.parametrize("bits, symmetric, clip", BIT_CASES)
def test_dynamic_op_matches_per_row_reference(bits, symmetric, clip):
    x = _activations()
    got = torch.ops.llmq.quantize_dequantize_dynamic(x, bits, symmetric, clip)
    np.testing.assert_array_equal(got.numpy(), np_dynamic_fake_quant(x.numpy(), bits, symmetric, clip))
    if clip < 1:  # clipped: the largest magnitude of a row saturates below itself
        top = x.abs().amax(dim=-1)
        assert bool((got.abs().amax(dim=-1) < top)[top > 0].all())
    # Each token has its own grid: at most 2^bits distinct values a row.
    assert max(len(np.unique(r)) for r in got.reshape(-1, 16).numpy()) <= 2**bits


class _DynamicQDQ(torch.nn.Module):
    def __init__(self, bits: int, symmetric: bool, clip: float):
        super().__init__()
        self.bits, self.symmetric, self.clip = bits, symmetric, clip

    def forward(self, x):
        return QDQ_DYNAMIC(x, self.bits, self.symmetric, self.clip)


@pytest.mark.parametrize("bits, symmetric, clip", BIT_CASES)
def test_dynamic_onnx_subgraph_is_bit_exact(tmp_path, bits, symmetric, clip):
    path = tmp_path / "qdq.onnx"
    x = _activations()
    torch.onnx.export(
        _DynamicQDQ(bits, symmetric, clip).eval(), (x,), path, dynamo=True, opset_version=21,
        custom_translation_table=TRANSLATION_TABLE, dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},),
    )
    model = onnx.load(str(path))
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}
    assert attrs["axis"] == -1 and attrs["block_size"] == 16  # one block per token
    assert {"ReduceMin", "ReduceMax", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    ref = np_dynamic_fake_quant(x.numpy(), bits, symmetric, clip)
    for fuse in (False, True):  # onnxruntime's QDQ fusion must not change the numbers
        options = ort.SessionOptions()
        if not fuse:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("group", [0, 4])
@pytest.mark.parametrize("bits, symmetric, clip", BIT_CASES)
def test_fast_dynamic_subgraph_is_bit_exact(tmp_path, bits, symmetric, clip, group):
    """The ``fast`` format's float-op chain (what MatMulNBits reads) gives the reference's floats bit for bit,
    per token and per group; asymmetric codes are clamped around zero (no zero-point add and subtract)."""
    class Dynamic(torch.nn.Module):
        def forward(self, x):
            return QDQ_DYNAMIC(x, bits, symmetric, clip, group)

    path = tmp_path / "fast.onnx"
    torch.onnx.export(Dynamic().eval(), (_activations(),), path, dynamo=True, opset_version=21,
                      custom_translation_table=FAST_TRANSLATION_TABLE, dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    if not symmetric:
        assert ops.count("Round") == 2 and "Clip" not in ops and ops.count("Sub") == 1  # the range hi - lo only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (_activations(), _activations(seed=5)[:3, :4]):
        shape = (*x.shape[:-1], 16 // group, group) if group else x.shape
        ref = np_dynamic_fake_quant(x.numpy().reshape(shape), bits, symmetric, clip).reshape(x.shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_array_equal(got, ref)


def test_fast_static_subgraph_is_bit_exact(tmp_path):
    """Static per-channel codes in the ``fast`` format: clamped to ``[qmin - z, qmax - z]``, the floats of
    ``(clip(round(x / s) + z, qmin, qmax) - z) * s`` bit for bit."""
    x = _activations()
    scale = (x.abs().amax(dim=(0, 1)) / 8 + 1e-3).float()
    zp = torch.tensor([0, 3, 7, 8, 15, 1, 2, 12, 9, 4, 5, 6, 10, 11, 13, 14], dtype=torch.int32)

    class Static(torch.nn.Module):
        def forward(self, x):
            return QDQ(x, scale, zp, 0, 15)

    path = tmp_path / "static.onnx"
    torch.onnx.export(Static().eval(), (x,), path, dynamo=True, opset_version=21,
                      custom_translation_table=FAST_TRANSLATION_TABLE, dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    s, z, f = scale.numpy(), zp.numpy().astype(np.float32), np.float32
    ref = ((np.clip(np.round(x.numpy() / s) + z, f(0), f(15)) - z) * s).astype(np.float32)
    np.testing.assert_array_equal(got, ref)


# ---- models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(opt_gm, calib):
    configs = {
        "dynamic": dict(STATIC, a_dynamic=True),
        "mixed": dict(STATIC, n_clusters=4, a_outlier_bits=8),
    }
    return {k: llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(**v), progress=False) for k, v in configs.items()}


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {k: to_onnx(quantized[k], folder / f"{k}.onnx", format="qdq") for k in ("dynamic", "mixed")}


def _assert_ort_matches(path, qgm, ids):
    with torch.no_grad():
        ref = qgm(ids)
    for fuse in (False, True):
        torch.testing.assert_close(OnnxCausalLM(path, fuse_qdq=fuse)(ids), ref, rtol=0, atol=1e-4)


def test_dynamic_graph_has_one_dynamic_qdq_per_site(quantized):
    qgm = quantized["dynamic"]
    assert len([n for n in qgm.graph.nodes if n.target is QDQ_DYNAMIC]) == N_SITES
    assert not [n for n in qgm.graph.nodes if n.target is QDQ]
    rows = {r["module"]: r for r in llmq_fx.summary(qgm)}
    assert rows["model.decoder.layers.0.fc1"]["clusters"] == "per-token"
    assert rows["model.decoder.layers.0.fc1"]["a_effective_bits"] == 4.0
    assert qgm.meta["llmq_fx"]["a_effective_bits"] == 4.0


def test_dynamic_export_has_per_token_uint4_qdq_and_matches_pytorch(quantized, exported, eval_ids):
    path = exported["dynamic"]
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ReduceMin") == ops.count("ReduceMax") == N_SITES
    report = onnx_qdq_report(path)
    assert report["quantize_linear_types"] == {"UINT4": N_SITES}
    assert report["dequantize_linear_types"] == {"UINT4": N_SITES, "INT4": N_LINEARS}
    _assert_ort_matches(path, quantized["dynamic"], eval_ids)


# ---- mixed precision ----------------------------------------------------------------------------
def _widest_cluster(stats: dict) -> np.ndarray:
    """Bool per channel: members of the cluster whose (max over members - min over members) is largest."""
    labels, lo, hi = stats["labels"].numpy(), stats["min"].numpy(), stats["max"].numpy()
    widths = {c: hi[labels == c].max() - lo[labels == c].min() for c in np.unique(labels)}
    return labels == max(widths, key=widths.get)


def _outlier_qdq_nodes(qgm) -> list[torch.fx.Node]:
    return [n for n in qgm.graph.nodes if n.target is QDQ and n.meta["llmq_site"].activation.bits == 8]


def test_mixed_effective_bits_by_hand(quantized):
    qgm = quantized["mixed"]
    meta = qgm.meta["llmq_fx"]
    rec = meta["linears"]["model.decoder.layers.0.fc2"]
    outlier = _widest_cluster(meta["site_stats"][rec["site"]])
    c = outlier.size
    assert 0 < outlier.sum() < c
    assert rec["a_effective_bits"] == pytest.approx((8 * outlier.sum() + 4 * (c - outlier.sum())) / c)
    # The model's mean is weighted by each quantized Linear's MACs per token.
    rows = [r for r in llmq_fx.summary(qgm) if r["a_effective_bits"] is not None]
    macs = np.array([r["in_features"] * r["out_features"] for r in rows])
    bits = np.array([r["a_effective_bits"] for r in rows])
    assert meta["a_effective_bits"] == pytest.approx(float((bits * macs).sum() / macs.sum()))
    assert 4 < meta["a_effective_bits"] < 8
    assert "a_effective_bits" in llmq_fx.format_summary(llmq_fx.summary(qgm))


def test_widest_cluster_is_quantized_at_outlier_bits(quantized):
    qgm = quantized["mixed"]
    nodes = _outlier_qdq_nodes(qgm)
    assert len(nodes) == N_SITES
    for node in nodes:
        stats = qgm.meta["llmq_fx"]["site_stats"][node.meta["llmq_site"].name]
        outlier = _widest_cluster(stats)
        channels = qgm.get_buffer(node.args[0].args[2].target)  # index_select(x, -1, channels)
        np.testing.assert_array_equal(channels.numpy(), np.flatnonzero(outlier))
        assert node.args[3:] == (0, 255)
        lo = min(float(stats["min"][outlier].min()), 0.0)
        hi = max(float(stats["max"][outlier].max()), 0.0)
        scale = qgm.get_buffer(node.args[1].target)
        # 8-bit steps: 17x finer than the 4-bit scale (hi - lo) / 15 of the same range.
        torch.testing.assert_close(scale, torch.full_like(scale, (hi - lo) / 255), rtol=1e-6, atol=0)


def test_mixed_precision_error_is_lower_than_all_4_bit(opt_gm, opt_model, calib, eval_ids):
    # Weights in float, so that the logit error is the activations' alone.
    configs = {"a4": dict(n_clusters=4, w_bits=None), "mixed": dict(n_clusters=4, w_bits=None, a_outlier_bits=8)}
    with torch.no_grad():
        ref = opt_model(eval_ids).logits
        err = {}
        for k, cfg in configs.items():
            qgm = llmq_fx.quantize(opt_gm, calib, static_config(**cfg), progress=False)
            err[k] = float(((qgm(eval_ids) - ref) ** 2).mean())
    print(f"\nlogit MSE vs float: all 4-bit {err['a4']:.4g}, mixed {err['mixed']:.4g}")
    assert err["mixed"] < 0.8 * err["a4"], err


def test_one_cluster_has_nothing_to_promote(opt_gm, calib):
    qgm = llmq_fx.quantize(opt_gm, calib, static_config(n_clusters=1, a_outlier_bits=8), progress=False)
    assert len([n for n in qgm.graph.nodes if n.target is QDQ]) == N_SITES
    assert not _outlier_qdq_nodes(qgm)
    assert qgm.meta["llmq_fx"]["a_effective_bits"] == 4.0


def test_outlier_clusters_are_capped_below_all_clusters(opt_gm, calib):
    cfg = static_config(n_clusters=4, a_outlier_bits=8, a_outlier_clusters=10)
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    for node in _outlier_qdq_nodes(qgm):
        labels = qgm.meta["llmq_fx"]["site_stats"][node.meta["llmq_site"].name]["labels"]
        channels = qgm.get_buffer(node.args[0].args[2].target)
        assert len(torch.unique(labels[channels])) == len(torch.unique(labels)) - 1


def test_mixed_export_has_uint4_and_uint8_qdq_and_matches_pytorch(quantized, exported, eval_ids):
    path = exported["mixed"]
    report = onnx_qdq_report(path)
    assert report["quantize_linear_types"] == {"UINT4": N_SITES, "UINT8": N_SITES}
    assert report["dequantize_linear_types"] == {"UINT4": N_SITES, "UINT8": N_SITES, "INT4": N_LINEARS}
    model = onnx.load(str(path))
    producers = {out: n for n in model.graph.node for out in n.output}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert producers[q.input[0]].op_type == "Gather"  # each code covers its own channels only
    _assert_ort_matches(path, quantized["mixed"], eval_ids)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(a_dynamic=True, a_outlier_bits=8), "a_dynamic"),
        (dict(a_bits=None, a_outlier_bits=8), "a_bits"),
        (dict(a_outlier_bits=16), "a_outlier_bits"),
        (dict(a_outlier_clusters=0), "a_outlier_clusters"),
    ],
)
def test_config_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        llmq_fx.QuantConfig(**config)


def test_pass_refuses_dynamic_mixed_precision():
    with pytest.raises(ConfigError, match="a_dynamic"):
        InsertQDQPass(weight=WeightSpec(4), activation=ActivationSpec(4, dynamic=True), outlier_bits=8)


# ---- grouped dynamic activations (a_group_size) ---------------------------------------------
@pytest.mark.parametrize("bits, symmetric, clip", [(4, False, 1.0), (4, True, 0.9), (3, False, 0.8)])
def test_grouped_dynamic_is_per_row_reference_on_each_group(tmp_path, bits, symmetric, clip):
    x = _activations()
    g = 4
    ref = np_dynamic_fake_quant(x.numpy().reshape(4, 6, 16 // g, g), bits, symmetric, clip).reshape(x.shape)
    got = torch.ops.llmq.quantize_dequantize_dynamic(x, bits, symmetric, clip, g)
    np.testing.assert_array_equal(got.numpy(), ref)

    class Grouped(torch.nn.Module):
        def forward(self, x):
            return QDQ_DYNAMIC(x, bits, symmetric, clip, g)

    path = tmp_path / "grouped.onnx"
    torch.onnx.export(Grouped().eval(), (x,), path, dynamo=True, opset_version=21,
                      custom_translation_table=TRANSLATION_TABLE, dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    (q,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}["block_size"] == g
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = _activations(seed=5)[:3, :4]  # other batch and length than the export example
    (out,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    np.testing.assert_array_equal(out, np_dynamic_fake_quant(other.numpy().reshape(3, 4, 16 // g, g), bits, symmetric, clip).reshape(other.shape))


def test_grouped_dynamic_model_exports_and_matches_pytorch(opt_gm, calib, eval_ids, tmp_path):
    qgm = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(a_dynamic=True, a_group_size=16), progress=False)
    nodes = [n for n in qgm.graph.nodes if n.target == QDQ_DYNAMIC and "llmq_site" in n.meta]  # sites, not the lm_head's A8
    assert len(nodes) == N_SITES and all(n.args[4] == 16 for n in nodes)
    path = to_onnx(qgm, tmp_path / "grouped.onnx", format="qdq")
    _assert_ort_matches(path, qgm, eval_ids)
    # Finer ranges than one per token: the logits move less from the float graph's.
    per_token = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(a_dynamic=True, a_group_size=None, w_bits=None), progress=False)
    grouped = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(a_dynamic=True, a_group_size=8, w_bits=None), progress=False)
    with torch.no_grad():
        ref = opt_gm(eval_ids)
        assert (grouped(eval_ids) - ref).pow(2).mean() < (per_token(eval_ids) - ref).pow(2).mean()


def test_group_size_is_an_upper_bound_per_site(opt_gm, calib):
    # hidden 32 (q/k/v, out_proj, fc1 inputs), ffn 64 (fc2 input): groups of 32 split only fc2's input
    qgm = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(a_group_size=32), progress=False)
    groups = {n.meta["llmq_site"].role: n.args[4] for n in qgm.graph.nodes if n.target == QDQ_DYNAMIC and "llmq_site" in n.meta}
    assert groups == {"qkv": 0, "out_proj": 0, "fc1": 0, "fc2": 32}
    rows = {r["module"]: r for r in llmq_fx.summary(qgm)}
    assert rows["model.decoder.layers.0.fc2"]["clusters"] == "per-token/32"
    assert rows["model.decoder.layers.0.fc1"]["clusters"] == "per-token"
    # static activations are grouped by n_clusters; a_group_size does not apply to them
    static = llmq_fx.quantize(opt_gm, calib, static_config(a_group_size=16), progress=False)
    assert not any(n.target == QDQ_DYNAMIC for n in static.graph.nodes)


def test_group_size_errors(opt_gm, calib):
    with pytest.raises(ConfigError, match="a_group_size"):
        llmq_fx.QuantConfig(a_dynamic=True, a_group_size=0)



def test_group_size_that_does_not_divide_a_site_keeps_it_per_token(opt_gm, calib, caplog):
    # 24 divides neither the 32 channels of the q/k/v, out_proj and fc1 inputs nor fc2's 64
    with caplog.at_level(logging.WARNING, logger="llmq_fx.passes.insert_qdq"):
        qgm = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(a_group_size=24), progress=False)
    assert all(n.args[4] == 0 for n in qgm.graph.nodes if n.target == QDQ_DYNAMIC and "llmq_site" in n.meta)
    warned = [r.getMessage() for r in caplog.records if "a_group_size=24 does not divide" in r.getMessage()]
    assert len(warned) == N_SITES  # every quantized site once (lm_head is skipped: no QDQ)
    assert any("a_group_size=24 does not divide the 64 input channels of model.decoder.layers.0.fc2" in m for m in warned)
