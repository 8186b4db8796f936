"""Sequential act-aware GPTQ: the lockstep walk sees what the float and the deployed quantized model compute."""

import copy
import operator

import numpy as np
import pytest
import torch
from torch import fx

import llmq_fx
from llmq_fx import lockstep
from llmq_fx.calibrate import calibrate
from llmq_fx.graph import observer_sites
from llmq_fx.passes import GPTQPass, InsertObserversPass, InsertQDQPass
from llmq_fx.passes import sequential_gptq
from llmq_fx.passes.sequential_gptq import SequentialGPTQPass
from llmq_fx.calibrate import calibration_batches
from llmq_fx.spec import ActivationSpec, WeightSpec
from llmq_fx.stats import ActivationObserver

QUANT = ActivationSpec(4, symmetric=False, group_size=16, clip_ratio=0.9)


def _sequential(gm, calib, skip=(), strength=0.5, clip_search=None, clip_search_tokens=None):
    observed = copy.deepcopy(gm)
    InsertObserversPass()(observed)
    sequential = SequentialGPTQPass(weight=WeightSpec(4, clip=True), activation=QUANT, act_aware=strength,
                                    skip=("lm_head", *skip), clip_search=clip_search,
                                    clip_search_tokens=clip_search_tokens)
    sequential.with_calibration(calibration_batches(calib, 2), progress=False)(observed)
    return observed


