"""Specification of the ONNX export (``llmq_fx.export``) on a random tiny OPT.

References are independent of the exporter: node counts come from the architecture (layers x
sites), weights from the quantized GraphModule's own buffers, logits from running the
GraphModule in PyTorch, perplexity from a cross-entropy written here.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from transformers import OPTConfig, OPTForCausalLM

import llmq_fx
from llmq_fx.errors import ExportError
from llmq_fx.export import OnnxCausalLM, onnx_qdq_report, to_onnx
from conftest import static_config

N_LAYERS = 2
VOCAB = 128
# Per decoder layer: 4 activation sites (q/k/v share one input, out_proj, fc1, fc2), 6 Linears.
ACT_SITES_PER_LAYER = 4
LINEARS_PER_LAYER = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny OPT, its float and W4A4 graphs, and both exported once."""
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=N_LAYERS, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64,
    )
    model = OPTForCausalLM(cfg).eval()
    gm = llmq_fx.trace(model)
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    qgm = llmq_fx.quantize(gm, calib, static_config(n_clusters=4), progress=False)
    folder = tmp_path_factory.mktemp("onnx")
    t0 = time.perf_counter()
    q_path = to_onnx(qgm, folder / "w4a4.onnx", format="qdq")
    q_seconds = time.perf_counter() - t0
    f_path = to_onnx(gm, folder / "float.onnx", format="qdq")
    print(f"\nW4A4 export {q_seconds:.1f} s")
    return {"model": model, "gm": gm, "qgm": qgm, "calib": calib, "q_path": q_path, "f_path": f_path}


def _eval_ids(n: int = 4, seq: int = 48, seed: int = 2) -> torch.Tensor:
    # Another batch and sequence length than the export example ([2, 8]): the dims are dynamic.
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


