"""Tiny random-init OPT models built once per session; every test reads from them."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import llmq_fx

warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 96


def make_opt(**overrides) -> OPTForCausalLM:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    # Random init gives near-identical channels; spread norm weights and biases so that channel
    # statistics differ the way trained models' do (and clustering has something to find).
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g)))
            elif "layer_norm" in name and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("bias"):  # HF initialises Linear biases to zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="session")
def opt_model():
    return make_opt()


@pytest.fixture(scope="session")
def opt_gm(opt_model):
    return llmq_fx.trace(opt_model)


@pytest.fixture(scope="session")
def opt350_model():
    # opt-350m's shape: post-LN (do_layer_norm_before=False) and project_in/project_out.
    return make_opt(hidden_size=48, word_embed_proj_dim=32, num_attention_heads=4, ffn_dim=96, do_layer_norm_before=False)


@pytest.fixture(scope="session")
def calib():
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="session")
def eval_ids():
    return torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(3))


# The static RPTQ-style pipeline (SmoothQuant alpha 0.5, k-means clusters, round-to-nearest
# weights, no rotation, no clipping): the default before rotation/GPTQ/dynamic activations became
# the project default. Tests of smoothing, clustering and static QDQ pin it so that they keep
# testing that path whatever QuantConfig() defaults to; keys given override it.
STATIC = dict(rotate=False, a_dynamic=False, a_clip_ratio=1.0, gptq=False, w_clip=False, smooth_alpha=0.5, n_clusters=8, w_group_size=None,
              embed_bits=None, lm_head_bits=None)


def static_config(**overrides) -> llmq_fx.QuantConfig:
    return llmq_fx.QuantConfig(**{**STATIC, **overrides})
