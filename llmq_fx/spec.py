"""What a site is quantized to, and what the passes learn about it: one typed description each.

``WeightSpec`` and ``ActivationSpec`` are the quantization schemes (torchao's ``QuantizationSpec`` is
the model): built once from ``QuantConfig``, carried by the pass options, resolved per site, and read
by the observers (act-aware GPTQ quantizes calibration inputs through an ``ActivationSpec``), by the
QDQ pass, by the custom ops' arguments (``ActivationSpec.op_args``) and by the ONNX lowering
(``ActivationSpec.from_op_args``), so the scheme is described in one place.

``SiteRecord`` is the per-site state the passes hand each other, kept in the observer node's meta
under ``SITE_META`` (and on the QDQ node that replaces it): the site's name and role, the clusters
``GroupChannelsPass`` found, whether ``SmoothPass`` folded scales into it, and the activation scheme
chosen for it (``SequentialGPTQPass``'s clip search), instead of loose dict keys and buffers found
by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from llmq_fx import qmath

__all__ = ["WeightSpec", "ActivationSpec", "Clusters", "SiteRecord", "SITE_META"]

# Node meta key of a site's ``SiteRecord`` (observer node, then its QDQ node).
SITE_META = "llmq_site"


@dataclass(frozen=True)
class WeightSpec:
    """Symmetric integer weights (zero point 0), one scale per output channel or per group of inputs.

    Attributes:
        bits: code width, 2..8 (codes in ``[-2^(bits-1), 2^(bits-1) - 1]``, held in int8).
        group_size: input channels per scale (the ONNX blocked layout along axis 1), or None for
            one scale per output channel.
        clip: search each row's (group's) clipping ratio for its scale (``qmath.weight_scale``).
    """

    bits: int = 4
    group_size: int | None = None
    clip: bool = False

    def for_features(self, in_features: int) -> "WeightSpec":
        """This scheme for a weight of ``in_features`` inputs: one scale per output channel where
        ``group_size`` does not divide the width or is not narrower (as ``ActivationSpec.for_site``)."""
        g = self.group_size
        if g is not None and (in_features % g or in_features <= g):
            return dataclasses.replace(self, group_size=None)
        return self

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest ``(int8 codes [out, in], float32 scale)`` (``qmath.quantize_weight``)."""
        return qmath.quantize_weight(weight, self.bits, self.group_size, self.clip)

    def __str__(self) -> str:
        layout = "per-channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"W{self.bits} symmetric {layout}" + (", clip search" if self.clip else "")


@dataclass(frozen=True)
class ActivationSpec:
    """Activation codes of a Linear input.

    Attributes:
        bits: code width, 2..8.
        symmetric: signed codes with zero point 0; else unsigned codes with a zero point.
        dynamic: ranges computed at run time from each token (``qmath.dynamic_fake_quantize``);
            else static per-cluster ranges from calibration.
        group_size: dynamic only: channels per range within a token (0 = one range per token). In a
            config-level spec it is an upper bound; ``for_site`` resolves it for a site's width.
        clip_ratio: factor in (0, 1] on every range before its scale is computed.
    """

    bits: int = 4
    symmetric: bool = False
    dynamic: bool = True
    group_size: int = 0
    clip_ratio: float = 1.0

    @property
    def qrange(self) -> tuple[int, int]:
        return qmath.integer_range(self.bits, self.symmetric)

    def for_site(self, channels: int) -> "ActivationSpec":
        """This scheme at a site of ``channels`` inputs: the group size resolved by ``qmath.activation_group``
        (a site it does not divide, or as narrow, stays per token)."""
        if not self.dynamic:
            return self
        return dataclasses.replace(self, group_size=qmath.activation_group(channels, self.group_size))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` as the deployed dynamic QDQ will (float32 math, ``x``'s dtype back)."""
        if not self.dynamic:
            raise ValueError("a static activation spec has no run-time quantizer; its ranges come from calibration")
        return qmath.dynamic_fake_quantize(x, self.bits, self.symmetric, self.clip_ratio, self.group_size)

    def op_args(self) -> tuple[int, bool, float, int]:
        """Arguments after ``x`` of ``llmq.quantize_dequantize_dynamic``."""
        return (self.bits, self.symmetric, float(self.clip_ratio), int(self.group_size))

    @classmethod
    def from_op_args(cls, bits: int, symmetric: bool, clip_ratio: float = 1.0, group_size: int = 0) -> "ActivationSpec":
        """The spec a ``llmq.quantize_dequantize_dynamic`` node was built from (for the ONNX lowering)."""
        return cls(bits=int(bits), symmetric=bool(symmetric), dynamic=True, group_size=int(group_size),
                   clip_ratio=float(clip_ratio))

    def __str__(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        if self.dynamic:
            kind += f" groups of {self.group_size}" if self.group_size else " per token"
        sym = "symmetric" if self.symmetric else "asymmetric"
        clip = f", clip {self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""
        return f"A{self.bits} {sym} {kind}{clip}"


@dataclass
class Clusters:
    """Channel clusters of a site (``GroupChannelsPass``): ``labels[c]`` in ``[0, count)``, numbered by magnitude."""

    labels: torch.Tensor
    requested: int
    features: str

    @property
    def count(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.numel() else 0

    @property
    def permutation(self) -> torch.Tensor:
        """Channel order that makes every cluster contiguous (``x[..., permutation]``)."""
        return torch.argsort(self.labels, stable=True)


@dataclass
class SiteRecord:
    """The state of one activation site (an observer and the Linears reading it), shared by the passes.

    Attributes:
        name: the consumers' module path(s), e.g. ``model.layers.0.self_attn.{q_proj,k_proj,v_proj}``.
        consumers: module paths of the Linears reading the site.
        role: ``qkv`` / ``out_proj`` / ``fc1`` / ``fc2`` / ``other``, from the graph (``graph.site_role``).
        clusters: set by ``GroupChannelsPass``.
        smoothed: set by ``SmoothPass`` when it folded scales into the site.
        activation: the site's own activation scheme where a pass chose one (the clip ratio of
            ``SequentialGPTQPass``'s search); ``InsertQDQPass`` then builds the site's QDQ from it.
        effective_bits: after ``InsertQDQPass``: activation code bits averaged over the site's channels.
        outlier_channels: after ``InsertQDQPass`` with mixed precision: channels at the outlier bits.
    """

    name: str
    consumers: list[str]
    role: str = "other"
    clusters: Clusters | None = None
    smoothed: bool = False
    activation: ActivationSpec | None = None
    effective_bits: float | None = None
    outlier_channels: int | None = field(default=None)
