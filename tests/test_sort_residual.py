"""Residual channel order chosen by the rotation (``RotatePass`` with ``sort``, computed from the
unrotated graph): the float model unchanged, the rotated readers' inputs sorted by range (measured
again on the rotated graph), the quantized model exported as a decoder."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from transformers import LlamaConfig, LlamaForCausalLM

import llmq_fx
from llmq_fx.errors import ConfigError
from llmq_fx.export import quantized_decoder
from llmq_fx.graph import is_linear
from conftest import VOCAB, make_opt

FLOAT_ONLY = {"gptq": False, "w_bits": None, "a_bits": None, "embed_bits": None, "lm_head_bits": None}


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _llama_tied():
    """Tied embedding and lm_head: the rotation keeps the tie (FLOAT_ONLY quantizes neither table), so the
    final norm's d x d matmul is in the residual basis too, on both axes."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.5))
    return model


MODELS = {"opt": lambda: make_opt(), "llama": _llama, "llama-tied": _llama_tied}
IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _reader_maxima(gm) -> list[torch.Tensor]:
    """Per channel, the largest magnitude at each input of a Linear reading the residual stream."""
    readers = set(gm.meta["llmq_fx"]["residual_basis"]["readers"])
    inputs = {n.args[0] for n in gm.graph.nodes if is_linear(n) and n.args[1].op == "get_attr" and n.args[1].target in readers}
    out = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n in inputs:
                m = v.abs().reshape(-1, v.shape[-1]).amax(0)
                out[n] = m if n not in out else torch.maximum(out[n], m)
            return v

    with torch.no_grad():
        for batch in IDS.split(2):
            Rec(gm).run(batch)
    return list(out.values())


def _rotated_and_sorted(family: str, sort, **config):
    """The model, its float logits on one batch, and its graph rotated without and with ``sort_residual``."""
    model = MODELS[family]()
    gm = llmq_fx.trace(model)
    with torch.no_grad():
        ref = gm(IDS[:1])
    config = {**FLOAT_ONLY, "rotate": True, "calib_batch_size": 2, **config}
    rotated = llmq_fx.quantize(gm, IDS, {**config, "sort_residual": False}, progress=False)
    return model, ref, rotated, llmq_fx.quantize(gm, IDS, {**config, "sort_residual": sort}, progress=False)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sorting_keeps_the_float_model_and_sorts_the_channels(family):
    model, ref, rotated, qgm = _rotated_and_sorted(family, True)
    rotate = llmq_fx.recipe({**FLOAT_ONLY, "sort_residual": True})[0]
    assert rotate.stage == "rotate" and rotate.options.sort.method == "range"  # part of the rotation, no pass of its own
    with torch.no_grad():
        assert _relative(qgm(IDS[:1]), ref) < 1e-5, family
    report = qgm.meta["llmq_fx"]["residual_sort"]
    assert report["sorted"] and report["channels"] == model.config.hidden_size
    # The score the pass sorts by, recomputed independently on the sorted graph, is non-decreasing;
    # before sorting it was not.
    def score(g):
        return torch.stack([m / m.mean() for m in _reader_maxima(g)]).mean(0)
    after, before = score(qgm), score(rotated)
    assert bool((after[1:] >= after[:-1] - 1e-6).all()), family
    assert not bool((before[1:] >= before[:-1]).all())
    assert torch.allclose(after, before.sort().values, atol=1e-5)


def test_sorted_quantized_model_exports_as_a_decoder():
    model = _llama()
    qgm = llmq_fx.quantize(llmq_fx.trace(model), IDS, {"sort_residual": True, "a_group_size": 32}, progress=False)
    dgm = quantized_decoder(qgm, model)  # checks the decoder's first step against qgm's logits
    assert dgm.meta["llmq_fx"]["residual_sort"]["sorted"]


