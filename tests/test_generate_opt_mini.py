"""The README's generation prompts on the built-in opt-mini: onnxruntime-genai generates what the quantized graph does.

The ONNX decoder computes the quantized graph's logits in another float order (fused attention, other
matmul kernels), so now and then an activation lands on the other side of a 4-bit rounding step and
from that token on the two runtimes' logits differ by up to about 2 (measured on this CPU: exactly 0
before the first such flip, 0.4-2.1 after it). Where the quantized graph's top two logits are closer
than that, either token is a faithful greedy choice, and which one a CPU picks depends on its kernels:
free-running greedy runs then part and never meet again (CI's CPU parted from ours at token 8 of
"To install the package,"). So the check is teacher-forced: the quantized graph scores the ONNX
folder's own generation, and every generated token must be its top-1 or a near tie that the measured
runtime difference at that position explains.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import llmq_fx
from llmq_fx.corpus import calibration_set, load_text, tokenize
from llmq_fx.export import generate, to_genai
from llmq_fx.export.runtime import OnnxCausalLM
from llmq_fx.models import load_model

README = Path(__file__).resolve().parents[1] / "README.md"
NEW_TOKENS = 16
NEAR_TIE = 0.5  # logits; the largest top-1/top-2 gap a rounding flip is allowed to reorder


def readme_prompts() -> list[str]:
    """The ``--prompt "..."`` of every ``llmq-fx generate`` command in the README."""
    prompts = re.findall(r'llmq-fx generate \S+ --prompt "([^"]+)"', README.read_text())
    assert prompts, "the README shows no llmq-fx generate command"
    return prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, tokenizer = load_model("opt-mini")
    calib = calibration_set(tokenize(tokenizer, load_text("calib")), 8, 128)  # a short calibration: the test is about export
    qgm = llmq_fx.quantize(llmq_fx.trace(model), calib, progress=False)
    # Accuracy level 0: the kernels multiply the graph's own float activations, so the folder computes
    # the quantized graph's logits and its greedy choices can be held to them. The default, level 4,
    # requantizes each MatMulNBits input to int8 per block (its logits move by up to about 2 on opt-mini,
    # so a greedy run can take a second choice 0.7 below the top-1); its cost is perplexity, checked in
    # tests/test_cli.py and reported in bench/deploy.py.
    out = to_genai(qgm, model, tokenizer, tmp_path_factory.mktemp("genai") / "opt-mini", accuracy_level=0)
    return qgm, out, model


def unexplained_choices(qgm, onnx, prompt_ids: list[int], tokens: list[int]) -> tuple[int, list[str]]:
    """Score ``prompt_ids + tokens`` with ``qgm`` and the ONNX decoder; return how many tokens are
    ``qgm``'s top-1, and a line for each token that is neither its top-1 nor a near tie explained by
    the two runtimes' logit difference at that position."""
    seq = torch.tensor([prompt_ids + tokens])
    start = len(prompt_ids) - 1
    with torch.no_grad():
        ref = qgm(seq)[0, start:-1]
    runtime = torch.as_tensor(onnx(seq))[0, start:-1]
    difference = (ref - runtime).abs().amax(-1)
    gap = ref.amax(-1) - ref[torch.arange(len(tokens)), torch.tensor(tokens)]
    top1 = int((gap == 0).sum())
    bad = [
        f"token {i}: {tokens[i]} is {float(gap[i]):.3f} below the top-1 {int(ref[i].argmax())} (runtimes differ by {float(difference[i]):.3f})"
        for i in range(len(tokens))
        if gap[i] > min(float(difference[i]), NEAR_TIE)
    ]
    return top1, bad


@pytest.mark.parametrize("prompt", readme_prompts())
def test_greedy_generation_agrees_with_the_quantized_graph(folder, prompt):
    import onnxruntime_genai as og

    qgm, out, _ = folder
    result = generate(out, prompt, NEW_TOKENS, stop_at_eos=False)
    assert len(result.tokens) == NEW_TOKENS and result.text.strip()
    ids = list(og.Tokenizer(og.Model(str(out))).encode(prompt))
    onnx = OnnxCausalLM(out)
    top1, bad = unexplained_choices(qgm, onnx, ids, result.tokens)
    assert not bad, f"{prompt!r}: " + "; ".join(bad)
    assert top1 >= NEW_TOKENS - 2, f"{prompt!r}: only {top1} of {NEW_TOKENS} generated tokens are the quantized graph's top-1"
    # The check has teeth: the same tokens one position late (a decoder whose positions or cache
    # were off by one would generate that) are not the quantized graph's choices.
    late = [ids[-1]] + result.tokens[:-1]
    top1_late, bad_late = unexplained_choices(qgm, onnx, ids, late)
    assert bad_late or top1_late < NEW_TOKENS - 2


def test_the_export_check_catches_a_decoder_that_lost_the_quantization(folder):
    """``check_decoder`` (run by every export) passes the transplanted decoder and refuses one whose
    Linear codes were copied with the wrong sign. On a trained model: in the random-init test
    configs one layer barely moves the logits."""
    from llmq_fx.export.decoder import check_decoder, quantized_decoder

    qgm, _, model = folder
    dgm = quantized_decoder(qgm, model)
    good = check_decoder(qgm, dgm)
    assert good["top1_agreement"] >= 0.75 and good["relative_difference"] <= 0.05
    codes = sorted({n.args[0].target for n in dgm.graph.nodes if n.target == torch.ops.llmq.dequantize_weight.default})
    assert codes
    buffer = dgm.get_buffer(codes[len(codes) // 2])
    buffer.copy_(-buffer)  # one Linear (of 24) with its codes negated
    with pytest.raises(llmq_fx.ExportError, match="does not compute the quantized graph's logits"):
        check_decoder(qgm, dgm)
