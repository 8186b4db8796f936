"""Quantization math shared by the passes, the custom ops, the ONNX export and the tests.

Conventions follow ONNX ``QuantizeLinear``/``DequantizeLinear`` so that PyTorch and onnxruntime
compute the same integers:

* ``q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)``
* ``x_hat = (q - zero_point) * scale``

``torch.round`` rounds half to even, as ONNX does. Division (not multiplication by a reciprocal)
is used on purpose: it is what onnxruntime does, and a reciprocal changes rounding at ties.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch

from llmq_fx import kernels
from llmq_fx.errors import StatisticsError

__all__ = [
    "integer_range",
    "minmax_scale_zero_point",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "dynamic_fake_quantize",
    "activation_group",
    "dequantize_weight",
    "gptq_quantize_weight",
    "hessian_factor",
    "HessianFactor",
    "input_aware_weight",
    "activation_error",
    "round_to_scale",
    "SCALE_EPS",
]

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def cuda_matmul_precision(precision: str):
    """Matrix products on CUDA in ``precision`` ("float32" or "tf32") inside the block; restored after.
    CPU products are float32 either way (TF32 is a CUDA mode)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def add_gram_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a^T b`` in float32 products, also while calibration allows TF32 (``calib_precision:
    "tf32"``): these are GPTQ's Hessian and cross moments. Measured on an H200 (8192 x 1024 inputs,
    max error / mean diagonal against float64): float32 2.3e-6, TF32 8.4e-5, and a three-product
    TF32 split of each operand (hi + lo) 3.8e-5, so only float32 is float32-accurate (a later
    measurement, 32768 tokens: chunking the tokens brought the split 9x closer, so the tensor cores'
    accumulation is most of TF32's error there). With TF32 moments the act-aware solve of an fc2 of the
    opt-6.7b shape (16384 inputs) found its Hessian not positive definite; with float32 moments the
    same run went past it."""
    with cuda_matmul_precision("float32"):
        return out.addmm_(a.T, b)


def add_moments_(hessian: torch.Tensor, cross: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
                 precision: str = "float32") -> None:
    """GPTQ's moments of one batch: ``hessian += q^T q`` and ``cross += q^T x`` (``q`` the quantized
    model's quantized input, ``x`` the float model's input, both ``[tokens, C]``).

    On the CPU, and on CUDA without TF32, two float32 products. On CUDA with TF32 allowed
    (``calib_precision: "tf32"``) the Gram ``q^T q`` is computed from its blocks on and above the
    diagonal (symmetric), in ``precision`` ("float32", or "tf32": about 3x faster on an H200, with an
    error about 40x float32's; ``damped_hessian_factor`` is the check a TF32 Hessian must pass), and
    ``q^T x = q^T q + q^T (x - q)``: the Gram plus a TF32 product of the difference, which is small
    beside ``x`` (the activation quantizer's error and the upstream layers' drift), so TF32's relative
    error applies to the small term only."""
    if not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        add_gram_(hessian, q, q)
        add_gram_(cross, q, x)
        return
    gram = _symmetric_gram(q, precision=precision)
    hessian += gram
    cross += gram
    cross.addmm_(q.T, x - q)  # TF32


def _symmetric_gram(q: torch.Tensor, blocks: int = 4, precision: str = "float32") -> torch.Tensor:
    """``q^T q`` from the blocks on and above the diagonal (``blocks`` per side), products in ``precision``."""
    channels = q.shape[1]
    if channels < 1024 or channels % blocks:
        blocks = 1
    width = channels // blocks
    out = torch.empty(channels, channels, dtype=torch.float32, device=q.device)
    with cuda_matmul_precision(precision):
        for i in range(blocks):
            qi = q[:, i * width:(i + 1) * width]
            for j in range(i, blocks):
                block = qi.T @ q[:, j * width:(j + 1) * width]
                out[i * width:(i + 1) * width, j * width:(j + 1) * width] = block
                if j != i:
                    out[j * width:(j + 1) * width, i * width:(i + 1) * width] = block.T
    return out


class HessianFactor:
    """``H + lambda I`` factored once in float64 for every Linear that reads ``H`` (``hessian_factor``):
    the act-aware target's solve and GPTQ's inverse factor come from the one Cholesky factorization.

    ``order`` is GPTQ's visiting order (descending ``H_jj`` with ``act_order``, else ``0 .. C-1``) and
    ``lower`` the lower Cholesky factor ``M`` of the damped matrix permuted to ``order`` and then
    *reversed*: with ``P`` the permutation and ``J`` the reversal, ``J P^T (H + lambda I) P J = M M^T``.
    Reversed, because then ``R = J M J`` is upper with ``P^T (H + lambda I) P = R R^T``, so GPTQ's upper
    factor of the inverse (``U^T U = (P^T (H + lambda I) P)^-1``) is ``U = R^-1 = J M^-1 J``: one Cholesky
    and one triangular inverse, where the usual route (Cholesky, ``cholesky_inverse``, Cholesky of the
    inverse) factors twice and forms the inverse. ``damp`` is the dampening that factorized."""

    def __init__(self, order: torch.Tensor, lower: torch.Tensor, damp: float, act_order: bool):
        self.order, self.lower, self.damp, self.act_order = order, lower, damp, act_order
        self._upper: torch.Tensor | None = None

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``(H + lambda I)^-1 b`` for ``b`` ``[C, k]`` (float64, on ``lower``'s device)."""
        rev = self.order.flip(0)
        y = torch.cholesky_solve(b.to(device=self.lower.device, dtype=torch.float64)[rev], self.lower)
        out = torch.empty_like(y)
        out[rev] = y
        return out

    def gptq_upper(self) -> torch.Tensor:
        """GPTQ's ``U`` (upper, float32, rows and columns in ``order``), computed on first use and kept for
        the other Linears of the site."""
        if self._upper is None:
            eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
            inverse = torch.linalg.solve_triangular(self.lower, eye, upper=False)
            del eye
            upper = inverse.to(torch.float32).flip(0, 1)
            if not bool(torch.isfinite(upper).all()):
                raise StatisticsError(f"GPTQ: the inverse factor of the Hessian (dampening {self.damp:g} x mean(diag H)) "
                                      "overflows float32; calibrate on more tokens or raise 'gptq_damp'")
            self._upper = upper
        return self._upper


def hessian_factor(hessian: torch.Tensor, damp: float, act_order: bool = True, what: str = "",
                   retries: tuple[int, ...] | None = None) -> HessianFactor:
    """``HessianFactor`` of ``hessian`` with dead inputs (``H_jj == 0``) set to 1 and ``damp * mean(diag H)``
    on the diagonal, in float64 on ``hessian``'s device. Where rounding left the damped matrix short of
    positive definite the dampening is retried at 10x, 100x, 1000x (a warning says so; ``retries=(1,)``
    tries the asked one only) before ``StatisticsError`` is raised."""
    h = _live64(hessian, hessian.device)
    n = h.shape[0]
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n, device=h.device)
    rev = order.flip(0)
    h = h[rev[:, None], rev[None, :]]
    mean_diag = torch.diagonal(h).mean()
    who = f"GPTQ {what}" if what else "GPTQ"
    tried = []
    for factor in retries or _GPTQ_DAMP_RETRIES:
        d = damp if factor == 1 else max(damp, 1e-3) * factor
        tried.append(d)
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            if factor != 1:
                logger.warning("%s: Hessian needed dampening %g (asked %g) to be positive definite", who, d, damp)
            return HessianFactor(order, lower, d, act_order)
    raise StatisticsError(
        f"{who}: the Hessian is not positive definite even with dampening {', '.join(f'{d:g}' for d in tried)} "
        "x mean(diag H); calibrate on more tokens or raise 'gptq_damp'"
    )