def _graph_nodes(gm, target) -> list:
    return [n for n in gm.graph.nodes if n.target is target]


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_qdq_nodes_one_per_site_and_per_quantized_linear(tiny):
    report = onnx_qdq_report(tiny["q_path"])
    n_sites, n_linears = N_LAYERS * ACT_SITES_PER_LAYER, N_LAYERS * LINEARS_PER_LAYER
    # The graph agrees with the architecture (lm_head is skipped by default).
    assert len(_graph_nodes(tiny["qgm"], torch.ops.llmq.quantize_dequantize.default)) == n_sites
    assert len(_graph_nodes(tiny["qgm"], torch.ops.llmq.dequantize_weight.default)) == n_linears

    assert report["quantize_linear"] == n_sites
    assert report["quantize_linear_types"] == {"UINT4": n_sites}  # asymmetric 4-bit activations
    assert report["weight_dequantize_linear"] == n_linears
    assert report["dequantize_linear"] == n_sites + n_linears
    assert report["dequantize_linear_types"] == {"UINT4": n_sites, "INT4": n_linears}

    model = onnx.load(str(tiny["q_path"]))
    users = _consumers(model)
    initializers = {t.name for t in model.graph.initializer}
    matmuls_per_site = []
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        (dq,) = users[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and _attrs(q)["axis"] == -1 and _attrs(dq)["axis"] == -1
        assert list(dq.input[1:]) == list(q.input[1:])  # same scale and zero point
        assert q.input[1] in initializers and q.input[2] in initializers
        matmuls_per_site.append(sum(u.op_type in ("MatMul", "Gemm") for u in users[dq.output[0]]))
    # Every quantized Linear reads an activation QDQ; q/k/v of a layer read the same one.
    assert sum(matmuls_per_site) == n_linears
    assert sorted(matmuls_per_site) == sorted([3, 1, 1, 1] * N_LAYERS)


def test_weights_stored_as_int4_initializers(tiny):
    qgm, model = tiny["qgm"], onnx.load(str(tiny["q_path"]))
    initializers = {t.name: t for t in model.graph.initializer}
    users = _consumers(model)
    quantized_elements = 0
    for node in _graph_nodes(qgm, torch.ops.llmq.dequantize_weight.default):
        name, scale_name = node.args[0].target, node.args[1].target
        expected = qgm.get_buffer(name)
        tensor = initializers[name]
        assert tensor.data_type == onnx.TensorProto.INT4
        assert len(tensor.raw_data) == expected.numel() // 2  # two values a byte
        np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), expected.numpy())
        (dq,) = users[name]
        assert dq.op_type == "DequantizeLinear" and _attrs(dq)["axis"] == 0 and _attrs(dq).get("block_size", 0) == 0
        np.testing.assert_array_equal(numpy_helper.to_array(initializers[dq.input[1]]), qgm.get_buffer(scale_name).numpy())
        assert name.removesuffix("_int") not in initializers  # no float copy under the weight's name
        quantized_elements += expected.numel()
    assert not any(n.op_type == "Cast" and _attrs(n)["to"] in (onnx.TensorProto.INT4, onnx.TensorProto.INT8) for n in model.graph.node)

    # No float tensor holds a quantized weight, dequantized, as is or transposed.
    dequantized = [
        llmq_fx.qmath.dequantize_weight(qgm.get_buffer(n.args[0].target), qgm.get_buffer(n.args[1].target)).numpy()
        for n in _graph_nodes(qgm, torch.ops.llmq.dequantize_weight.default)
    ]
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
            values = numpy_helper.to_array(t)
            assert not any(values.shape == w.shape and np.allclose(values, w) for w in dequantized), t.name
            assert not any(values.shape == w.T.shape and np.allclose(values, w.T) for w in dequantized), t.name

    q_report, f_report = onnx_qdq_report(tiny["q_path"]), onnx_qdq_report(tiny["f_path"])
    assert q_report["int4_weight_initializers"] == N_LAYERS * LINEARS_PER_LAYER
    # The quantized weights left float storage; what stays float is embeddings, lm_head, norms,
    # biases and the scales.
    n_scales = sum(qgm.get_buffer(n.target).numel() for n in qgm.graph.nodes if n.op == "get_attr" and n.target.endswith("scale"))
    assert q_report["float_initializer_elements"] <= f_report["float_initializer_elements"] - quantized_elements + n_scales + 1024
    ratio = q_report["file_bytes"] / f_report["file_bytes"]
    print(f"\nfile size float {f_report['file_bytes']} B, W4A4 {q_report['file_bytes']} B, ratio {ratio:.3f}")
    assert ratio < 0.8


def test_onnxruntime_matches_quantized_graph(tiny):
    ids = _eval_ids()
    with torch.no_grad():
        ref = tiny["qgm"](ids)
    out = OnnxCausalLM(tiny["q_path"])(ids)
    assert out.shape == ref.shape == (4, 48, VOCAB) and out.dtype == torch.float32
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    ppl_ort, ppl_torch = _perplexity(out, ids), _perplexity(ref, ids)
    print(f"\ntop-1 agreement {top1:.4f}, ppl ORT {ppl_ort:.4f} vs PyTorch {ppl_torch:.4f}, max |diff| {float((out - ref).abs().max()):.2e}")
    assert top1 >= 0.99
    assert abs(ppl_ort - ppl_torch) / ppl_torch < 0.01


def test_float_export_matches_float_graph(tiny):
    report = onnx_qdq_report(tiny["f_path"])
    assert report["quantize_linear"] == report["dequantize_linear"] == 0
    ids = _eval_ids(n=1, seq=100, seed=3)
    with torch.no_grad():
        ref = tiny["model"](ids).logits
    out = OnnxCausalLM(tiny["f_path"])(ids)
    assert float((out - ref).abs().max()) < 1e-4


def test_model_interface(tiny):
    model = onnx.load(str(tiny["q_path"]))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert out.name == "logits"
    onnx.checker.check_model(model, full_check=True)


