"""Learned residual rotation (SpinQuant's R1): after the Hadamard rotation, train one more orthogonal
matrix of the residual stream on the W4A4 model's language-model loss, then fold it in.

Pattern: the residual basis ``RotatePass`` recorded (``gm.meta["llmq_fx"]["residual_basis"]``): the
embedding tables and the readers' weights (columns: the stream is their input), the writers' weights
and biases (rows: the stream is their output), an online rotation after sandwich norms. The norms
between them are RMSNorms with unit weight once rotated, which commute with any orthogonal matrix.

Rewrite: with ``R`` orthogonal (``torch.nn.utils.parametrizations.orthogonal``, Cayley map, starting
at the identity, so the start is exactly the Hadamard model), every last-axis tensor ``W`` becomes
``W R`` and every first-axis one ``R^T W``: the float model's output is unchanged for any ``R``, but
the quantized one is not. ``R`` is trained with Adam to bring the model with every non-skipped
Linear fake-quantized as deployed (its input by the dynamic activation scheme, its weight
round-to-nearest per output channel; straight-through gradients) to the float model: the loss is the
KL divergence of its next-token distributions from the float model's, per token, on random windows
of the calibration batches (SpinQuant trains on the labels' cross-entropy; distilling from the float
model asks the rotation for what quantization lost, not for a better language model, which a small
calibration set would overfit). ``R`` is then folded into the tensors in float64 (the rotation
becomes ``Q R``, no node added). The pass records the loss at the start and the end and its time in
``gm.meta["llmq_fx"]["learned_rotation"]``. SpinQuant (Liu et al. 2024) also learns per-head value
rotations (R2); this pass learns R1 only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from llmq_fx import qmath
from llmq_fx.errors import ConfigError
from llmq_fx.graph import attr, compute_device, is_linear, is_skipped, module_path, write_attr
from llmq_fx.passes.base import CalibratedPass
from llmq_fx.passes.rotate import residual_basis
from llmq_fx.spec import ActivationSpec, WeightSpec

__all__ = ["LearnRotationPass", "LearnRotationOptions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnRotationOptions:
    """Options of ``LearnRotationPass``.

    Attributes:
        steps: optimizer steps.
        lr: Adam's learning rate on the Cayley map's skew-symmetric parameter.
        batch_size / seq_len: each step's windows, drawn (seeded) from the calibration batches.
        activation / weight: the fake quantizers of the loss (the weight one without clipping search).
        skip: module-path patterns of Linears left float in the loss (as in the config).
        seed: the windows' draw.
    """

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 2
    seq_len: int = 256
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    weight: WeightSpec = field(default_factory=lambda: WeightSpec(4))
    skip: tuple[str, ...] = ("lm_head",)
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "seq_len"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"learned rotation: {key} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"config key 'learn_rotation_lr' must be positive, got {self.lr!r}")


class LearnRotationPass(CalibratedPass):
    """Learn an orthogonal residual rotation on the fake-quantized model's loss and fold it in (see the module docstring)."""

    Options = LearnRotationOptions
    stage = "learn_rotation"

    @classmethod
    def from_config(cls, config) -> "LearnRotationPass | None":
        if not config.learn_rotation_steps:
            return None
        if config.rotate is False:
            raise ConfigError("config key 'learn_rotation_steps' learns on top of the Hadamard rotation: it needs 'rotate'")
        if config.a_bits is None or not config.a_dynamic or config.w_bits is None:
            raise ConfigError("config key 'learn_rotation_steps' trains on the W4A4 loss: it needs w_bits, a_bits and "
                              "a_dynamic: true")
        return cls(LearnRotationOptions(
            steps=int(config.learn_rotation_steps), lr=float(config.learn_rotation_lr), activation=config.activation_spec(),
            weight=WeightSpec(config.w_bits, config.w_group_size), skip=tuple(config.skip), seed=config.seed,
        ))

    def call(self, gm: fx.GraphModule) -> PassResult:
        meta = gm.meta.setdefault("llmq_fx", {})
        tensors = residual_basis(gm)
        if tensors is None:
            meta["learned_rotation"] = {"learned": False, "reason": "no rotated residual stream (rotation skipped)"}
            return PassResult(gm, False)
        t0 = time.perf_counter()
        device = compute_device(gm)
        last = [t for t, axis in tensors if axis == -1 and attr(gm, t).dim() == 2]  # 1-D: unit norm weights
        first = [t for t, axis in tensors if axis == 0]
        both = [t for t, axis in tensors if axis is None]  # d x d maps from the stream to itself: R^T M R
        dim = attr(gm, last[0]).shape[-1]
        holder = torch.nn.Linear(dim, dim, bias=False, device=device)
        torch.nn.utils.parametrizations.orthogonal(holder, orthogonal_map="cayley")
        with torch.no_grad():
            holder.weight = torch.eye(dim, device=device)
        params = [p for p in holder.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.options.lr)
        forward = _FakeQuantForward(gm, self.options)
        windows = _Windows(self._require_batches(), self.options)
        losses = []
        for _ in tqdm(range(self.options.steps), desc="learn rotation", unit="step", disable=not self.progress, leave=False):
            r = holder.weight
            forward.replaced = {t: attr(gm, t).to(device) @ r for t in last}
            forward.replaced.update({t: _rows(r, attr(gm, t).to(device)) for t in first})
            forward.replaced.update({t: r.T @ attr(gm, t).to(device) @ r for t in both})
            ids = windows.next().to(device)
            with torch.no_grad():
                target = F.log_softmax(gm(ids).float(), dim=-1)  # the float model: the same for any R
            logits = forward.run(ids)
            loss = F.kl_div(F.log_softmax(logits.float(), dim=-1), target, log_target=True, reduction="batchmean") / ids.shape[1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        forward.replaced = {}
        with torch.no_grad():
            r = holder.weight.detach().to(torch.float64)
            for t in last:
                write_attr(gm, t, attr(gm, t).to(device, torch.float64) @ r)
            for t in first:
                write_attr(gm, t, _rows(r, attr(gm, t).to(device, torch.float64)))
            for t in both:
                write_attr(gm, t, r.T @ attr(gm, t).to(device, torch.float64) @ r)
            drift = float((r - torch.eye(dim, dtype=r.dtype, device=r.device)).norm() / dim**0.5)
        meta["learned_rotation"] = {
            "learned": True, "dim": dim, "steps": self.options.steps, "tokens_per_step": self.options.batch_size * windows.len,
            "loss_first": losses[0], "loss_last": losses[-1], "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]),
            "distance_from_identity": drift, "seconds": time.perf_counter() - t0,
        }
        logger.info("learned rotation: loss %.4f -> %.4f over %d steps", losses[0], losses[-1], len(losses))
        gm.recompile()
        return PassResult(gm, True)


def _rows(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``R^T t`` along ``t``'s first axis (a writer's weight rows or its bias)."""
    return r.T @ t if t.dim() == 2 else t @ r


class _Windows:
    """Seeded random ``[batch_size, seq_len]`` windows cut from the calibration batches."""

    def __init__(self, batches: list[torch.Tensor], options: LearnRotationOptions):
        self.rows = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
        self.len = min(options.seq_len, self.rows.shape[1])
        self.size = options.batch_size
        self.gen = torch.Generator().manual_seed(options.seed)

    def next(self) -> torch.Tensor:
        rows = torch.randint(0, self.rows.shape[0], (self.size,), generator=self.gen)
        start = torch.randint(0, self.rows.shape[1] - self.len + 1, (1,), generator=self.gen)
        return self.rows[rows, start: start + self.len]


class _FakeQuantForward(fx.Interpreter):
    """The graph with tensors replaced by functions of ``R`` and every non-skipped Linear fake-quantized
    (input: the dynamic activation scheme; weight: round-to-nearest), straight-through gradients."""

    def __init__(self, gm: fx.GraphModule, options: LearnRotationOptions):
        super().__init__(gm)
        self.replaced: dict[str, torch.Tensor] = {}
        self.linears = {}
        for n in gm.graph.nodes:
            if is_linear(n) and not is_skipped(module_path(n), options.skip):
                w = n.args[1]  # a get_attr after the rotation; a node it inserted carries no "val"
                width = (w.meta["val"] if "val" in w.meta else attr(gm, w.target)).shape[1]
                self.linears[n] = options.activation.for_site(width)
        self.weight = options.weight

    def fetch_attr(self, target: str):
        return self.replaced[target] if target in self.replaced else super().fetch_attr(target)

    def run_node(self, n: fx.Node):
        quant = self.linears.get(n)
        if quant is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x, w = args[0], args[1]
        with torch.no_grad():
            xq = quant(x.detach())
            wq = qmath.dequantize_weight(*self.weight.for_features(w.shape[1]).quantize(w.detach())).to(w.dtype)
        x = x + (xq - x).detach()
        w = w + (wq - w).detach()
        return n.target(x, w, *args[2:], **kwargs)
