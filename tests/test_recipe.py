"""The recipe: which passes a config runs, with which options, and that quantize() runs exactly that."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import llmq_fx
from llmq_fx.calibrate import calibration_batches
from llmq_fx.errors import CalibrationError
from llmq_fx.passes import (
    CalibratePass,
    QuantizeEmbeddingsPass,
    GPTQPass,
    GroupChannelsPass,
    InsertObserversPass,
    InsertQDQPass,
    RotatePass,
    SequentialGPTQPass,
    SmoothPass,
)
from llmq_fx.spec import ActivationSpec, WeightSpec
from conftest import STATIC, VOCAB


def _classes(r):
    return [type(p) for p in r]


def test_default_recipe_is_rotate_observe_sequential_gptq_quantize_embeddings():
    r = llmq_fx.recipe()
    assert _classes(r) == [RotatePass, InsertObserversPass, SequentialGPTQPass, InsertQDQPass, QuantizeEmbeddingsPass]
    assert r.stages() == ["rotate", "observe", "gptq", "quantize", "embeddings"]
    rotate, observe, gptq, qdq, embeddings = r
    assert embeddings.options.embedding == WeightSpec(4, 32, clip=True) and embeddings.options.lm_head == WeightSpec(8, 64, clip=True)
    assert rotate.options.required is False and rotate.options.seed == 0
    assert observe.options.hessian is False and observe.options.input_quant is None  # sequential takes its own moments
    assert rotate.options.sort.method == "range" and rotate.options.sort.group == 32
    assert gptq.options.weight == WeightSpec(4, 64, clip=True)
    assert gptq.options.activation == ActivationSpec(4, symmetric=False, dynamic=True, group_size=32, clip_ratio=0.9)
    assert gptq.options.act_aware == 0.3 and gptq.options.clip_search == (0.8, 0.85, 0.9, 0.95, 1.0)
    assert qdq.options.activation == gptq.options.activation and qdq.options.skip == ("lm_head",)


def test_static_recipe_calibrates_then_smooths_and_groups():
    r = llmq_fx.recipe(STATIC)
    assert _classes(r) == [InsertObserversPass, CalibratePass, SmoothPass, GroupChannelsPass, InsertQDQPass]
    assert r[2].options.alpha == 0.5 and r[3].options.n_clusters == 8
    assert r[4].options.activation.dynamic is False and r[4].options.weight == WeightSpec(4, None, clip=False)


@pytest.mark.parametrize(
    "config, classes",
    [
        ({"gptq_sequential": False}, [RotatePass, InsertObserversPass, CalibratePass, GPTQPass, InsertQDQPass, QuantizeEmbeddingsPass]),
        ({"rotate": False, "gptq": False, "embed_bits": None, "lm_head_bits": None}, [InsertObserversPass, CalibratePass, InsertQDQPass]),
        ({"a_bits": None, "lm_head_bits": None}, [RotatePass, InsertObserversPass, CalibratePass, GPTQPass, InsertQDQPass, QuantizeEmbeddingsPass]),
        ({"embed_bits": None, "lm_head_bits": None}, [RotatePass, InsertObserversPass, SequentialGPTQPass, InsertQDQPass]),
        ({**STATIC, "gptq": True}, [InsertObserversPass, CalibratePass, SmoothPass, GroupChannelsPass, GPTQPass, InsertQDQPass]),
    ],
)
def test_recipe_follows_the_config(config, classes):
    assert _classes(llmq_fx.recipe(config)) == classes


def test_options_come_from_the_config():
    r = llmq_fx.recipe({"seed": 7, "rotate": True, "gptq_sequential": False, "a_group_size": 32, "w_group_size": 16})
    rotate, observe, calibrate, gptq, qdq, _ = r
    assert rotate.options.seed == 7 and rotate.options.required is True
    # one-pass act-aware GPTQ: the observers record Q(X) moments through the deployed quantizer
    assert observe.options.hessian and observe.options.input_quant == ActivationSpec(4, group_size=32, clip_ratio=0.9)
    assert gptq.options.act_aware == 0.3 and gptq.options.weight == WeightSpec(4, 16, clip=True)
    # act-aware GPTQ cannot apply with smoothing: plain GPTQ, and the observers record X^T X only
    r = llmq_fx.recipe({"gptq_sequential": False, "smooth_alpha": 0.5})
    assert r[1].options.input_quant is None and r[1].options.hessian and r[-3].options.act_aware is None


def test_recipe_prints_every_pass_and_option():
    text = str(llmq_fx.recipe())
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == ["rotate", "observe", "gptq", "quantize", "embeddings"]
    assert "SequentialGPTQPass(" in lines[2] and "act_aware=0.3" in lines[2]
    assert "<A4 asymmetric dynamic groups of 32, clip 0.9>" in lines[3] and "<W4 symmetric groups of 64, clip search>" in lines[3]
    assert "sort=ResidualOrder(method='range', group=32" in lines[0]
    assert "clip_search=[0.8, 0.85, 0.9, 0.95, 1.0]" in lines[2]


def test_quantize_runs_and_records_the_recipe(opt_gm, calib):
    config = llmq_fx.QuantConfig(**STATIC)
    qgm = llmq_fx.quantize(opt_gm, calib, config, progress=False)
    meta = qgm.meta["llmq_fx"]
    assert meta["recipe"] == llmq_fx.recipe(config).to_dict()
    assert list(meta["timings_s"]) == llmq_fx.recipe(config).stages()
    assert meta["recipe"][2] == {"stage": "smooth", "pass": "SmoothPass",
                                 "options": {"alpha": 0.5, "sites": ["qkv", "fc1", "fc2", "out_proj"], "skip": ["lm_head"]}}


def test_a_pass_takes_its_options_or_their_fields_not_both():
    assert GPTQPass(act_aware=0.5).options == GPTQPass(GPTQPass.Options(act_aware=0.5)).options
    with pytest.raises(TypeError, match="options object or its fields"):
        GPTQPass(GPTQPass.Options(), act_aware=0.5)
    with pytest.raises(TypeError, match="GPTQOptions"):
        GPTQPass(SmoothPass.Options())
    with pytest.raises(llmq_fx.ConfigError, match="sequential GPTQ needs dynamic activations"):
        SequentialGPTQPass(activation=ActivationSpec(4, dynamic=False))


def test_a_calibrated_pass_without_batches_says_how_to_bind_them(opt_gm, calib):
    g = copy.deepcopy(opt_gm)
    InsertObserversPass()(g)
    with pytest.raises(CalibrationError, match="with_calibration"):
        CalibratePass()(g)
    bound = CalibratePass().with_calibration(calibration_batches(calib, 4), progress=False)
    bound(g)
    assert g.meta["llmq_fx"]["calib_tokens"] == calib.numel()


def test_bad_calibration_fails_before_any_pass_runs(opt_gm):
    with pytest.raises(CalibrationError, match="empty"):
        llmq_fx.quantize(opt_gm, torch.zeros((0, 8), dtype=torch.long), progress=False)


@pytest.mark.parametrize("config", [{}, STATIC, {"gptq_sequential": False, "a_bits": None}])
def test_two_quantize_calls_are_bit_identical(opt_gm, calib, config):
    a = llmq_fx.quantize(opt_gm, calib, config, progress=False)
    b = llmq_fx.quantize(opt_gm, calib, config, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    def plain(arg):
        return arg.target if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else arg

    qdq_args = [[(n.target, [plain(x) for x in n.args[1:]]) for n in g.graph.nodes if "llmq" in str(n.target)] for g in (a, b)]
    assert qdq_args[0] == qdq_args[1] and qdq_args[0]
    assert a.code == b.code


class _SharedLinear(nn.Module):
    """One Linear module called at two places, on different inputs (weights shared across depth)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids):
        h = self.shared(self.embed(ids))
        h = self.shared(torch.relu(h))
        return (self.head(h),)


