"""llmq_fx.trace_checkpoint: a Hugging Face folder captured on the meta device, its weights read tensor by
tensor into bfloat16 host memory, quantized like the float32 model holding the same values."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, OPTForCausalLM

import llmq_fx
from llmq_fx.errors import CheckpointError
from llmq_fx.models import tiny_opt_config

VOCAB = 96


def _opt():
    torch.manual_seed(0)
    return OPTForCausalLM(tiny_opt_config(VOCAB)).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def _rounded(model):
    """The model with every parameter rounded to bfloat16 and kept in float32: the values the checkpoint graph holds."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.bfloat16().float())
    return out


@pytest.mark.parametrize("build", [_opt, _llama], ids=["opt", "llama"])
def test_checkpoint_graph_holds_the_checkpoint_in_bfloat16_and_quantizes_as_float32(build, tmp_path):
    model = build()
    model.save_pretrained(tmp_path)  # safetensors, the tied lm_head not written
    gm = llmq_fx.trace_checkpoint(tmp_path)
    ref = llmq_fx.trace(_rounded(model))
    params, expected = dict(gm.named_parameters()), dict(ref.named_parameters())
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert params[name].dtype == torch.bfloat16 and torch.equal(params[name].float(), value), name
    assert {t.device.type for t in list(gm.parameters()) + list(gm.buffers())} == {"cpu"}
    assert not any(isinstance(a, torch.device) and a.type == "meta" for n in gm.graph.nodes for a in [*n.args, *n.kwargs.values()])
    # Captured in float32: without rotation (which stores its rotated weights narrow again) the quantized model is
    # the float32 one's, bit for bit.
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = {"rotate": False, "calib_batch_size": 2}
    a = llmq_fx.quantize(gm, calib, cfg, progress=False, inplace=True)
    b = llmq_fx.quantize(ref, calib, cfg, progress=False)
    state, other = a.state_dict(), b.state_dict()
    assert state.keys() == other.keys()
    for key in state:
        assert torch.equal(state[key], other[key]), key


def test_checkpoint_graph_from_a_model_already_on_meta_is_the_same_graph(tmp_path):
    """trace_checkpoint(model=...) traces the caller's meta model (the CLI has built it for the export) instead of
    building another: the same tensors, and the model stays on the meta device."""
    from llmq_fx.models import meta_model

    model = _opt()
    model.save_pretrained(tmp_path)
    on_meta = meta_model(model.config)
    a, b = llmq_fx.trace_checkpoint(tmp_path, model=on_meta), llmq_fx.trace_checkpoint(tmp_path)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    with pytest.raises(CheckpointError, match="built on the meta device"):
        llmq_fx.trace_checkpoint(tmp_path, model=model)


def test_checkpoint_problems_name_the_tensor(tmp_path):
    _opt().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    name = "model.decoder.layers.1.fc1.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"no tensor '{name}'"):
        llmq_fx.trace_checkpoint(tmp_path)
    save_file({**tensors, name: tensors[name][:, :-1].contiguous()}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(256, 63\), the model expects \(256, 64\)"):
        llmq_fx.trace_checkpoint(tmp_path)
    weights.rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        llmq_fx.trace_checkpoint(tmp_path)


@pytest.mark.parametrize("build", [_opt, _llama], ids=["opt", "llama"])
def test_decoder_of_a_checkpoint_graph_needs_no_float_model(build, tmp_path):
    """The KV-cache decoder (export.decoder.quantized_decoder) captured from the model built on the meta device
    (models.meta_model: no weights anywhere) computes what the one captured from the float model computes,
    bit for bit, on a prefill and a decode step: every model tensor comes from the quantized graph, the rotation
    is replayed on shapes only, and the capture's own constants are made where the quantized graph lives."""
    from llmq_fx.export.decoder import quantized_decoder
    from llmq_fx.models import meta_model

    model = build()
    model.save_pretrained(tmp_path)
    gm = llmq_fx.trace_checkpoint(tmp_path, weights_dtype=torch.float32)
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    qgm = llmq_fx.quantize(gm, calib, {"calib_batch_size": 2}, progress=False, inplace=True)
    on_meta = meta_model(model.config)
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    a, b = quantized_decoder(qgm, on_meta), quantized_decoder(qgm, model)
    assert {t.device.type for t in list(a.parameters()) + list(a.buffers())} == {"cpu"}
    def fused(g):  # the llmq ops the ONNX export turns into onnxruntime's fused and 4-bit ops
        return sorted(str(n.target) for n in g.graph.nodes if str(n.target).startswith("llmq."))

    assert fused(a) == fused(b) and "llmq.group_query_attention.default" in fused(a)
    spec = a.meta["llmq_fx"]["decoder"]
    heads, size, layers = spec["num_kv_heads"], spec["head_size"], spec["num_layers"]
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    empty = [torch.zeros(1, heads, 0, size) for _ in range(2 * layers)]
    with torch.no_grad():
        first = [m(ids, torch.ones_like(ids), torch.arange(6)[None], empty) for m in (a, b)]
        nxt = ids[:, -1:]
        second = [m(nxt, torch.ones(1, 7, dtype=torch.long), torch.tensor([[6]]), list(f[1:]))
                  for m, f in zip((a, b), first)]
    for x, y in [*zip(first[0], first[1]), *zip(second[0], second[1])]:
        assert torch.equal(x, y)