def test_grouped_weights_export_with_block_size(tiny, tmp_path):
    qgm = llmq_fx.quantize(tiny["gm"], tiny["calib"], static_config(n_clusters=4, w_group_size=32), progress=False)
    path = to_onnx(qgm, tmp_path / "g32.onnx", format="qdq")
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    users = _consumers(model)
    weights = _graph_nodes(qgm, torch.ops.llmq.dequantize_weight.default)
    assert len(weights) == N_LAYERS * LINEARS_PER_LAYER
    for node in weights:
        out_features, in_features = qgm.get_buffer(node.args[0].target).shape
        (dq,) = users[node.args[0].target]
        assert _attrs(dq)["axis"] == 1 and _attrs(dq)["block_size"] == 32
        assert list(initializers[dq.input[1]].dims) == [out_features, in_features // 32]
    assert onnx_qdq_report(path)["int4_weight_initializers"] == len(weights)
    ids = _eval_ids(seed=4)
    with torch.no_grad():
        ref = qgm(ids)
    out = OnnxCausalLM(path)(ids)
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99


@pytest.mark.parametrize(
    "config, act_type, weight_type",
    [
        # 3-bit codes fit 4-bit types but need the clamp to [qmin, qmax] before QuantizeLinear.
        (dict(w_bits=3, a_bits=3), "UINT4", "INT4"),
        (dict(w_bits=8, a_bits=8, a_symmetric=True), "INT8", "INT8"),
    ],
)
def test_other_bit_widths_map_to_narrowest_type(tiny, tmp_path, config, act_type, weight_type):
    qgm = llmq_fx.quantize(tiny["gm"], tiny["calib"], static_config(n_clusters=4, **config), progress=False)
    path = to_onnx(qgm, tmp_path / "m.onnx", format="qdq")
    report = onnx_qdq_report(path)
    n_sites, n_linears = N_LAYERS * ACT_SITES_PER_LAYER, N_LAYERS * LINEARS_PER_LAYER
    assert report["quantize_linear_types"] == {act_type: n_sites}
    expected_dq = {act_type: n_sites}
    expected_dq[weight_type] = expected_dq.get(weight_type, 0) + n_linears
    assert report["dequantize_linear_types"] == expected_dq
    ids = _eval_ids(seed=5)
    with torch.no_grad():
        ref = qgm(ids)
    out = OnnxCausalLM(path)(ids)
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.99
    assert abs(_perplexity(out, ids) - _perplexity(ref, ids)) / _perplexity(ref, ids) < 0.01


def test_external_data_is_written_next_to_model(tiny, tmp_path):
    path = to_onnx(tiny["qgm"], tmp_path / "ext.onnx", external_data=True, format="qdq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    report = onnx_qdq_report(path)
    assert report["file_bytes"] == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert report["int4_weight_initializers"] == N_LAYERS * LINEARS_PER_LAYER
    ids = _eval_ids(n=2, seq=16, seed=6)
    torch.testing.assert_close(OnnxCausalLM(path)(ids), OnnxCausalLM(tiny["q_path"])(ids), rtol=0, atol=0)


def test_unwritable_path_raises_export_error(tiny, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    target = blocker / "model.onnx"
    with pytest.raises(ExportError, match="not_a_folder/model.onnx"):
        to_onnx(tiny["gm"], target, format="qdq")
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_folder"]


def test_failed_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    # With external data, so that a half-written data file would show up too.
    with pytest.raises(ExportError, match="simulated checker failure"):
        to_onnx(tiny["qgm"], tmp_path / "bad.onnx", external_data=True, format="qdq")
    assert list(tmp_path.iterdir()) == []


@torch.library.custom_op("llmq_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation."""
    return x.clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unsupported_op_names_op_and_node(tiny, tmp_path):
    gm = copy.deepcopy(tiny["qgm"])
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    with gm.graph.inserting_before(linear):
        odd = gm.graph.call_function(torch.ops.llmq_test.mystery.default, (linear.args[0],))
    linear.replace_input_with(linear.args[0], odd)
    gm.recompile()
    with pytest.raises(ExportError, match=rf"llmq_test\.mystery.*node {odd.name}"):
        to_onnx(gm, tmp_path / "odd.onnx", format="qdq")
    assert list(tmp_path.iterdir()) == []