def test_a_module_called_twice_gets_an_observer_and_integer_weight_per_call(calib):
    gm = llmq_fx.trace(_SharedLinear())
    config = {"rotate": False, "a_bits": None, "gptq_sequential": False, "skip": [], "embed_bits": None, "lm_head_bits": None}
    qgm = llmq_fx.quantize(gm, calib, config, progress=False)
    deq = [n for n in qgm.graph.nodes if n.target == torch.ops.llmq.dequantize_weight.default]
    targets = sorted(n.args[0].target for n in deq)
    assert targets == ["head.weight_int", "shared.weight_int", "shared.weight_int_2"]
    # GPTQ rounds each call on its own inputs: two different integer weights, both kept
    assert not torch.equal(qgm.get_buffer("shared.weight_int"), qgm.get_buffer("shared.weight_int_2"))
    assert not hasattr(qgm.get_submodule("shared"), "weight")  # the float weight is gone
    # Each call computes with its own codes: compare with the float model run with those weights.
    ids = calib[:2]
    w1, w2, wh = (llmq_fx.qmath.dequantize_weight(qgm.get_buffer(f"{p}_int{s}"), qgm.get_buffer(f"{p}_scale{s}"))
                  for p, s in (("shared.weight", ""), ("shared.weight", "_2"), ("head.weight", "")))
    order = {n.args[0].target: i for i, n in enumerate(deq)}
    first, second = (w1, w2) if order["shared.weight_int"] < order["shared.weight_int_2"] else (w2, w1)
    b, bh = gm.get_parameter("shared.bias"), gm.get_parameter("head.bias")
    h = gm.get_parameter("embed.weight")[ids] @ first.T + b
    h = torch.relu(h) @ second.T + b
    torch.testing.assert_close(qgm(ids), h @ wh.T + bh, rtol=1e-5, atol=1e-5)


def test_observers_of_one_module_called_twice_do_not_replace_each_other(calib):
    gm = llmq_fx.trace(_SharedLinear())
    InsertObserversPass()(gm)
    observers = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("llmq_observer")]
    assert observers == ["llmq_observer_shared", "llmq_observer_shared_2", "llmq_observer_head"]
    assert gm.get_submodule("llmq_observer_shared") is not gm.get_submodule("llmq_observer_shared_2")
