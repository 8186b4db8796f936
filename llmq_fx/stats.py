"""Per-channel statistics of Linear inputs, gathered by streaming observers.

``ActivationObserver`` is the module the observer pass inserts between a producer and its Linear
consumers. It keeps, per input channel, the count, min, max, mean and the sum of squared deviations
(M2), merged batch by batch with Chan et al.'s parallel update, so no activation is ever stored and
the result equals a two-pass computation over all calibration tokens.

With ``hessian=True`` (for GPTQ) it also accumulates the input's second-moment matrix
``sum_t x_t^T x_t`` ([C, C], float32, one matmul per batch on the input's device). Divided by the
token count it is ``X^T X / N``, half the Hessian of the layer's mean squared output error with
respect to a weight row; GPTQ's updates do not depend on that factor.

With an ``input_quant`` (a dynamic ``spec.ActivationSpec``: the quantizer the site's Linears will read
through, known before calibration because it needs no statistics) the observer quantizes each batch itself and
records, instead, the moments GPTQ needs to account for that quantization: ``hessian`` is
``sum_t q_t^T q_t`` of the quantized input ``q = Q(x)`` and ``cross`` is ``sum_t q_t^T x_t``
(``qmath.input_aware_weight`` says what they are for). Per-channel statistics stay those of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmq_fx import qmath
from llmq_fx.errors import StatisticsError
from llmq_fx.spec import ActivationSpec

__all__ = ["ChannelStats", "WeightStats", "weight_stats", "ActivationObserver"]


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one activation tensor's channels over all calibration tokens (float64 vectors)."""

    count: int
    min: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    @property
    def num_channels(self) -> int:
        return self.min.numel()


@dataclass(frozen=True)
class WeightStats:
    """Statistics of a Linear weight ``[out, in]``, computed from the parameter itself."""

    in_absmax: torch.Tensor  # [in]: max_i |W_ij|, what SmoothQuant balances against
    out_min: torch.Tensor  # [out]
    out_max: torch.Tensor  # [out]


def weight_stats(weight: torch.Tensor) -> WeightStats:
    w = weight.detach().to(torch.float64)
    return WeightStats(w.abs().amax(dim=0), w.amin(dim=1), w.amax(dim=1))


