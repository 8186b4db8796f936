"""Learned residual rotation (SpinQuant's R1) on top of the Hadamard: the float model unchanged, the
loss it trains is the deployed W4A4 model's distance to the float model, bad configs refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import llmq_fx
from llmq_fx.calibrate import calibration_batches
from llmq_fx.errors import ConfigError
from llmq_fx.passes import LearnRotationPass, RotatePass
from llmq_fx.passes.learn_rotation import _Windows
from llmq_fx.spec import ActivationSpec
from conftest import VOCAB, make_opt
from test_sort_residual import MODELS, _relative

IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(4))
# Round-to-nearest W4 per channel, A4 dynamic groups of 16: the model whose loss the pass trains on,
# built by the ordinary passes (InsertQDQPass), not by the pass's own fake-quant forward.
RTN_W4A4 = {"gptq": False, "w_clip": False, "a_group_size": 16, "a_clip_search": None, "embed_bits": None,
            "lm_head_bits": None, "rotate": True, "calib_batch_size": 4}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_learned_rotation_keeps_the_float_model(family):
    gm = llmq_fx.trace(MODELS[family]())
    with torch.no_grad():
        ref = gm(IDS[:1])
    rotated = copy.deepcopy(gm)
    RotatePass(keep_tied=True)(rotated)  # a no-op but for the tied family
    LearnRotationPass(steps=5, lr=0.02, activation=ActivationSpec(4, group_size=16)).with_calibration(
        calibration_batches(IDS, 2), progress=False)(rotated)
    with torch.no_grad():
        assert _relative(rotated(IDS[:1]), ref) < 1e-5, family
    report = rotated.meta["llmq_fx"]["learned_rotation"]
    assert report["learned"] and report["steps"] == 5 and report["distance_from_identity"] > 1e-3
    assert [p.stage for p in llmq_fx.recipe({"learn_rotation_steps": 5})][:2] == ["rotate", "learn_rotation"]


def test_learned_rotation_trains_on_the_deployed_w4a4_model():
    """The pass's first loss (R = identity) is the KL divergence of the round-to-nearest W4A4 model, built by
    the ordinary passes, from the float model on the first training window."""
    gm = llmq_fx.trace(make_opt(num_hidden_layers=2))
    config = {**RTN_W4A4, "learn_rotation_steps": 3}
    learned = llmq_fx.quantize(gm, IDS, config, progress=False)
    report = learned.meta["llmq_fx"]["learned_rotation"]
    (learn,) = [p for p in llmq_fx.recipe(config) if isinstance(p, LearnRotationPass)]
    window = _Windows(calibration_batches(IDS, 4), learn.options).next()
    assert report["tokens_per_step"] == window.numel() == 2 * 16
    rtn = llmq_fx.quantize(gm, IDS, RTN_W4A4, progress=False)
    with torch.no_grad():
        p, q = F.log_softmax(gm(window), -1), F.log_softmax(rtn(window), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert report["loss_first"] == pytest.approx(expected, rel=1e-3)


def test_learned_rotation_config_errors():
    with pytest.raises(ConfigError, match="needs 'rotate'"):
        llmq_fx.recipe({"rotate": False, "learn_rotation_steps": 10})
    with pytest.raises(ConfigError, match="a_dynamic: true"):
        llmq_fx.recipe({"a_bits": None, "learn_rotation_steps": 10})
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        llmq_fx.recipe({"learn_rotation_steps": -3})
    with pytest.raises(ConfigError, match="'learn_rotation_lr' must be positive"):
        llmq_fx.recipe({"learn_rotation_steps": 3, "learn_rotation_lr": 0.0})
