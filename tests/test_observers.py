import numpy as np
import pytest
import torch
from torch import nn

import llmq_fx
from llmq_fx.calibrate import calibrate
from llmq_fx.graph import observer_sites
from llmq_fx.passes import InsertObserversPass
from llmq_fx.stats import ActivationObserver, weight_stats


def _observed(gm):
    import copy

    g = copy.deepcopy(gm)
    InsertObserversPass()(g)
    return g


def _hooked_inputs(model, batches):
    """Independent reference: every Linear's input captured with forward hooks on the eager model."""
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy())
            ))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v) for k, v in seen.items()}


def test_one_observer_per_distinct_linear_input(opt_gm):
    g = _observed(opt_gm)
    sites = observer_sites(g)
    # per layer: shared q/k/v input, out_proj, fc1, fc2; plus lm_head
    assert len(sites) == 2 * 4 + 1
    qkv = [s for s in sites if s.role == "qkv"]
    assert len(qkv) == 2 and all(len(s.consumers) == 3 for s in qkv)
    assert sorted(s.role for s in sites) == sorted(["qkv", "out_proj", "fc1", "fc2"] * 2 + ["other"])
    with torch.no_grad():
        ids = torch.randint(0, 96, (2, 9))
        assert torch.equal(g(ids), opt_gm(ids))  # observers are identities


def test_streaming_stats_equal_numpy_over_all_tokens(opt_model, opt_gm, calib):
    g = _observed(opt_gm)
    n = calibrate(g, calib, batch_size=2, progress=False)  # three batches merged
    assert n == calib.numel()
    ref = _hooked_inputs(opt_model, calib.split(2))
    for site in observer_sites(g):
        x = ref[site.record.consumers[0]]
        st = site.module.stats()
        assert st.count == x.shape[0]
        np.testing.assert_allclose(st.min.numpy(), x.min(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.max.numpy(), x.max(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.absmax.numpy(), np.abs(x).max(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.mean.numpy(), x.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.std.numpy(), x.std(0), rtol=1e-5, atol=1e-6)


def test_chan_merge_is_exact_for_uneven_batches():
    obs = ActivationObserver(3)
    rng = np.random.default_rng(0)
    parts = [rng.normal(5.0, 2.0, (n, 3)) for n in (1, 7, 40, 2)]
    for p in parts:
        obs(torch.tensor(p, dtype=torch.float32))
    allx = np.concatenate([p.astype(np.float32).astype(np.float64) for p in parts])
    st = obs.stats()
    # exact up to float32 rounding inside one batch
    np.testing.assert_allclose(st.mean.numpy(), allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.std.numpy(), allx.std(0), rtol=1e-5)


def test_weight_stats_from_parameters():
    w = torch.tensor([[1.0, -3.0], [-2.0, 0.5], [0.0, 2.0]])
    ws = weight_stats(w)
    assert ws.in_absmax.tolist() == [2.0, 3.0]
    assert ws.out_min.tolist() == [-3.0, -2.0, 0.0]
    assert ws.out_max.tolist() == [1.0, 0.5, 2.0]


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(0, 8, dtype=torch.long), "empty"),
        ([], "empty"),
        (torch.zeros(4, 8), "dtype"),
        (torch.zeros(2, 3, 4, dtype=torch.long), "shape"),
        (torch.zeros(1, 4, dtype=torch.long), "too short"),
        ([torch.zeros(8, dtype=torch.long), "text"], "batch 1"),
    ],
)
def test_bad_calibration_sets_are_clear_errors(opt_gm, bad, match):
    g = _observed(opt_gm)
    with pytest.raises(llmq_fx.CalibrationError, match=match):
        calibrate(g, bad, progress=False)


def test_iterable_of_1d_tensors_is_accepted(opt_gm, calib):
    g = _observed(opt_gm)
    assert calibrate(g, [row for row in calib], progress=False) == calib.numel()


def test_nan_statistics_name_the_node(opt_gm, calib):
    g = _observed(opt_gm)
    with torch.no_grad():
        g.get_parameter("model.decoder.layers.1.final_layer_norm.weight")[3] = float("nan")
    with pytest.raises(llmq_fx.StatisticsError, match=r"llmq_observer_model_decoder_layers_1_fc1.*NaN"):
        calibrate(g, calib, progress=False)
