"""RotatePass: float function unchanged, orthogonal factors, online nodes, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmq_fx
from llmq_fx.errors import UnsupportedModelError
from llmq_fx.graph import observer_sites
from llmq_fx.passes import InsertObserversPass
from llmq_fx.passes.rotate import (
    ONLINE_ROTATION_META,
    RotatePass,
    hadamard,
    kron_factors,
    kron_matmul,
    paley_hadamard,
    rotation_matrix,
)

from conftest import VOCAB, make_opt, static_config


def _logits(gm, ids):
    out = gm(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.fixture(scope="module")
def llama_gm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, as in trained models
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.exp(torch.randn(p.shape, generator=g) * 0.5))
    return llmq_fx.trace(model)


@pytest.mark.parametrize("n", [1, 2, 32, 48, 96, 576, 1536])
def test_rotation_matrices_are_orthogonal(n):
    g = torch.Generator().manual_seed(0)
    q = rotation_matrix(n, g)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    a, b = kron_factors(n, g)
    assert a.shape[0] * b.shape[0] == n
    t = torch.kron(a, b)
    torch.testing.assert_close(t @ t.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    w = torch.randn(5, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_matmul(w, a, b), w @ t, atol=1e-12, rtol=1e-12)  # the product, factored


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 60, 108])
def test_paley_hadamard(n):
    h = paley_hadamard(n)
    assert set((h * n**0.5).round().unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h * n**0.5, (h * n**0.5).round(), atol=1e-12, rtol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_paley_hadamard_orders_without_construction():
    for n in (2, 9, 18, 40, 46, 52):  # 40, 52 are Hadamard orders, but not of Paley's two kinds
        assert paley_hadamard(n) is None


@pytest.mark.parametrize("n", [48, 96, 576, 768, 1536])
def test_rotation_is_a_full_hadamard_where_paley_fits(n):
    """Non-power-of-two widths (SmolLM2's 576 and 1536, OPT-125m's 768) get entries +-1/sqrt(n): no channel
    is left concentrated in a few outputs, which a random orthogonal odd factor would allow."""
    g = torch.Generator().manual_seed(0)
    for q in (rotation_matrix(n, g), torch.kron(*kron_factors(n, g))):
        torch.testing.assert_close(q.abs(), torch.full_like(q, n**-0.5), atol=1e-12, rtol=0)


def test_rotation_falls_back_to_random_orthogonal_factor():
    g = torch.Generator().manual_seed(0)
    q = rotation_matrix(46, g)  # 2 x 23: no Paley order 23 or 46
    torch.testing.assert_close(q @ q.T, torch.eye(46, dtype=torch.float64), atol=1e-10, rtol=0)
    assert not torch.allclose(q.abs(), torch.full_like(q, 46**-0.5))


def test_hadamard_entries():
    h = hadamard(8) * 8**0.5
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError):
        hadamard(12)


@pytest.mark.parametrize("which", ["opt", "llama"])
def test_float_output_unchanged(which, opt_gm, llama_gm, eval_ids):
    gm = opt_gm if which == "opt" else llama_gm
    rotated = copy.deepcopy(gm)
    RotatePass(seed=3)(rotated)
    for ids in (eval_ids, eval_ids[:1, :7]):
        ref, out = _logits(gm, ids), _logits(rotated, ids)
        torch.testing.assert_close(out, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
    report = rotated.meta["llmq_fx"]["rotation"]
    assert report["residual"]["norm"] == ("layer_norm" if which == "opt" else "rms_norm")
    assert report["residual"]["centered"] is (which == "opt")
    assert report["residual"]["full_hadamard"]  # 32 (OPT) and 48 = 4 x 12 (Llama)
    assert report["heads"]["value_heads"] == 2
    assert len(report["online"]["fc2_inputs"]) == 2
    # LayerNorm replaced by its RMS form; no layer_norm left.
    assert not any(n.target == torch.ops.aten.layer_norm.default for n in rotated.graph.nodes)


def test_rotation_moves_weights_and_unties(opt_gm):
    rotated = copy.deepcopy(opt_gm)
    RotatePass(seed=0)(rotated)
    sd = dict(rotated.named_parameters(remove_duplicate=False))
    ref = dict(opt_gm.named_parameters(remove_duplicate=False))
    assert not torch.allclose(sd["model.decoder.layers.0.self_attn.q_proj.weight"], ref["model.decoder.layers.0.self_attn.q_proj.weight"])
    lm = [n for n in rotated.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default][-1]
    emb = [n for n in rotated.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.embedding.default][0]
    assert lm.args[1].target != emb.args[0].target  # tied embedding/lm_head untied
    # norm weights are ones after folding into the readers
    assert torch.equal(sd["model.decoder.layers.0.self_attn_layer_norm.weight"], torch.ones(32))


def test_kept_tie_shares_the_table_and_moves_the_norm_into_a_matmul(llama_gm, eval_ids):
    """keep_tied: the lm_head reads the rotated embedding table itself, and the final norm's weight g sits in
    a d x d matmul in front of it, M = Q^T diag(g) Q: symmetric, with g as its eigenvalues."""
    final_g = next(t for name, t in llama_gm.named_parameters() if name.endswith("model.norm.weight")).detach().clone()
    kept = copy.deepcopy(llama_gm)
    RotatePass(seed=3, keep_tied=True)(kept)
    for ids in (eval_ids, eval_ids[:1, :7]):
        ref, out = _logits(llama_gm, ids), _logits(kept, ids)
        torch.testing.assert_close(out, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
    assert kept.meta["llmq_fx"]["rotation"]["residual"]["kept_tied"] == ["lm_head"]
    lm = [n for n in kept.graph.nodes if n.target == torch.ops.aten.linear.default][-1]
    emb = next(n for n in kept.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert lm.args[1].target == emb.args[0].target
    assert lm.args[0].target == torch.ops.aten.matmul.default
    m = kept.get_parameter(lm.args[0].args[1].target).double()
    torch.testing.assert_close(m, m.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.eigvalsh(m), final_g.double().sort().values, atol=1e-5, rtol=1e-5)
    untied = copy.deepcopy(llama_gm)
    RotatePass(seed=3)(untied)
    n_params = lambda g: sum(p.numel() for p in g.parameters())  # noqa: E731
    d, vocab = m.shape[0], kept.get_parameter(lm.args[1].target).shape[0]
    assert n_params(untied) - n_params(kept) == vocab * d - d * d  # one table fewer, one d x d matrix more


def test_a_layer_norm_model_is_untied_even_with_keep_tied(opt_gm):
    """OPT's LayerNorm: the table is centred and the norm has a bias, which one shared table cannot hold."""
    rotated = copy.deepcopy(opt_gm)
    RotatePass(keep_tied=True)(rotated)
    assert rotated.meta["llmq_fx"]["rotation"]["residual"]["kept_tied"] == []
    lm = [n for n in rotated.graph.nodes if n.target == torch.ops.aten.linear.default][-1]
    emb = next(n for n in rotated.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert lm.args[1].target != emb.args[0].target


def test_online_rotation_nodes_keep_fc2_role(llama_gm):
    rotated = copy.deepcopy(llama_gm)
    RotatePass()(rotated)
    assert sum(1 for n in rotated.graph.nodes if n.meta.get(ONLINE_ROTATION_META)) == 2 * 6
    InsertObserversPass()(rotated)
    roles = sorted(s.role for s in observer_sites(rotated))
    assert roles.count("fc2") == 2 and roles.count("qkv") == 2 and roles.count("fc1") == 2


def test_rotation_lowers_w4a4_error_with_outlier_channels(calib, eval_ids):
    # Trained LLMs have a few residual channels far larger than the rest; give the tiny model two.
    model = make_opt()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[:, [3, 17]] *= 40.0
    gm = llmq_fx.trace(model)
    ref = _logits(gm, eval_ids)
    errs = {}
    for rotate in (False, True):
        cfg = static_config(rotate=rotate, smooth_alpha=None, n_clusters=1, w_bits=None)
        q = llmq_fx.quantize(gm, calib, cfg, progress=False)
        errs[rotate] = (_logits(q, eval_ids) - ref).pow(2).mean().item()
    assert errs[True] < 0.5 * errs[False], errs


def test_post_ln_is_rejected_when_required_and_left_untouched_otherwise(opt350_model):
    gm = llmq_fx.trace(opt350_model)
    with pytest.raises(UnsupportedModelError, match="rotation"):
        RotatePass(required=True)(gm)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    result = RotatePass()(gm)  # "auto": every pattern is checked before the first weight changes
    assert not result.modified and gm.code == code
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert "post-LN" in gm.meta["llmq_fx"]["rotation_skipped"]


def test_auto_rotation_skips_post_ln_and_true_insists(opt350_model, opt_gm, calib, eval_ids):
    gm = llmq_fx.trace(opt350_model)
    qgm = llmq_fx.quantize(gm, calib, llmq_fx.QuantConfig(), progress=False)  # rotate="auto" by default
    meta = qgm.meta["llmq_fx"]
    assert "post-LN" in meta["rotation_skipped"] and "rotation" not in meta
    assert not any(n.meta.get(ONLINE_ROTATION_META) for n in qgm.graph.nodes)
    with torch.no_grad():
        assert torch.isfinite(qgm(eval_ids)).all()
    with pytest.raises(UnsupportedModelError, match="rotation"):
        llmq_fx.quantize(gm, calib, llmq_fx.QuantConfig(rotate=True), progress=False)
    # Pre-LN: "auto" rotates.
    pre = llmq_fx.quantize(opt_gm, calib, llmq_fx.QuantConfig(), progress=False)
    assert pre.meta["llmq_fx"]["rotation_skipped"] is None and pre.meta["llmq_fx"]["rotation"]["residual"]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_rotate_value_is_a_config_error(value):
    with pytest.raises(llmq_fx.ConfigError, match="rotate"):
        llmq_fx.QuantConfig(rotate=value)