def damped_hessian_factor(hessian: torch.Tensor, damp: float, act_order: bool = True) -> HessianFactor | None:
    """``hessian_factor`` at the asked dampening only; None where it has no Cholesky factor there (a Hessian
    computed in TF32 is then recomputed in float32)."""
    try:
        return hessian_factor(hessian, damp, act_order, retries=(1,))
    except StatisticsError:
        return None


def _live64(hessian: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 copy of ``hessian`` on ``device`` with dead inputs (``H_jj == 0``) set to 1."""
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h


# Smallest scale: a channel that never moved from zero still gets a finite, positive scale.
SCALE_EPS = 1e-8


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: signed for symmetric, unsigned for asymmetric."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def minmax_scale_zero_point(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map ``[xmin, xmax]`` onto ``bits`` bits.

    The range is widened to contain zero so that zero is exactly representable (padding and ReLU
    zeros stay zeros). Symmetric codes use ``scale = absmax / qmax`` and zero point 0; asymmetric
    codes spread ``[min, max]`` over ``[0, 2^bits - 1]`` with a rounded, clamped zero point.
    """
    qmin, qmax = integer_range(bits, symmetric)
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = (absmax / qmax).clamp_min(SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((xmax - xmin) / (qmax - qmin)).clamp_min(SCALE_EPS)
        zero_point = torch.round(qmin - xmin / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape a per-axis vector so that it broadcasts along ``axis`` of ``x``."""
    if v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis] = v.numel()
    return v.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int = -1
) -> torch.Tensor:
    """Integer codes (int32) of ``x``; ``scale``/``zero_point`` are scalars or vectors along ``axis``."""
    s = _broadcast(scale.to(torch.float32), x, axis)
    z = _broadcast(zero_point.to(torch.float32), x, axis)
    return (torch.round(x.to(torch.float32) / s) + z).clamp(qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = -1) -> torch.Tensor:
    s = _broadcast(scale.to(torch.float32), q, axis)
    z = _broadcast(zero_point.to(torch.float32), q, axis)
    return (q.to(torch.float32) - z) * s


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int = -1
) -> torch.Tensor:
    """Quantize then dequantize, in float32, returned in ``x``'s dtype."""
    s = _broadcast(scale.to(torch.float32), x, axis)
    z = _broadcast(zero_point.to(torch.float32), x, axis)
    q = (torch.round(x.to(torch.float32) / s) + z).clamp(qmin, qmax)
    return ((q - z) * s).to(x.dtype)


def activation_group(channels: int, group_size: int | None) -> int:
    """Channels per dynamic activation range at a site of ``channels`` inputs (0 = one range per token).

    A site wider than ``group_size`` and divisible by it is split into groups of ``group_size``
    channels; any other site (as narrow or narrower, or not divisible) keeps one range per token.
    The passes that build and calibrate the quantizer both ask this function, so they agree.
    """
    if not group_size or channels <= group_size or channels % group_size:
        return 0
    return group_size


def dynamic_fake_quantize(
    x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0, group_size: int = 0
) -> torch.Tensor:
    """Per-token dynamic QDQ: every row (last axis = channels) gets its own range at run time.

    Same formulas as the static path (``minmax_scale_zero_point`` then ``fake_quantize``), with the
    range taken from the token itself, as QuaRot / per-token W4A4 schemes do. ``clip_ratio`` < 1
    shrinks each token's min and max by that factor before the scale is computed (QuaRot's
    activation clipping, 0.9 there): the few values beyond saturate, the rest get a finer step.
    ``group_size`` > 0 splits each token into groups of that many consecutive channels, each with
    its own range (fine-grained activation groups, as Atom does); 0 is one range per token.
    On CUDA with Triton, one fused kernel computes the same values (``kernels.dynamic_qdq``).
    """
    if x.is_cuda and kernels.available(x):
        qmin, qmax = integer_range(bits, symmetric)
        out = kernels.dynamic_qdq(x, qmin, qmax, symmetric, clip_ratio, group_size or x.shape[-1], SCALE_EPS)
        if out is not None:
            return out
    if group_size:
        channels = x.shape[-1]
        if channels % group_size:
            raise ValueError(f"activation group size {group_size} does not divide {channels} channels")
        grouped = x.reshape(*x.shape[:-1], channels // group_size, group_size)
        return dynamic_fake_quantize(grouped, bits, symmetric, clip_ratio).reshape(x.shape)
    qmin, qmax = integer_range(bits, symmetric)
    xf = x.to(torch.float32)
    lo = xf.amin(dim=-1, keepdim=True)
    hi = xf.amax(dim=-1, keepdim=True)
    if clip_ratio != 1.0:
        lo = lo * clip_ratio
        hi = hi * clip_ratio
    scale, zero_point = minmax_scale_zero_point(lo, hi, bits, symmetric)
    q = (torch.round(xf / scale) + zero_point).clamp(qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


# Weight clipping search: shrink factors of a row's absmax tried by ``weight_scale`` (1.0 .. 0.52) and the
# error norm it minimizes (|w - q(w)|^2.4, the norm GPTQ's and QuaRot's MSE range search use).
CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(25))
CLIP_NORM = 2.4


def weight_scale(w: torch.Tensor, qmax: int, clip: bool = False) -> torch.Tensor:
    """Symmetric scale per row of ``w`` (``[rows, cols]``): ``absmax / qmax``, or with ``clip`` the
    shrunk absmax (a factor from ``CLIP_GRID``, chosen per row) that minimizes the row's rounding
    error ``sum |w - round(w / s) * s|^CLIP_NORM``. Clipping the few largest weights buys a finer
    step for all the others; at 4 bits that usually lowers the error of the layer's output.
    """
    if clip and w.is_cuda and kernels.available(w):  # the same search in one pass per ratio (kernels.clip_scale)
        return kernels.clip_scale(w, qmax, CLIP_GRID, CLIP_NORM, SCALE_EPS)
    absmax = w.abs().amax(dim=1)
    if not clip:
        return (absmax / qmax).clamp_min(SCALE_EPS)
    qmin = -qmax - 1
    best = torch.full_like(absmax, float("inf"))
    scale = (absmax / qmax).clamp_min(SCALE_EPS)
    for ratio in CLIP_GRID:
        s = (absmax * ratio / qmax).clamp_min(SCALE_EPS)
        err = (w - torch.round(w / s[:, None]).clamp(qmin, qmax) * s[:, None]).abs().pow(CLIP_NORM).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
    return scale


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = None, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight quantization, per output channel or per group of input channels.

    Returns ``(qweight, scale)``: ``qweight`` int8 ``[out, in]`` holding values in
    ``[-2^(bits-1), 2^(bits-1)-1]``; ``scale`` float32 ``[out]`` (per channel) or
    ``[out, in // group_size]`` (grouped, the ONNX blocked layout along axis 1). ``clip``: search
    each row's (group's) clipping ratio (``weight_scale``) instead of taking its absmax.
    """
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32)
    _, qmax = integer_range(bits, symmetric=True)
    if group_size is None:
        scale = weight_scale(w, qmax, clip)
    else:
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features={in_features}")
        scale = weight_scale(w.reshape(-1, group_size), qmax, clip).reshape(out_features, in_features // group_size)
    return round_to_scale(w, scale, bits), scale


def round_to_scale(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest int8 codes of ``weight`` at given scales (``quantize_weight``'s layout: ``[out]``
    per channel or ``[out, in // group_size]``): the baseline a weight quantizer's scales get for free."""
    w = weight.detach().to(torch.float32)
    qmin, qmax = integer_range(bits, symmetric=True)
    if scale.dim() == 1:
        return torch.round(w / scale[:, None]).clamp(qmin, qmax).to(torch.int8)
    out_features, in_features = w.shape
    groups = w.reshape(out_features, scale.shape[1], -1)
    return torch.round(groups / scale[:, :, None]).clamp(qmin, qmax).reshape(out_features, in_features).to(torch.int8)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight from ``quantize_weight``'s output; the layout of ``scale`` says per-channel or grouped."""
    q = qweight.to(torch.float32)
    if scale.dim() == 1:
        return q * scale[:, None]
    out_features, in_features = q.shape
    n_groups = scale.shape[1]
    return (q.reshape(out_features, n_groups, in_features // n_groups) * scale[:, :, None]).reshape(
        out_features, in_features
    )


# GPTQ retries a failed Cholesky with the dampening multiplied by these factors (floor 1e-3 of mean(diag H)).
_GPTQ_DAMP_RETRIES = (1, 10, 100, 1000)


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    clip: bool = False,
    factor: HessianFactor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2023): round column by column, pushing each column's error onto the rest.

    Minimizes the layer output error ``||X W^T - X Wq^T||^2 = tr((W - Wq) H (W - Wq)^T)`` with
    ``H = X^T X`` (any positive multiple, e.g. the mean over tokens) greedily: after column ``j`` is
    rounded, the optimal change of the columns not yet rounded is ``-err_j * Hinv[j, j:] / Hinv[j, j]``
    (OBS), where ``Hinv`` is the inverse Hessian of the remaining columns. Its upper Cholesky factor
    ``U`` (``Hinv = U^T U``) holds every one of those rows at once: row ``j`` of ``U`` is ``Hinv_j[j, j:]``
    scaled by ``1 / sqrt(Hinv_j[j, j])``. Updates inside a block of ``block_size`` columns are applied
    at once; the rest of the matrix gets one matmul per block (lazy batch updates).

    * Dead inputs (``H_jj == 0``, never non-zero in calibration) get ``H_jj = 1`` and ``W[:, j] = 0``.
    * ``damp * mean(diag H)`` is added to the diagonal; if the Cholesky still fails, it is retried with
      10x, 100x, 1000x that (a warning is logged) before ``StatisticsError`` is raised.
    * ``act_order`` processes columns by descending ``H_jj`` (largest inputs first, while the most
      columns are left to absorb their error) and un-permutes at the end.
    * Scales: per channel, ``absmax / qmax`` of each row (after zeroing dead columns), as
      ``quantize_weight``. Grouped without ``act_order``: each group's scale is taken from the
      *error-updated* weights when the loop reaches its first column (blocks are rounded to a
      multiple of ``group_size`` so that the group's columns are up to date). Grouped with
      ``act_order``: "static groups" -- all group scales from the weight before any update, so a group
      stays the contiguous input columns ``[g*G, (g+1)*G)`` of the ONNX blocked layout although the
      columns are visited out of order.
    * ``clip``: every scale comes from ``weight_scale``'s clipping search instead of the plain absmax.
    * ``factor``: ``hessian_factor(hessian, damp, act_order)`` when the caller already has it (one per
      input site, shared by the Linears reading it); ``U`` is its ``gptq_upper()``.

    The damped Hessian's factor and its triangular inverse are float64 (``hessian_factor``), the rest is
    float32, on ``weight``'s device (CUDA when the model is on CUDA). On CUDA, with Triton importable and
    static scales, each block's column loop runs as one kernel (``kernels.gptq_block``).

    Returns:
        ``(qweight, scale)`` in ``quantize_weight``'s layout: int8 ``[out, in]`` codes, float32 scale
        ``[out]`` or ``[out, in // group_size]``; ``dequantize_weight(qweight, scale)`` is the GPTQ weight.

    Example:
        >>> q, s = gptq_quantize_weight(w, x.T @ x / len(x), bits=4, group_size=128)
        >>> w_hat = dequantize_weight(q, s)
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={in_features}")
    if group_size is not None and in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features={in_features}")
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    with cuda_matmul_precision("float32"):
        if factor is None:
            factor = hessian_factor(hessian, damp, act_order)
        elif factor.act_order != act_order or factor.lower.shape[0] != in_features:
            raise ValueError(f"the Hessian factor was computed for act_order={factor.act_order} and "
                             f"{factor.lower.shape[0]} inputs, not act_order={act_order} and {in_features}")
        return _gptq(weight, hessian, bits, group_size, act_order, block_size, clip, factor)


def _gptq(weight, hessian, bits, group_size, act_order, block_size, clip, factor):
    out_features, in_features = weight.shape
    qmin, qmax = integer_range(bits, symmetric=True)
    w = weight.detach().to(torch.float32).clone()
    dead = (torch.diagonal(hessian) == 0).to(w.device)
    w[:, dead] = 0.0

    # Scales fixed before the loop (per channel, or static groups); dynamic groups fill theirs in.
    if group_size is None:
        scale = weight_scale(w, qmax, clip)
    else:
        n_groups = in_features // group_size
        scale = weight_scale(w.reshape(-1, group_size), qmax, clip).reshape(out_features, n_groups)
        block_size = max(group_size, block_size // group_size * group_size)
    static_scale = group_size is None or act_order

    perm = factor.order.to(w.device)  # visiting order: descending H_jj with act_order, else 0 .. C-1
    if act_order:
        w = w[:, perm]
    if group_size is not None and static_scale:
        column_scale = scale[:, perm // group_size]  # [out, in] in visiting order; indexed by ints below

    u = factor.gptq_upper().to(w.device)
    codes = torch.empty_like(w)
    one_launch = static_scale and kernels.available(w)  # the loop below as one Triton kernel per block
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        if one_launch and not (i2 - i1) & (i2 - i1 - 1):
            block_codes = torch.empty_like(w1)
            block_scale = scale if group_size is None else column_scale[:, i1:i2]
            kernels.gptq_block(w1, u1.contiguous(), block_scale, qmin, qmax, block_codes, err1)
            codes[:, i1:i2] = block_codes
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
            continue
        for i in range(i2 - i1):
            j = i1 + i
            if group_size is None:
                s = scale
            elif static_scale:
                s = column_scale[:, j]
            else:
                if j % group_size == 0:
                    # Groups never straddle blocks: w1 holds the group's fully updated columns.
                    scale[:, j // group_size] = weight_scale(w1[:, i:i + group_size], qmax, clip)
                s = scale[:, j // group_size]
            col = w1[:, i]
            q = torch.round(col / s).clamp(qmin, qmax)
            codes[:, j] = q
            e = (col - q * s) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scale


def activation_error(weight: torch.Tensor, xs: Iterable[torch.Tensor], quantizers: list, gram: bool | None = None) -> list[torch.Tensor]:
    """``sum_x ||(Q(x) - x) W^T||^2`` for each activation quantizer ``Q`` (a callable on ``[tokens, C]``),
    over the batches ``xs`` (read once, so a stream of batches will do): the output error a Linear of
    weight ``W`` (``[O, C]``) gets from ``Q``.

    With ``D = Q(x) - x`` it equals ``sum_ij (D^T D)_ij (W^T W)_ij``. ``gram`` (default: when
    ``O > C``, e.g. q/k/v together, fc1, gate/up) takes that form: the ``[C, C]`` Gram matrix of ``D``
    costs ``C / O`` of the ``[tokens, O]`` product. Batches on several devices (a walk spread over
    GPUs) are reduced where they are, against a copy of ``W`` there, and the sums added on ``weight``'s
    device. Returns float64 scalars."""
    outputs, channels = weight.shape
    if gram is None:
        gram = outputs > channels
    per_device: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def on(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if device not in per_device:
            w = weight.detach().to(device).float()
            if gram:
                per_device[device] = w.T @ w, [torch.zeros(channels, channels, device=device) for _ in quantizers]
            else:
                per_device[device] = w, [torch.zeros((), dtype=torch.float64, device=device) for _ in quantizers]
        return per_device[device]

    on(weight.device)
    for x in xs:
        w, accs = on(x.device)
        flat = x.reshape(-1, channels).float()
        for acc, quantize in zip(accs, quantizers):
            d = quantize(flat) - flat
            if gram:
                acc.addmm_(d.T, d)
            else:
                acc += (d @ w.T).square().sum().double()
    totals = [torch.zeros((), dtype=torch.float64, device=weight.device) for _ in quantizers]
    for w, accs in per_device.values():
        for total, acc in zip(totals, accs):
            total += ((acc * w).sum().double() if gram else acc).to(weight.device)
    return totals


def input_aware_weight(
    weight: torch.Tensor, hessian_q: torch.Tensor, cross: torch.Tensor, strength: float, damp: float = 0.01,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float weight GPTQ should round when the layer will read quantized inputs ``Xq = Q(X)``.

    With ``Hq = Xq^T Xq`` and ``C = Xq^T X`` (any common positive multiple, e.g. means over tokens),
    returns the minimizer of

        strength * ||X W^T - Xq V^T||^2 + (1 - strength) * ||Xq W^T - Xq V^T||^2

    over float ``V``: the first term is the layer's true output error once its input is quantized,
    the second keeps the layer's own function on those inputs (strength 0 returns ``W``). Setting
    the gradient to zero gives ``Hq V^T = strength * C W^T + (1 - strength) * Hq W^T``, so

        V = W + strength * (W C^T Hq^-1 - W),

    and for any integer weight ``Wq`` the objective is ``tr((V - Wq) Hq (V - Wq)^T)`` plus a
    constant: GPTQ of ``V`` with Hessian ``Hq`` minimizes it (as GPTAQ, Li et al. 2025, does for
    the quantized model's inputs; here ``Q`` is the layer's own per-token activation quantizer on
    the float model's inputs). ``damp * mean(diag Hq)`` is added to ``Hq``'s diagonal for the solve,
    as in GPTQ; rows of ``Hq`` that are all zero (dead inputs) leave those columns of ``W`` as they are.
    ``factor``: that damped matrix's ``HessianFactor`` when already computed (``hessian_factor``, once for
    the Linears sharing ``Hq``).

    Computed in float64 on ``weight``'s device; returned as float32.
    """
    out_features, in_features = weight.shape
    for name, m in (("hessian_q", hessian_q), ("cross", cross)):
        if m.shape != (in_features, in_features):
            raise ValueError(f"{name} shape {tuple(m.shape)} does not match in_features={in_features}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    w = weight.detach().to(torch.float64)
    if strength == 0.0:
        return w.to(torch.float32)
    c = cross.detach().to(device=w.device, dtype=torch.float64)
    dead = (torch.diagonal(hessian_q) == 0).to(w.device)
    if factor is None:
        factor = hessian_factor(hessian_q, damp, act_order=False, what="act-aware target")
    # Hq symmetric positive definite: (W C^T Hq^-1)^T = Hq^-1 C W^T, one Cholesky solve for all rows.
    target = factor.solve(c @ w.T).to(w.device).T
    target[:, dead] = w[:, dead]
    return (w + strength * (target - w)).to(torch.float32)
