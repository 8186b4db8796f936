"""The README's generation prompts on the built-in opt-mini: onnxruntime-genai generates what the quantized graph does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import llmq_fx
from llmq_fx.corpus import calibration_set, load_text, tokenize
from llmq_fx.export import generate, to_genai
from llmq_fx.models import load_model

README = Path(__file__).resolve().parents[1] / "README.md"


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
    out = to_genai(qgm, model, tokenizer, tmp_path_factory.mktemp("genai") / "opt-mini")
    return qgm, out


@pytest.mark.parametrize("prompt", readme_prompts())
def test_greedy_generation_agrees_with_the_quantized_graph(folder, prompt):
    qgm, out = folder
    result = generate(out, prompt, 16, stop_at_eos=False)
    import onnxruntime_genai as og

    ids = list(og.Tokenizer(og.Model(str(out))).encode(prompt))
    greedy = []
    with torch.no_grad():
        current = torch.tensor([ids])
        for _ in range(16):
            token = qgm(current)[0, -1].argmax()
            greedy.append(int(token))
            current = torch.cat([current, token.view(1, 1)], 1)
    assert result.tokens == greedy, prompt
    assert result.text.strip()