class ActivationObserver(nn.Module):
    """Identity module that records per-channel min/max/mean/std of its input's last dimension.

    ``hessian=True`` also records ``X^T X`` over all tokens (buffer ``hessian``, [C, C] float32);
    without it the buffers are exactly the statistics ones, so saved observers keep loading.
    ``input_quant`` (needs ``hessian=True``) makes ``hessian`` ``Q(X)^T Q(X)`` and adds ``cross`` =
    ``Q(X)^T X`` ([C, C] float32).
    """

    def __init__(self, num_channels: int, hessian: bool = False, input_quant: ActivationSpec | None = None):
        super().__init__()
        if input_quant is not None and not hessian:
            raise ValueError("input_quant needs hessian=True")
        if input_quant is not None and not input_quant.dynamic:
            raise ValueError("input_quant must be a dynamic activation spec (static ranges are only known after calibration)")
        if input_quant is not None and input_quant.group_size and num_channels % input_quant.group_size:
            raise ValueError(f"activation group size {input_quant.group_size} does not divide {num_channels} channels")
        self.num_channels = num_channels
        self.track_hessian = hessian
        self.input_quant = input_quant
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("min_val", torch.full((num_channels,), float("inf"), dtype=torch.float64))
        self.register_buffer("max_val", torch.full((num_channels,), float("-inf"), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(num_channels, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(num_channels, dtype=torch.float64))
        # Product of all smoothing scales applied so far: stats before smoothing = stats * this.
        self.register_buffer("smoothing_scale", torch.ones(num_channels, dtype=torch.float64))
        if hessian:
            self.register_buffer("hessian", torch.zeros(num_channels, num_channels, dtype=torch.float32))
        if input_quant is not None:
            self.register_buffer("cross", torch.zeros(num_channels, num_channels, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_channels:
            raise ValueError(f"observer expects {self.num_channels} channels, got shape {tuple(x.shape)}")
        with torch.no_grad():
            flat = x.detach().reshape(-1, self.num_channels)
            n = flat.shape[0]
            if n:
                self._merge(flat, n)
        return x

    def _merge(self, flat: torch.Tensor, n: int) -> None:
        # One batch's moments in float32 around its own mean (no catastrophic cancellation, and
        # float32 keeps calibration close to the cost of the forward pass); batches merge in float64.
        flat = flat.float()
        # GPTQ's moments at float32 accuracy, also when calibration runs with TF32 products.
        if self.input_quant is not None:
            q = self.input_quant(flat)
            qmath.add_gram_(self.hessian, q, q)
            qmath.add_gram_(self.cross, q, flat)
        elif self.track_hessian:
            # A sum, not a running mean: one product per batch and no host sync; hessian_matrix() divides.
            qmath.add_gram_(self.hessian, flat, flat)
        bmin, bmax = torch.aminmax(flat, dim=0)
        mean32 = flat.mean(dim=0)
        centered = flat - mean32
        batch_m2 = (centered * centered).sum(dim=0).to(torch.float64)
        batch_mean = mean32.to(torch.float64)
        # Kept as tensors (no .item()): on CUDA the update never waits for the host.
        n_a = self.count.clone()
        total = n_a + n
        delta = batch_mean - self.mean
        # Chan, Golub & LeVeque: merging two partial (count, mean, M2) summaries is exact.
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (n_a * n / total)
        self.count += n
        self.min_val = torch.minimum(self.min_val, bmin.to(torch.float64))
        self.max_val = torch.maximum(self.max_val, bmax.to(torch.float64))

    def stats(self) -> ChannelStats:
        count = int(self.count.item())
        var = self.m2 / max(count, 1)
        return ChannelStats(count, self.min_val.clone(), self.max_val.clone(), self.mean.clone(), var.sqrt())

    def hessian_matrix(self) -> torch.Tensor:
        """Mean ``X^T X / N`` over all calibration tokens (float32 [C, C], on the observer's device);
        with ``input_quant`` it is ``Q(X)^T Q(X) / N``.

        Raises ``StatisticsError`` when the observer was built without ``hessian=True`` or saw no tokens.
        """
        if not self.track_hessian:
            raise StatisticsError("observer has no Hessian: insert observers with InsertObserversPass(hessian=True)")
        return self.hessian / self._token_count()

    def cross_matrix(self) -> torch.Tensor:
        """Mean ``Q(X)^T X / N`` (float32 [C, C]); needs an observer built with ``input_quant``."""
        if self.input_quant is None:
            raise StatisticsError("observer has no cross moments: insert observers with an input quantizer")
        return self.cross / self._token_count()

    def release_moments(self) -> None:
        """Drop the [C, C] second-moment buffers once GPTQ has used them (the channel statistics stay).

        On an opt-6.7b the Hessians and cross moments of all sites together take about 77 GB.
        """
        for name in ("hessian", "cross"):
            if name in self._buffers:
                del self._buffers[name]
        self.track_hessian = False
        self.input_quant = None

    def _token_count(self) -> int:
        count = int(self.count.item())
        if count == 0:
            raise StatisticsError("observer saw no tokens, its Hessian is empty")
        return count

    @torch.no_grad()
    def scale_channels(self, s: torch.Tensor) -> None:
        """Record the statistics of ``x / s`` (per channel, ``s > 0``) without re-calibrating.

        Dividing a channel by a positive constant divides min, max, mean and std by it and keeps
        min below max, so the transformed summary is exactly the summary of the smoothed input.
        The Hessian of ``x / s`` is ``diag(1/s) X^T X diag(1/s)``: entry ``(i, j)`` divides by ``s_i s_j``.
        """
        s = s.to(self.mean)
        if torch.any(s <= 0):
            raise ValueError("smoothing scales must be positive")
        if self.input_quant is not None:
            # Q(x / s) is not Q(x) / s: the recorded moments of the quantized input cannot follow.
            raise StatisticsError(
                "cannot rescale an observer that recorded moments of its quantized input (input_quant): "
                "smoothing changes what the quantizer sees; calibrate again after smoothing"
            )
        self.min_val /= s
        self.max_val /= s
        self.mean /= s
        self.m2 /= s**2
        if self.track_hessian:
            self.hessian.copy_(self.hessian.double() / torch.outer(s, s))
        self.smoothing_scale *= s

    def extra_repr(self) -> str:
        extra = f", input_quant={self.input_quant}" if self.input_quant is not None else ""
        return f"channels={self.num_channels}, tokens={int(self.count.item())}{extra}"