def _values(gm: fx.GraphModule, ids: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """The values of the named nodes when ``gm`` runs on ``ids`` (an independent plain forward)."""
    seen = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                seen[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(ids)
    return seen


def test_statistics_equal_a_plain_calibration(opt_gm, calib):
    seq = _sequential(opt_gm, calib)
    plain = copy.deepcopy(opt_gm)
    InsertObserversPass()(plain)
    calibrate(plain, calib, batch_size=2, progress=False)
    a, b = observer_sites(seq), observer_sites(plain)
    assert [s.name for s in a] == [s.name for s in b]
    for sa, sb in zip(a, b):  # the float lane is the float model: same tokens, same statistics
        x, y = sa.module.stats(), sb.module.stats()
        assert x.count == y.count == calib.numel()
        for key in ("min", "max", "mean", "std"):
            np.testing.assert_allclose(getattr(x, key).numpy(), getattr(y, key).numpy(), rtol=1e-5, atol=1e-6)
    assert seq.meta["llmq_fx"]["calib_tokens"] == calib.numel()
    records = seq.meta["llmq_fx"]["gptq"]
    assert records and all(r["sequential"] and r["act_aware"] == 0.5 for r in records.values())
    assert "lm_head" not in records


def test_first_site_equals_one_pass_act_aware_gptq(opt_gm, calib):
    """Before any layer is quantized both lanes are the float model, so the first site gets the one-pass result."""
    seq = _sequential(opt_gm, calib)
    one = copy.deepcopy(opt_gm)
    InsertObserversPass(input_quant=QUANT)(one)
    calibrate(one, calib, batch_size=2, progress=False)
    GPTQPass(weight=WeightSpec(4, clip=True), act_aware=0.5)(one)
    first = observer_sites(seq)[0]
    later = observer_sites(seq)[3]
    for path in first.record.consumers:
        assert torch.equal(seq.get_buffer(f"{path}.weight_int"), one.get_buffer(f"{path}.weight_int")), path
    # Downstream the quantized model's inputs differ from the float model's, and so do the weights.
    path = later.record.consumers[0]
    assert not torch.equal(seq.get_buffer(f"{path}.weight_int"), one.get_buffer(f"{path}.weight_int"))


@pytest.mark.parametrize("skip, clip_search", [((), None), (("*layers.0.fc1",), None), ((), [0.6, 0.8, 1.0])])
def test_quantized_lane_is_the_deployed_model(opt_gm, calib, monkeypatch, skip, clip_search):
    """What each site was quantized on is what the final QDQ graph feeds that site (skipped Linears included)."""
    seen = {}
    run = lockstep.run_lockstep

    def spy(gm, batches, on_site, progress=True, **kwargs):
        def wrapped(inputs):
            seen[inputs.site.producer.name] = [x_q.clone() for _, x_q in inputs]
            return on_site(inputs)

        return run(gm, batches, wrapped, progress, **kwargs)

    monkeypatch.setattr(sequential_gptq, "run_lockstep", spy)
    qgm = _sequential(opt_gm, calib, skip=skip, clip_search=clip_search)
    if clip_search:  # each site's choice is what its deployed QDQ node uses
        chosen = {s.name: s.record.activation.clip_ratio for s in observer_sites(qgm) if s.record.activation}
        assert len(chosen) == len(observer_sites(qgm)) - 1 and set(chosen.values()) <= set(clip_search)
    InsertQDQPass(weight=WeightSpec(4), activation=QUANT, skip=("lm_head", *skip))(qgm)
    observed = copy.deepcopy(opt_gm)
    InsertObserversPass()(observed)
    assert len(seen) == len(observer_sites(observed))
    for b in range(3):
        ids = calib[2 * b: 2 * b + 2]
        deployed = _values(qgm, ids, set(seen))
        for name, per_batch in seen.items():
            np.testing.assert_allclose(per_batch[b].numpy(), deployed[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    # The last site's input has been through every quantized layer: it is not the float model's.
    float_vals = _values(opt_gm, calib[:2], set(seen))
    last = list(seen)[-1]
    assert not torch.allclose(seen[last][0], float_vals[last], atol=1e-3)


def test_quantize_runs_sequential_and_falls_back(opt_gm, calib, caplog):
    cfg = dict(w_bits=4, a_bits=4, a_group_size=16, gptq_sequential=True, calib_batch_size=2)
    qgm = llmq_fx.quantize(opt_gm, calib, cfg, progress=False)
    meta = qgm.meta["llmq_fx"]
    assert meta["gptq_sequential"] is True and meta["calib_tokens"] == calib.numel()
    assert "calibrate" not in meta["timings_s"] and "gptq" in meta["timings_s"]
    with torch.no_grad():
        assert torch.isfinite(qgm(calib[:2])).all()
    # Static ranges need statistics before any site is quantized: one-pass GPTQ, said in meta.
    static = llmq_fx.quantize(opt_gm, calib, dict(cfg, a_dynamic=False, n_clusters=2), progress=False)
    assert static.meta["llmq_fx"]["gptq_sequential"] is False
    assert not any(r.get("sequential") for r in static.meta["llmq_fx"]["gptq"].values())
    with pytest.raises(llmq_fx.ConfigError, match="gptq_sequential"):
        llmq_fx.QuantConfig(gptq_sequential="yes")


def test_lockstep_needs_token_ids_only():
    class TwoInputs(torch.nn.Module):
        def forward(self, x, y):
            return torch.nn.functional.linear(x + y, torch.ones(4, 4))

    gm = fx.symbolic_trace(TwoInputs())
    with pytest.raises(llmq_fx.CalibrationError, match="no observers"):
        lockstep.run_lockstep(gm, [torch.zeros(1, 4)], lambda s: None)
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add)
    gm.add_submodule("llmq_observer_x", ActivationObserver(4))
    with gm.graph.inserting_after(add):
        obs = gm.graph.call_module("llmq_observer_x", (add,))
    add.replace_all_uses_with(obs, delete_user_cb=lambda u: u is not obs)
    gm.recompile()
    with pytest.raises(llmq_fx.UnsupportedModelError, match="one input .token ids.; this one has 2: x, y"):
        lockstep.run_lockstep(gm, [torch.zeros(1, 4)], lambda s: None)


def test_clip_search_picks_the_ratio_of_least_output_error(opt_gm, calib):
    """Per site, the chosen ratio gives the smallest ||(Q(X) - X) W^T|| of the candidates, on the site's real inputs."""
    qgm = _sequential(opt_gm, calib, clip_search=[0.5, 0.9, 1.0])
    first = observer_sites(qgm)[0]
    x = _values(opt_gm, calib, {first.producer.name})[first.producer.name].reshape(-1, 32).double()
    w = torch.cat([opt_gm.get_parameter(f"{p}.weight") for p in first.record.consumers]).detach().double()
    errors = {}
    for r in (0.5, 0.9, 1.0):
        groups = x.reshape(len(x), -1, 16)
        lo = (groups.amin(-1, keepdim=True) * r).clamp(max=0)
        hi = (groups.amax(-1, keepdim=True) * r).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zp = torch.round(-lo / scale).clamp(0, 15)
        q = ((torch.round(groups / scale) + zp).clamp(0, 15) - zp) * scale
        errors[r] = float(((q.reshape(x.shape) - x) @ w.T).square().sum())
    assert first.record.activation.clip_ratio == min(errors, key=errors.get)
    assert len(set(errors.values())) == 3


@pytest.mark.parametrize("cap, summed", [(None, 6 * 24), (40, 2 * 24), (48, 2 * 24), (49, 4 * 24)])
def test_clip_search_sums_the_first_batches_up_to_its_token_count(opt_gm, calib, monkeypatch, cap, summed):
    """``clip_search_tokens``: each site's errors are summed over the first batches (of 2 x 24 tokens here)
    that reach the count; every batch still passes the observers and the moments."""
    seen = []
    error = sequential_gptq.qmath.activation_error

    def counting(weight, xs, quantizers):
        xs = list(xs)
        seen.append(sum(x.numel() // x.shape[-1] for x in xs))
        return error(weight, xs, quantizers)

    monkeypatch.setattr(sequential_gptq.qmath, "activation_error", counting)
    qgm = _sequential(opt_gm, calib, clip_search=[0.8, 1.0], clip_search_tokens=cap)
    assert seen and set(seen) == {summed}
    assert all(s.module.stats().count == calib.numel() for s in observer_sites(qgm))
    assert qgm.meta["llmq_fx"]["calib_tokens"] == calib.numel()


def test_clip_search_tokens_is_checked():
    with pytest.raises(llmq_fx.ConfigError, match="a_clip_search_tokens"):
        llmq_fx.QuantConfig(a_clip_search_tokens=0)
    assert llmq_fx.QuantConfig(a_clip_search_tokens=None).a_clip_search_tokens is None


@pytest.mark.parametrize("outputs", [48, 8])
def test_activation_error_gram_form_equals_the_direct_product(outputs):
    from llmq_fx import qmath
    from llmq_fx.spec import ActivationSpec

    g = torch.Generator().manual_seed(3)
    w = torch.randn(outputs, 16, generator=g)
    xs = [torch.randn(2, 20, 16, generator=g) * 3 for _ in range(3)]
    quantizers = [ActivationSpec(4, dynamic=True, clip_ratio=r) for r in (0.8, 1.0)]
    direct = qmath.activation_error(w, xs, quantizers, gram=False)
    gram = qmath.activation_error(w, xs, quantizers, gram=True)
    reference = [sum(((q(x) - x) @ w.T).square().sum().double() for x in xs) for q in quantizers]
    for a, b, r in zip(direct, gram, reference):
        assert float(a) == pytest.approx(float(r), rel=1e-6)
        assert float(b) == pytest.approx(float(r), rel=1e-4)


def test_running_out_of_device_memory_names_the_node_and_the_bytes(monkeypatch):
    """An out-of-memory error in the walk becomes one line naming the node and the bytes asked."""
    from llmq_fx.models import load_model

    model, _ = load_model("opt-tiny-random")
    gm = llmq_fx.trace(model)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 139.80 GiB")

    monkeypatch.setattr(sequential_gptq.qmath, "gptq_quantize_weight", boom)
    with pytest.raises(llmq_fx.errors.DeviceMemoryError, match=r"out of device memory at node .*q_proj.* \(asked 2.50 GiB"):
        llmq_fx.quantize(gm, torch.randint(0, 50, (2, 16)), {"rotate": False}, progress=False)


def test_symmetric_gram_is_the_gram_matrix():
    """The Hessian from the blocks on and above the diagonal, mirrored: equal to q^T q (float64 reference)."""
    from llmq_fx import qmath

    q = torch.randn(300, 1024, generator=torch.Generator().manual_seed(4))
    gram = qmath._symmetric_gram(q)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram.double(), q.double().T @ q.double(), rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA mode")
def test_moments_with_tf32_stay_close_to_float64():
    """With TF32 allowed, the Hessian stays float32-accurate and the cross moment, computed as the Gram plus a
    TF32 product of the (small) difference, is closer to float64 than a TF32 product of q^T x."""
    from llmq_fx import qmath
    from llmq_fx.spec import ActivationSpec

    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(16384, 2048, device="cuda", generator=g) * torch.rand(2048, device="cuda", generator=g).exp()
    q = ActivationSpec(4, dynamic=True, group_size=64)(x)
    h, c = torch.zeros(2048, 2048, device="cuda"), torch.zeros(2048, 2048, device="cuda")
    with qmath.cuda_matmul_precision("tf32"):
        qmath.add_moments_(h, c, q, x)
        plain_tf32 = q.T @ x
    h64, c64 = q.double().T @ q.double(), q.double().T @ x.double()
    scale = h64.diagonal().mean()
    with qmath.cuda_matmul_precision("float32"):
        fp32_err = ((q.T @ x).double() - c64).abs().max() / scale
    assert (h.double() - h64).abs().max() / scale < 2 * fp32_err
    assert (c.double() - c64).abs().max() / scale < 0.5 * (plain_tf32.double() - c64).abs().max() / scale


def test_a_tf32_hessian_that_does_not_factorize_is_recomputed_in_float32(opt_gm, calib, monkeypatch):
    """Where the walk computes its Grams in TF32, a site whose damped Hessian has no Cholesky factor takes
    its moments again in float32 (one more pass over its inputs), and its records say which precision
    each Linear was rounded with. On the CPU both precisions compute float32, so the result must be the
    float32 walk's bit for bit."""
    from llmq_fx import qmath

    plain = _sequential(opt_gm, calib, clip_search=[0.8, 1.0])
    real_check = qmath.damped_hessian_factor
    monkeypatch.setattr(sequential_gptq, "_moments_precision", lambda device: "tf32")
    seen = []

    def factorizes(h, damp, act_order):
        seen.append(h.shape[0])
        return None if len(seen) == 2 else real_check(h, damp, act_order)  # the second site's TF32 Hessian "fails"

    monkeypatch.setattr(sequential_gptq.qmath, "damped_hessian_factor", factorizes)
    checked = _sequential(opt_gm, calib, clip_search=[0.8, 1.0])
    records = checked.meta["llmq_fx"]["gptq"]
    sites = [s for s in observer_sites(checked) if any(not p.endswith("lm_head") for p in s.record.consumers)]
    assert len(seen) == len(sites) and len(sites) > 2  # checked once per site; the recomputed one is factored with retries
    second = {n for n, r in records.items() if r["moments"] == "float32"}
    assert second == set(sites[1].record.consumers)
    assert all(r["moments"] == "tf32" for n, r in records.items() if n not in second)
    a = {k: v for k, v in plain.state_dict().items()}
    b = checked.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the check itself: a positive definite matrix factorizes, one with a negative eigenvalue beyond the damping does not
    g = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    h = g.T @ g / 64
    assert real_check(h, 0.01) is not None
    h[3, 3] = -1.0
    assert real_check(h, 0.01) is None