def test_no_order_where_it_changes_nothing():
    """The order is part of the rotation, and only dynamic activation groups depend on it."""
    assert llmq_fx.QuantConfig(rotate=False, sort_residual=True).residual_order() is None
    assert llmq_fx.QuantConfig(sort_residual=True, a_group_size=None).residual_order() is None
    assert llmq_fx.QuantConfig(sort_residual=True, a_dynamic=False).residual_order() is None
    assert llmq_fx.recipe({"rotate": False, "sort_residual": True}).stages()[0] == "observe"


def _within_group_dispersion(maxima: list[torch.Tensor], group: int, order: torch.Tensor | None = None) -> float:
    """The k-means objective of contiguous groups: squared distance of each channel's log-normalized maxima
    (one feature per reader input) to its group's mean, summed."""
    f = torch.stack([(m / m.mean()).clamp_min(1e-6).log() for m in maxima], 1).double()
    f = f if order is None else f[order]
    g = f.reshape(-1, group, f.shape[1])
    return float(((g - g.mean(1, keepdim=True)) ** 2).sum())


@pytest.mark.parametrize("family", sorted(MODELS))
def test_kmeans_groups_keep_the_float_model_and_gather_similar_channels(family):
    model, ref, rotated, qgm = _rotated_and_sorted(family, "kmeans", a_group_size=16)
    with torch.no_grad():
        assert _relative(qgm(IDS[:1]), ref) < 1e-5, family
    report = qgm.meta["llmq_fx"]["residual_sort"]
    assert report["method"] == "kmeans" and report["clusters"] == model.config.hidden_size // 16
    # Measured again on the graphs: the contiguous groups of 16 are tighter in the clustering's features
    # than the rotated model's own order (the same channels, permuted).
    before, after = _reader_maxima(rotated), _reader_maxima(qgm)
    assert _within_group_dispersion(after, 16) < 0.8 * _within_group_dispersion(before, 16), family


def test_balanced_kmeans_makes_every_group_one_cluster():
    from llmq_fx.channel_order import balanced_kmeans_order

    gen = torch.Generator().manual_seed(0)
    # Three sites, 24 channels in three planted kinds (8 each), shuffled: narrow, middle, wide.
    level = torch.tensor([1.0] * 8 + [4.0] * 8 + [16.0] * 8)
    shuffle = torch.randperm(24, generator=gen)
    maxima = [(level * torch.exp(0.05 * torch.randn(24, generator=gen)))[shuffle] for _ in range(3)]
    perm, rec = balanced_kmeans_order(torch.stack([m / m.mean() for m in maxima], 1), 8, seed=0)
    kinds = level[shuffle][perm].reshape(3, 8)
    assert (kinds == kinds[:, :1]).all() and kinds[:, 0].tolist() == [1.0, 4.0, 16.0]
    assert rec["clusters"] == 3 and rec["moved_by_balancing"] == 0
    assert sorted(perm.tolist()) == list(range(24))
    # Unbalanced kinds (10 / 6 / 8): every group still has 8 channels, two channels move.
    level = torch.tensor([1.0] * 10 + [4.0] * 6 + [16.0] * 8)
    maxima = [level * torch.exp(0.05 * torch.randn(24, generator=gen)) for _ in range(3)]
    perm, rec = balanced_kmeans_order(torch.stack([m / m.mean() for m in maxima], 1), 8, seed=0)
    assert sorted(perm.tolist()) == list(range(24)) and rec["moved_by_balancing"] == 2
    assert level[perm][16:].eq(16.0).all()  # the wide kind, complete, is the last group


def test_kmeans_groups_need_dynamic_groups():
    with pytest.raises(ConfigError, match="\"kmeans\" makes the clusters the dynamic activation groups"):
        llmq_fx.recipe({"sort_residual": "kmeans", "a_group_size": None})
    with pytest.raises(ConfigError, match="'sort_residual' must be true, false, \"range\" or \"kmeans\""):
        llmq_fx.recipe({"sort_residual": "cluster"})
    from llmq_fx.channel_order import ResidualOrder

    with pytest.raises(ConfigError, match="needs the activation group size, got group=None"):
        ResidualOrder(method="kmeans")
