"""Model families beyond OPT and Llama, recognised by what their graphs compute (tiny random configs).

Qwen2 and Mistral (Llama-like), Qwen3 (QK-norm), Phi-3 (fused qkv_proj and gate_up_proj), Gemma2 and
Gemma3 (RMSNorm by ``1 + weight``, sandwich norms after attention and MLP, embedding times sqrt(d),
GELU-tanh gated MLP, logit softcapping in Gemma2). For each: rotation and smoothing leave the float
output unchanged, the default W4A4 recipe quantizes and exports to ONNX, and the rotation report says
which norms it rotated online and which it left alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import llmq_fx
from llmq_fx.export import OnnxCausalLM, to_onnx

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 16}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": 16}),
}
FLOAT_ONLY = {"gptq": False, "w_bits": None, "a_bits": None, "embed_bits": None, "lm_head_bits": None}
IDS = torch.randint(0, COMMON["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(config_cls(**COMMON, **extra)).eval()
        for p in model.parameters():  # random norm weights too, so that a norm folded wrongly shows
            if p.dim() == 1:
                p.data.normal_(0.0, 0.2).add_(1.0 if request.param not in ("gemma2", "gemma3") else 0.0)
    gm = llmq_fx.trace(model)
    with torch.no_grad():
        ref = gm(IDS[:1])
    return request.param, gm, ref


def _relative(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def test_rotation_leaves_the_float_output_unchanged(family):
    name, gm, ref = family
    qgm = llmq_fx.quantize(gm, IDS, {**FLOAT_ONLY, "rotate": True}, progress=False)
    with torch.no_grad():
        assert _relative(qgm(IDS[:1]), ref) < 1e-5, name
    report = qgm.meta["llmq_fx"]["rotation"]
    residual = report["residual"]
    assert residual["readers"] > 0 and residual["writers"] > 0
    if name in ("gemma2", "gemma3"):  # sandwich norms: rotated online after each of them, named
        assert len(residual["online_after_norms"]) == 2 * COMMON["num_hidden_layers"]
        assert all("post_" in p for p in residual["online_after_norms"])
    else:
        assert residual["online_after_norms"] == []
    if name in ("qwen3", "gemma3"):  # QK-norm: inside attention, not on the residual stream
        assert len(residual["norms_left_alone"]) == 2 * COMMON["num_hidden_layers"]
        assert all(p.endswith(("q_norm", "k_norm")) for p in residual["norms_left_alone"])
    left = report["heads"]["not_rotated"]
    if name == "gemma2":  # attention softcapping: eager matmul/softmax attention, no SDPA node to match
        assert report["heads"]["value_heads"] == 0
        assert [x["attention"] for x in left] == ["all"] and "softcapping" in left[0]["why"]
    else:  # Phi-3 too: V's rows of the fused qkv_proj only
        assert report["heads"]["value_heads"] == COMMON["num_hidden_layers"] and left == []


def test_smoothing_leaves_the_float_output_unchanged(family):
    name, gm, ref = family
    config = {**FLOAT_ONLY, "rotate": False, "smooth_alpha": 0.5, "a_dynamic": False, "a_group_size": None}
    qgm = llmq_fx.quantize(gm, IDS, config, progress=False)
    with torch.no_grad():
        assert _relative(qgm(IDS[:1]), ref) < 1e-5, name
    smoothed = [k for k, v in qgm.meta["llmq_fx"]["smoothing"].items() if v.get("smoothed")]
    assert smoothed, name


def test_default_w4a4_quantizes_and_exports(family, tmp_path):
    name, gm, ref = family
    qgm = llmq_fx.quantize(gm, IDS, None, progress=False)
    assert qgm.meta["llmq_fx"]["rotation_skipped"] is None, name
    with torch.no_grad():
        out = qgm(IDS[:1])
    assert torch.isfinite(out).all() and _relative(out, ref) < 0.5, name
    # Accuracy level 0: MatMulNBits multiplies the graph's own activations (level 4, the default,
    # requantizes them to int8 and moves these random-init logits further).
    path = to_onnx(qgm, tmp_path / f"{name}.onnx", accuracy_level=0)
    ort = torch.as_tensor(OnnxCausalLM(path)(IDS[:1]))
    # Same numbers up to 4-bit rounding flips (another float order); top-1 mostly kept.
    assert _relative(ort, out) < 0.15 and (ort.argmax(-1) == out.argmax(-1)).float().mean() >= 0.75, name
