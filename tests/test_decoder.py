"""The KV-cache decoder: quantization moved onto it, exported with MatMulNBits, run by onnxruntime-genai."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmq_fx
from llmq_fx.errors import CheckpointError
from llmq_fx.export import generate, onnx_qdq_report, quantized_decoder, to_genai, to_onnx
from llmq_fx.export.genai import genai_config
from llmq_fx.export.onnx_export import PACKED_META, nbits_block_size
from conftest import STATIC, VOCAB, make_opt

MIXED = {**STATIC, "a_outlier_bits": 8, "n_clusters": 4}


def make_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


MODELS = {"opt": make_opt, "llama": make_llama}


@pytest.fixture(scope="module", params=[("opt", {}), ("llama", {}), ("opt", MIXED)], ids=["opt-default", "llama-default", "opt-static-mixed"])
def quantized(request, calib):
    name, config = request.param
    model = MODELS[name]()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        float_logits = model(input_ids=ids, use_cache=False).logits.clone()
    qgm = llmq_fx.quantize(llmq_fx.trace(model), calib, config, progress=False)
    dgm = quantized_decoder(qgm, model)  # fused: llmq.rms_norm, llmq.group_query_attention
    plain = quantized_decoder(qgm, model, fuse=False)
    return {"model": model, "qgm": qgm, "dgm": dgm, "plain": plain, "ids": ids, "float_logits": float_logits}


def _empty_past(spec, batch=1):
    return [torch.zeros(batch, spec["num_kv_heads"], 0, spec["head_size"]) for _ in range(2 * spec["num_layers"])]


def _stepwise(dgm, ids, split):
    """Logits of ``ids`` computed as a prefill of ``split`` tokens, then one token at a time with the cache."""
    spec = dgm.meta["llmq_fx"]["decoder"]
    with torch.no_grad():
        out = dgm(ids[:, :split], torch.ones(1, split, dtype=torch.long), torch.arange(split)[None], _empty_past(spec))
        logits, past = [out[0]], list(out[1:])
        for t in range(split, ids.shape[1]):
            out = dgm(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), past)
            logits.append(out[0])
            past = list(out[1:])
    return torch.cat(logits, 1)


@pytest.mark.parametrize("which", ["dgm", "plain"])
def test_prefill_plus_decode_equals_the_prefill_only_graph(quantized, which):
    qgm, dgm, ids = quantized["qgm"], quantized[which], quantized["ids"]
    with torch.no_grad():
        ref = qgm(ids)
    torch.testing.assert_close(_stepwise(dgm, ids, 16), ref, rtol=0, atol=1e-5)  # one prefill
    torch.testing.assert_close(_stepwise(dgm, ids, 5), ref, rtol=0, atol=1e-5)  # prefill 5, then 11 decode steps
    spec = dgm.meta["llmq_fx"]["decoder"]
    assert spec["num_layers"] == 2 and dgm.meta["llmq_fx"]["config"] == qgm.meta["llmq_fx"]["config"]


def test_the_float_model_is_untouched(quantized):
    model, ids = quantized["model"], quantized["ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, quantized["float_logits"], rtol=0, atol=0)


def _ort_feed(spec, ids, past=None, start=0):
    batch, seq = ids.shape
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, start + seq), np.int64),
            "position_ids": np.arange(start, start + seq)[None].repeat(batch, 0)}
    for i in range(spec["num_layers"]):
        for j, kv in enumerate(("key", "value")):
            feed[f"past_key_values.{i}.{kv}"] = (np.zeros((batch, spec["num_kv_heads"], 0, spec["head_size"]), np.float32)
                                                 if past is None else past[2 * i + j])
    return feed


@pytest.mark.parametrize("fmt", ["fast", "qdq"])
def test_onnx_decoder_matches_pytorch_step_by_step(quantized, tmp_path, fmt):
    import onnxruntime as ort

    dgm, ids = quantized["dgm" if fmt == "fast" else "plain"], quantized["ids"]
    spec = dgm.meta["llmq_fx"]["decoder"]
    path = to_onnx(dgm, tmp_path / "model.onnx", format=fmt, accuracy_level=0)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, _ort_feed(spec, ids[:, :6]))
    logits = [out[0]]
    for t in range(6, 16):
        out = session.run(None, _ort_feed(spec, ids[:, t:t + 1], out[1:], start=t))
        logits.append(out[0])
    ref = _stepwise(dgm, ids, 6).numpy()
    np.testing.assert_allclose(np.concatenate(logits, 1), ref, rtol=0, atol=1e-4)
    report = onnx_qdq_report(path)
    bits = {}
    for r in llmq_fx.summary(quantized["qgm"]):
        if r["w_bits"] is not None:
            bits[str(r["w_bits"])] = bits.get(str(r["w_bits"]), 0) + 1
    tables = sum(1 for v in quantized["qgm"].meta["llmq_fx"].get("embeddings", {}).values() if v["kind"] == "embedding")
    if fmt == "fast":  # every integer weight is a MatMulNBits (or GatherBlockQuantized): no weight DequantizeLinear
        assert report["matmul_nbits_bits"] == bits and report["op_types"].get("GatherBlockQuantized", 0) == tables
        assert report["weight_dequantize_linear"] == 0 and report["quantize_linear"] == 0
        # one fused attention per layer; the norms fused too (LayerNorm stays LayerNormalization unrotated)
        assert report["op_types"]["GroupQueryAttention"] == spec["num_layers"]
        rms = sum(1 for n in dgm.graph.nodes if n.target == torch.ops.llmq.rms_norm.default)
        assert report["op_types"].get("SimplifiedLayerNormalization", 0) == rms
        assert rms == (2 * spec["num_layers"] + 1 if dgm.meta["llmq_fx"]["config"]["rotate"] else 0) or spec["model_type"] == "llama"
        assert "Softmax" not in report["op_types"]
    else:
        assert report["matmul_nbits"] == 0 and report["weight_dequantize_linear"] == sum(bits.values()) + tables


def test_matmul_nbits_holds_the_graphs_codes_and_scales(quantized, tmp_path):
    """The packed uint8 blocks unpack to the GraphModule's int codes + 8, and the block scales repeat its per-row scale."""
    qgm, dgm = quantized["qgm"], quantized["dgm"]
    path = to_onnx(dgm, tmp_path / "model.onnx", format="fast", accuracy_level=0)
    with pytest.raises(llmq_fx.ExportError, match="fused ops .* only the 'fast' format"):
        to_onnx(dgm, tmp_path / "qdq.onnx", format="qdq")
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nodes
    held, packs = [], 0
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        meta = {e.key: e.value for e in node.metadata_props}
        # one weight (the blob keeps the codes' name), or several packed along N (q/k/v, fc1 alone, gate/up)
        weights = json.loads(meta[PACKED_META]) if PACKED_META in meta else [[node.input[1], attrs["N"]]]
        packs += PACKED_META in meta
        assert attrs["N"] == sum(n for _, n in weights)
        start = 0
        for name, n_out in weights:
            held.append(name)
            codes = qgm.get_buffer(name).numpy().astype(np.int32)
            scale = qgm.get_buffer(name.replace("weight_int", "weight_scale")).numpy()
            k_in = codes.shape[1]
            bits = 4 if int(codes.min()) >= -8 and int(codes.max()) <= 7 and attrs["bits"] == 4 else 8
            assert (codes.shape[0], attrs["K"], attrs["bits"]) == (n_out, k_in, bits)
            group = k_in // scale.shape[1] if scale.ndim == 2 else None
            assert attrs["block_size"] == nbits_block_size(k_in, group)
            packed = inits[node.input[1]][start:start + n_out]
            if bits == 4:
                unpacked = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n_out, k_in).astype(np.int32)
            else:
                unpacked = packed.reshape(n_out, k_in).astype(np.int32)
            np.testing.assert_array_equal(unpacked, codes + 2 ** (bits - 1))
            blocks = k_in // attrs["block_size"]
            expected = np.repeat(scale[:, None], blocks, 1) if scale.ndim == 1 else scale
            np.testing.assert_array_equal(inits[node.input[2]].reshape(attrs["N"], -1)[start:start + n_out], expected)
            start += n_out
    linears = [n.args[0].target for n in qgm.graph.nodes if n.target == torch.ops.llmq.dequantize_weight.default]
    spec = dgm.meta["llmq_fx"]["decoder"]
    gated = spec["model_type"] == "llama"  # gate/up read one input too
    tables = [n.input[0] for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert sorted(held + tables) == sorted(linears) and packs == spec["num_layers"] * (2 if gated else 1)  # q/k/v (+ gate/up)


def test_genai_folder_generates_what_the_pytorch_graph_generates(quantized, tmp_path):
    qgm, model = quantized["qgm"], quantized["model"]
    folder = to_genai(qgm, model, None, tmp_path / "genai", accuracy_level=0, decoder=quantized["dgm"])
    config = json.loads((folder / "genai_config.json").read_text())
    # Every layer's attention is the fused GroupQueryAttention: genai keeps one cache buffer and the op
    # writes into it (no copy of the whole cache per token); the greedy tokens below are read through it.
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["search"]["past_present_share_buffer"] is True
    prompt = [5, 17, 42, 3]
    result = generate(folder, prompt, 16, stop_at_eos=False)
    greedy, ids = [], torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(16):
            token = qgm(ids)[0, -1].argmax()
            greedy.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], 1)
    assert result.tokens == greedy
    assert result.prefill_s > 0 and result.decode_tokens_per_s > 0


def test_generate_refuses_what_it_cannot_run(quantized, tmp_path):
    with pytest.raises(CheckpointError, match="not an onnxruntime-genai folder"):
        generate(tmp_path, "hello", 4)
    folder = to_genai(quantized["qgm"], quantized["model"], None, tmp_path / "g", decoder=quantized["dgm"])
    with pytest.raises(CheckpointError, match="the prompt is empty"):
        generate(folder, [], 4)
    context = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    with pytest.raises(CheckpointError, match=f"the prompt has {context} tokens; the model's context is {context}"):
        generate(folder, [1] * context, 4)


def test_attention_with_a_head_size_onnxruntime_refuses_stays_unfused(calib):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # head size 12
    model = LlamaForCausalLM(config).eval()
    gm = llmq_fx.trace(model)
    dgm = quantized_decoder(gm, model)
    targets = [n.target for n in dgm.graph.nodes]
    assert torch.ops.llmq.group_query_attention.default not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets and torch.ops.llmq.rms_norm.default in targets
    # The unfused attention concatenates past and new itself: genai must not share one cache buffer.
    assert genai_config(dgm, model)["search"]["past_present_share_buffer"] is False

