"""QuantizeEmbeddingsPass: the token embedding and the lm_head in integers, exported to GatherBlockQuantized/MatMulNBits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmq_fx
from llmq_fx import qmath
from llmq_fx.export import OnnxCausalLM, onnx_qdq_report, to_onnx
from llmq_fx.graph import module_path
from llmq_fx.passes.quantize_embeddings import output_projection, token_embeddings

HEADS = {"embed_bits": 4, "embed_group_size": 16, "lm_head_bits": 8, "lm_head_group_size": 16}


def test_patterns_find_the_token_embedding_and_the_lm_head(opt_gm):
    embeddings = token_embeddings(opt_gm)
    assert [module_path(n) for n in embeddings] == ["model.decoder.embed_tokens"]  # not embed_positions
    assert module_path(output_projection(opt_gm)) == "lm_head"


@pytest.fixture(scope="module")
def quantized(opt_gm, calib):
    return llmq_fx.quantize(opt_gm, calib, HEADS, progress=False)


def test_tables_are_round_to_nearest_codes_of_the_rotated_float_tables(opt_gm, calib, quantized):
    rotated = llmq_fx.quantize(opt_gm, calib, {"embed_bits": None, "lm_head_bits": None}, progress=False)  # no embeddings pass
    for path, bits in (("model.decoder.embed_tokens", 4), ("lm_head", 8)):
        float_table = rotated.get_parameter(f"{path}.weight")
        codes, scale = quantized.get_buffer(f"{path}.weight_int"), quantized.get_buffer(f"{path}.weight_scale")
        ref_codes, ref_scale = qmath.quantize_weight(float_table, bits, 16, clip=True)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale), path
        assert -(2 ** (bits - 1)) <= int(codes.min()) and int(codes.max()) < 2 ** (bits - 1)
        assert not hasattr(quantized.get_submodule(path), "weight")  # the float table is gone
    rows = {r["module"]: r for r in llmq_fx.summary(quantized)}
    # 8-bit lm_head: its input is quantized to int8 per group, as MatMulNBits' 8-bit kernel (accuracy level 4) does
    assert rows["lm_head"]["w_bits"] == 8 and rows["lm_head"]["w_group_size"] == 16 and rows["lm_head"]["a_bits"] == 8
    record = quantized.meta["llmq_fx"]["embeddings"]
    assert record["model.decoder.embed_tokens"]["bits"] == 4 and record["lm_head"]["kind"] == "lm_head"


def test_the_graph_reads_the_dequantized_tables(quantized, eval_ids):
    """The logits equal the float head applied to the graph's own last hidden state with the dequantized lm_head."""
    head = output_projection(quantized)
    hidden = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is head:
                hidden["x"] = self.env[n.args[0]]
            return out

    with torch.no_grad():
        logits = Recorder(quantized).run(eval_ids)
    w = qmath.dequantize_weight(quantized.get_buffer("lm_head.weight_int"), quantized.get_buffer("lm_head.weight_scale"))
    bias = quantized.get_parameter(head.args[2].target)  # the final LayerNorm's bias, folded in by the rotation
    x = hidden["x"]  # the lm_head's input: int8 per group of 16, symmetric, absmax / 127 (an independent reference)
    groups = x.reshape(*x.shape[:-1], -1, 16)
    scale = (groups.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    assert torch.equal(x, (torch.round(groups / scale).clamp(-128, 127) * scale).reshape(x.shape))
    torch.testing.assert_close(logits, x @ w.T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fast", "qdq"])
def test_onnx_runs_the_quantized_tables(quantized, eval_ids, tmp_path, fmt):
    path = to_onnx(quantized, tmp_path / "m.onnx", format=fmt, accuracy_level=0)
    with torch.no_grad():
        ref = quantized(eval_ids).numpy()
    np.testing.assert_allclose(OnnxCausalLM(path)(eval_ids).numpy(), ref, rtol=0, atol=1e-4)
    ops = onnx_qdq_report(path)["op_types"]
    if fmt == "fast":
        assert ops.get("GatherBlockQuantized") == 1 and ops.get("DequantizeLinear") is None
        assert ops.get("Gather") == 1  # the position embedding stays a float Gather
    else:
        assert ops.get("GatherBlockQuantized") is None and ops.get("Gather") == 2


def test_an_lm_head_quantized_with_the_other_linears_is_left_to_them(opt_gm, calib, caplog):
    qgm = llmq_fx.quantize(opt_gm, calib, {"lm_head_bits": 8, "skip": [], "w_bits": 4}, progress=False)
    rows = {r["module"]: r for r in llmq_fx.summary(qgm)}
    assert rows["lm_head"]["w_bits"] == 4 and rows["lm_head"]["a_bits"] == 4  # W4A4 as every Linear, not W8
    assert "lm_head is quantized already" in caplog.text and "lm_head" not in qgm.meta["llmq_fx"]["embeddings"]
    with pytest.raises(llmq_fx.ConfigError, match="embed_group_size"):
        llmq_fx.QuantConfig(embed_group_size=0)


VOCAB_TIED = 160  # unlike any Linear's width


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_TIED, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a final norm weight that is not ones, so the norm's matmul matters
        model.model.norm.weight.copy_(torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.5))
    return model


# Weight-only, so that PyTorch and onnxruntime agree to float rounding (no 4-bit activation step to flip).
TIED = {"embed_bits": 4, "embed_group_size": 16, "lm_head_bits": 4, "lm_head_group_size": 16, "a_bits": None}


@pytest.fixture(scope="module")
def tied():
    model = _tied_llama()
    ids = torch.randint(0, VOCAB_TIED, (4, 32), generator=torch.Generator().manual_seed(2))
    return model, llmq_fx.quantize(llmq_fx.trace(model), ids, TIED, progress=False)


def test_a_tied_table_quantized_alike_is_stored_once(tied):
    model, qgm = tied
    assert qgm.meta["llmq_fx"]["rotation"]["residual"]["kept_tied"] == ["lm_head"]
    assert qgm.meta["llmq_fx"]["embeddings"]["lm_head"]["tied_to"] == "model.embed_tokens"
    tables = [name for name, t in qgm.named_buffers() if name.endswith("weight_int") and t.shape[0] == VOCAB_TIED]
    assert tables == ["model.embed_tokens.weight_int"]
    assert not [name for name, t in qgm.named_parameters() if t.shape[0] == VOCAB_TIED]  # no float table left
    head = output_projection(qgm)
    emb = next(n for n in qgm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert head.args[1] is emb.args[0]  # one dequantized table, two readers
    # Quantized alike but not tied (8-bit lm_head): two tables, the rotation unties them.
    other = llmq_fx.quantize(llmq_fx.trace(model), torch.randint(0, VOCAB_TIED, (4, 32)), {**TIED, "lm_head_bits": 8},
                             progress=False)
    assert other.meta["llmq_fx"]["rotation"]["residual"]["kept_tied"] == []
    assert len([n for n, t in other.named_buffers() if n.endswith("weight_int") and t.shape[0] == VOCAB_TIED]) == 2


def test_a_tied_table_exports_as_one_initializer_read_by_both_ops(tied, tmp_path):
    import onnx

    model, qgm = tied
    ids = torch.randint(0, VOCAB_TIED, (2, 16), generator=torch.Generator().manual_seed(3))
    path = to_onnx(qgm, tmp_path / "m.onnx", format="fast", accuracy_level=0)
    with torch.no_grad():
        ref = qgm(ids).numpy()
    np.testing.assert_allclose(OnnxCausalLM(path)(ids).numpy(), ref, rtol=0, atol=1e-4)
    graph = onnx.load(str(path)).graph
    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == graph.output[0].name)
    view = next(n for n in graph.node if n.output[0] == gbq.input[0])
    assert view.op_type == "Reshape" and view.input[0] == head.input[1] and gbq.input[2] == head.input[2]
    tables = [i for i in graph.initializer if i.dims and i.dims[0] == VOCAB_TIED]
    assert len(tables) == 2  # the packed codes and their scales, once each
    # The KV-cache decoder carries the tie too (quantized_decoder checks its logits against qgm's).
    from llmq_fx.export import quantized_decoder

    quantized_decoder(qgm, model)


def test_lm_head_gptq_rounds_the_tied_table_for_the_heads_inputs(tied):
    """lm_head_gptq: the shared table is GPTQ of the float table on the lm_head's input Hessian over the
    calibration batches (recomputed here from the graph's own lm_head input, an independent route), and
    its output error on those inputs is below round-to-nearest's."""
    model, rtn = tied
    ids = torch.randint(0, VOCAB_TIED, (4, 32), generator=torch.Generator().manual_seed(2))
    gq = llmq_fx.quantize(llmq_fx.trace(model), ids, {**TIED, "lm_head_gptq": True}, progress=False)
    assert gq.meta["llmq_fx"]["embeddings"]["lm_head"]["gptq"] and gq.meta["llmq_fx"]["embeddings"]["lm_head"]["tied_to"]
    float_only = llmq_fx.quantize(llmq_fx.trace(model), ids, {**TIED, "embed_bits": None, "lm_head_bits": None},
                                  progress=False)  # the same rotation and layers, float tables (still tied)
    head = output_projection(float_only)
    table = float_only.get_parameter(head.args[1].target).detach()
    inputs = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is head.args[0]:
                inputs.append(out.detach().reshape(-1, out.shape[-1]))
            return out

    with torch.no_grad():
        Recorder(float_only).run(ids)  # one batch: calib_batch_size 4 takes the 4 windows at once
    x = torch.cat(inputs).double()
    ref_codes, ref_scale = qmath.gptq_quantize_weight(table, (x.T @ x / x.shape[0]).float(), 4, 16, act_order=True, clip=True)
    codes, scale = gq.get_buffer("model.embed_tokens.weight_int"), gq.get_buffer("model.embed_tokens.weight_scale")
    assert torch.equal(codes, ref_codes) and torch.allclose(scale, ref_scale)

    def output_error(qgm):
        w = qmath.dequantize_weight(qgm.get_buffer("model.embed_tokens.weight_int"),
                                    qgm.get_buffer("model.embed_tokens.weight_scale")).double()
        return float((x @ (w - table.double()).T).square().mean())

    assert output_error(gq) < 0.9 * output_error(rtn)


def test_lm_head_gptq_on_a_graph_kept_elsewhere_is_a_config_error(tied):
    """The head's Hessian needs one forward of the whole graph: on a graph whose weights are not where the
    passes compute (quantize(device=...) on a host graph; the meta device stands in for a GPU) it refuses."""
    from llmq_fx.calibrate import calibration_batches
    from llmq_fx.passes.quantize_embeddings import EmbeddingsOptions, QuantizeEmbeddingsPass
    from llmq_fx.spec import WeightSpec

    model, _ = tied
    gm = llmq_fx.trace(model)
    gm.meta.setdefault("llmq_fx", {})["device"] = "meta"
    ids = torch.randint(0, VOCAB_TIED, (2, 16))
    step = QuantizeEmbeddingsPass(EmbeddingsOptions(lm_head=WeightSpec(4, 16, clip=True), lm_head_gptq=True))
    with pytest.raises(llmq_fx.ConfigError, match="lm_head_gptq runs the whole graph on the calibration batches"):
        step.with_calibration(calibration_batches(ids, 2), progress=False)(gm)
