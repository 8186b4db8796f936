"""Rotation pass (QuaRot, Ashkboos et al. 2024): orthogonal rotations fused into the weights.

An orthogonal ``Q`` leaves a pre-norm transformer's function unchanged when every vector written
into the residual stream is multiplied by ``Q`` and every Linear that reads the (normalized)
residual un-does it, because RMS normalization commutes with ``Q``: ``||x Q|| = ||x||``. The
rotated residual has no outlier channels any more (a Hadamard ``Q`` spreads each channel over all
of them), which is what makes 4-bit activations of the q/k/v, fc1/gate/up inputs workable.

Pattern (found from the graph, not from module names):

* **norms** -- ``aten.layer_norm`` nodes and the decomposed RMSNorm ``mul(weight, x * rsqrt(...))``
  (``llmq_fx.graph.norm_affine``). All of one kind; a post-LN model (a norm output feeding the
  residual, OPT-350m) or a residual read by anything but norms and adds is rejected.
* **residual stream** -- walking up from every norm input through ``add``, views, casts and
  dropout. Its leaves are the **writers**: ``aten.embedding`` of a parameter (token and learned
  position embeddings) and Linears (out_proj/o_proj, fc2/down_proj).
* **readers** -- Linears whose input is a norm output (through views): q/k/v, fc1/gate/up, lm_head.

Rewrite, in float64 then cast back:

1. *LayerNorm mean (OPT).* ``LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * g + b``. Subtract from
   every writer its mean over output channels: ``W <- (I - 11^T/d) W``, ``b <- b - mean(b)``,
   embedding rows ``E <- E - mean(E)``. Every residual vector is then a sum of zero-mean vectors,
   so ``mean(x) = 0`` and ``var(x) = mean(x^2)``: the LayerNorm equals
   ``x * rsqrt(mean(x^2) + eps) * g + b`` exactly, and that RMS form is what the graph gets (the
   layer_norm node is replaced by ``mul/mean/add/rsqrt/mul`` nodes). The RMS form is invariant to
   ``Q`` while the mean subtraction is not, which is why the mean must be absorbed first.
2. *Norm affine into readers.* ``W_r (g * y + b) + c = (W_r diag(g)) y + (W_r b + c)``: the reader
   weights absorb ``g`` (columns) and ``b`` (into the reader bias, created if missing), and the
   norm keeps a weight of ones (a ``mul`` node, so SmoothQuant can still fold a scale into it).
3. *Residual rotation.* ``Q = diag(+-1) (H_{2^j} (x) F)``, a random-sign Hadamard matrix: for
   ``d = 2^k m`` with ``m > 1``, ``F`` is a Paley Hadamard matrix of order ``m 2^i`` (SmolLM2's
   576 = 16 x 36, 1536 = 128 x 12; ``paley_hadamard``), so every entry of ``Q`` is ``+-1/sqrt(d)`` and
   each channel is spread evenly over all of them; only where no Paley order fits is ``F`` a seeded
   random orthogonal ``R_m``, which mixes less evenly. Writers ``W <- Q^T W``,
   ``b <- Q^T b``, embeddings ``E <- E Q``; readers ``W_r <- W_r Q``. Tied weights (embedding and
   lm_head) are untied first, since they now differ, unless ``keep_tied``: then the lm_head reads the
   rotated table ``E Q`` itself, and the norm's weight, which step 2 would fold into it, goes into a
   float ``d x d`` matmul in front of it instead: ``n' M (E Q)^T = n diag(g) E^T`` with
   ``M = Q^T diag(g) Q`` and ``n' = n Q`` the rotated normalized residual. One table serves both ends
   (the builder's shared int4 embedding), for ``d^2`` more multiply-adds per token against ``d x vocab``.
   RMS norms only: a LayerNorm's bias and the centred table (step 1) do not fit one shared table.
   With ``sort`` the columns of ``Q`` are permuted first (``Q -> Q P``, still orthogonal, fused the same
   way): ``P`` orders the channels the rotated readers will see, ``n(x) Q`` with ``n(x)`` the normalized
   norm input, measured on calibration batches before any weight changes (``channel_order``), so that
   each contiguous group of a dynamic activation quantizer holds channels of similar range.
4. *Value heads.* Per attention head, ``H_hd`` rotates V: v_proj output rows of each head block
   ``W_v <- H^T W_v`` (bias alike) and out_proj columns of each head block ``W_o <- W_o H``; the
   attention output of a head is a convex combination of that head's V rows, so it is rotated
   alike. One ``H`` for all heads, so grouped-query attention works too.
5. *Online rotation of the fc2/down_proj input.* The ReLU/SiLU between fc1 and fc2 does not commute
   with a rotation, so it cannot be fused: a graph node computes ``u T`` with
   ``T = A (x) B`` (Kronecker, ``A = H_a``, ``B = H_b' (x) F``, ``F`` as above) as two small matmuls over a
   ``[..., a, b]`` view (cost ``F (a + b)`` per token instead of ``F^2``), and fc2 absorbs
   ``W2 <- W2 T``.

The float output is unchanged up to float32 rounding (tests check it). Rotation changes every
statistic, so the pass runs before the observers are inserted.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.errors import UnsupportedModelError
from llmq_fx.graph import (
    VIEW_OPS,
    CASTS,
    attention_value_source,
    attr,
    attr_users_elsewhere,
    compute_device,
    is_linear,
    linear_nodes,
    module_path,
    norm_affine,
    read_attr,
    record_outputs,
    set_attr,
    site_role,
    storage_key,
    traced_dtype,
    write_attr,
)
from llmq_fx.channel_order import ResidualOrder
from llmq_fx.passes.base import CalibratedPass

__all__ = ["RotatePass", "RotateOptions", "residual_basis", "hadamard", "paley_hadamard", "random_orthogonal", "rotation_matrix", "kron_factors", "ONLINE_ROTATION_META"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
_CASTS = CASTS
_PASS_THROUGH = VIEW_OPS | _CASTS
# Side-effect-free checks torch.export leaves in the graph; they read values but change nothing.
_IGNORED = {aten._assert_tensor_metadata.default}
# Node meta key marking the nodes of an online rotation (graph.site_role looks through them).
ONLINE_ROTATION_META = "llmq_online_rotation"


# -- orthogonal matrices ----------------------------------------------------------------------
def hadamard(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of order ``n`` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal ``n x n`` matrix (QR of a Gaussian with the sign fix), float64."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def _split(n: int) -> tuple[int, int]:
    """``n = 2^k * m`` with ``m`` odd."""
    k = (n & -n).bit_length() - 1
    return 2**k, n >> k


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley_hadamard(n: int) -> torch.Tensor | None:
    """Normalized Hadamard matrix of order ``n`` from Paley's constructions, float64, or None.

    With ``q`` a prime and ``chi`` the quadratic character mod ``q``, the Jacobsthal matrix
    ``J[i, j] = chi(j - i)`` gives (Paley 1933):

    * *Paley I*, ``n = q + 1``, ``q = 3 mod 4`` (``J`` skew): ``H = I + [[0, 1^T], [-1, J]]``;
    * *Paley II*, ``n = 2 (q + 1)``, ``q = 1 mod 4`` (``J`` symmetric): the conference matrix
      ``C = [[0, 1^T], [1, J]]`` with every 0 replaced by ``[[1, -1], [-1, -1]]`` and every
      ``+-1`` by ``+-[[1, 1], [1, -1]]``.

    Orders built include 12, 20, 28, 36, 44 and 60 (not 40 or 52 themselves; 40 = 2 x 20 comes
    from the Kronecker product). For a width ``n = 2^k m``, ``H_{2^j} (x) H_{m 2^i}`` is then a
    Hadamard matrix of order ``n`` (``_odd_factor``). The result is checked (``H H^T = n I``) before
    it is returned.
    """
    def jacobsthal(q: int) -> torch.Tensor:
        residues = {(x * x) % q for x in range(1, q)}
        chi = [0] + [1 if r in residues else -1 for r in range(1, q)]
        return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)

    h = None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        q = n - 1
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal(q)
        h = torch.eye(n, dtype=torch.float64) + s
    elif n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        q = n // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(c, one) + torch.kron((c == 0).to(torch.float64), zero)
    if h is None:
        return None
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):
        raise AssertionError(f"Paley construction of order {n} is not a Hadamard matrix")
    return h / math.sqrt(n)


def _odd_factor(p: int, m: int, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """For ``p * m`` (``p`` a power of two, ``m`` odd): ``(p', F)`` with ``F`` orthogonal of order ``m p / p'``.

    ``F`` is a Paley Hadamard matrix of order ``m 2^i`` (smallest ``i`` that works, ``2^i <= p``), so
    that ``H_{p'} (x) F`` is a Hadamard matrix: every entry ``+-1/sqrt(n)``, each channel spread
    evenly over all of them. Where no Paley order fits, ``F = R_m`` is a seeded random orthogonal
    matrix (``p' = p``), which mixes less evenly.
    """
    if m == 1:
        return p, torch.ones(1, 1, dtype=torch.float64)
    i = 0
    while 2**i <= p:
        f = paley_hadamard(m * 2**i)
        if f is not None:
            return p >> i, f
        i += 1
    return p, random_orthogonal(m, generator)


def rotation_matrix(n: int, generator: torch.Generator, random_signs: bool = True) -> torch.Tensor:
    """``diag(+-1) (H_{2^k} (x) F)`` of order ``n = 2^k m``: orthogonal, float64 ``[n, n]``.

    ``F`` is 1 for a power of two, else a Paley Hadamard factor (a full Hadamard matrix of order
    ``n``, as QuaRot builds for 12, 20, 28, ... times a power of two) or, where none exists, a seeded
    random orthogonal ``R_m`` (``_odd_factor``).
    """
    p, m = _split(n)
    p, f = _odd_factor(p, m, generator)
    q = torch.kron(hadamard(p), f)
    if random_signs:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        q = signs[:, None] * q
    return q


def kron_factors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` orthogonal with ``A (x) B`` of order ``n`` and ``a + b`` small: ``A = H_a``, ``B = H_b' (x) F``
    (``F`` as in ``rotation_matrix``)."""
    p, m = _split(n)
    k = p.bit_length() - 1
    a = 2 ** (k - k // 2)
    b_pow, f = _odd_factor(p // a, m, generator)
    return hadamard(a), torch.kron(hadamard(b_pow), f)


def kron_matmul(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w @ kron(a, b)`` without the Kronecker product: each row of ``w`` as an ``[a, b]`` matrix ``X``
    becomes ``a^T X b``, ``(a + b)`` products per entry instead of ``a b`` (opt-13b's fc2 weights: 288
    instead of 20480)."""
    rows = w.shape[0]
    return (a.T @ (w.reshape(rows, a.shape[0], b.shape[0]) @ b)).reshape(rows, -1)


# -- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RotateOptions:
    """Options of ``RotatePass``.

    Attributes:
        seed: seed of the random signs (and of a random orthogonal factor where no Paley order fits).
        required: an unsupported graph is an error (config ``rotate: true``); otherwise (``"auto"``)
            the pass leaves the graph untouched, logs a warning and records why in
            ``gm.meta["llmq_fx"]["rotation_skipped"]``.
        residual, heads, online: which of the rotations (module docstring: 1-3, 4, 5) to apply.
        keep_tied: keep an lm_head tied to the token embedding tied, with its norm's weight in a float
            matmul in front of it (module docstring, 3); set when both tables are quantized alike, so the
            exported model stores one table.
        sort: order the rotated residual channels (``Q -> Q P``, module docstring, 3) as this
            ``ResidualOrder`` says, from the normalized residual at the readers' inputs over the first
            calibration batches (config ``sort_residual``); None keeps ``Q``'s own order.
    """

    seed: int = 0
    required: bool = False
    residual: bool = True
    heads: bool = True
    online: bool = True
    keep_tied: bool = False
    sort: ResidualOrder | None = None


@dataclass
class _ResidualPlan:
    """Everything the residual rotation will touch, found and checked before any weight changes."""

    norms: list
    kind: str
    writers: list[fx.Node]
    readers: list[tuple[fx.Node, object]]
    post_norms: list = field(default_factory=list)  # norms between a writer and the residual: rotated online
    head_norms: list = field(default_factory=list)  # norms inside attention (QK-norm): off the residual stream


class RotatePass(CalibratedPass):
    """Fuse residual, value-head and fc2-input rotations into the weights (plus online fc2 nodes).

    Every pattern is matched and checked before the first weight is changed, so an unsupported graph
    is reported (``required``) or skipped (``"auto"``) with the graph untouched. With ``sort`` the pass
    reads calibration batches (``with_calibration``) to order the residual channels.
    """

    Options = RotateOptions
    stage = "rotate"

    @classmethod
    def from_config(cls, config) -> "RotatePass | None":
        if not config.rotate:
            return None
        return cls(RotateOptions(seed=config.seed, required=config.rotate is True,
                                 keep_tied=config.embedding_spec() == config.lm_head_spec(), sort=config.residual_order()))

    def call(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        meta = gm.meta.setdefault("llmq_fx", {})
        try:
            plan = _residual_plan(gm) if opts.residual else None
            heads = _value_head_pairs(gm) if opts.heads else []
            online = _online_targets(gm) if opts.online else []
        except UnsupportedModelError as err:
            if opts.required:
                raise
            meta["rotation_skipped"] = str(err)
            if opts.sort is not None:
                meta["residual_sort"] = {"sorted": False, "reason": "no rotation"}
            logger.warning("rotate=auto: not rotating (%s)", err)
            return PassResult(gm, False)
        meta["rotation_skipped"] = None
        gen = torch.Generator().manual_seed(opts.seed)
        report = meta.setdefault("rotation", {})
        if plan is not None:
            report["residual"] = self._rotate_residual(gm, plan, gen)
        if opts.heads:
            report["heads"] = self._rotate_heads(gm, heads, gen)
            report["heads"]["not_rotated"] = _value_heads_left(gm, heads)
        if opts.online:
            report["online"] = self._online(gm, online, gen)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    # -- 1-3: residual stream -----------------------------------------------------------------
    @torch.no_grad()
    def _rotate_residual(self, gm: fx.GraphModule, plan: _ResidualPlan, gen: torch.Generator) -> dict:
        norms, kind, writers, readers = plan.norms, plan.kind, plan.writers, plan.readers
        d = attr(gm, norms[0].weight.target).numel()
        # Drawn on the CPU generator (the same matrix whatever the device), used where the passes compute.
        q = rotation_matrix(d, gen)
        full_hadamard = bool(torch.allclose(q.abs(), torch.full_like(q, d**-0.5), rtol=0, atol=1e-12))
        q = q.to(compute_device(gm))  # on the meta device for a decoder captured without weights (export.decoder)
        center = kind == "layer_norm"

        # Where the residual basis now lives (LearnRotationPass rotates it further): last-axis tensors
        # (embedding tables, readers' weights, norm weights, the online rotation) and first-axis ones
        # (writers' weights and biases).
        basis = {"last_axis": [], "first_axis": [], "both_axes": []}
        tied = _tied_heads(gm, writers, readers) if self.options.keep_tied and not center else {}
        meta = gm.meta.setdefault("llmq_fx", {})
        if self.options.sort is not None:
            # Before any weight changes: the order of the channels the rotated readers will see.
            sites = list(dict.fromkeys(na.node for lin, na in readers if lin not in tied))
            norms_of = {na.node: na for _, na in readers}
            perm, meta["residual_sort"] = self.options.sort.permutation(
                self._rotated_maxima(gm, [norms_of[n] for n in sites], q, center))
            q = q[:, perm.to(q.device)]
        else:
            meta["residual_sort"] = {"sorted": False, "reason": "not asked (sort_residual)"}
        for w in writers:
            if w.target == aten.embedding.default:
                if any(emb is w for emb in tied.values()):
                    target = w.args[0].target  # shared with the lm_head it stays tied to
                else:
                    target = _own_param(gm, w, w.args[0], _embedding_path(w))
                e = _read(gm, target)
                if center:
                    e = e - e.mean(dim=1, keepdim=True)
                write_attr(gm, target, e @ q)
                basis["last_axis"].append(target)
            else:
                path = module_path(w)
                wt = _own_param(gm, w, w.args[1], f"{path}.weight")
                wm = _read(gm, wt)
                if center:
                    wm = wm - wm.mean(dim=0, keepdim=True)
                write_attr(gm, wt, q.T @ wm)
                basis["first_axis"].append(wt)
                if len(w.args) > 2 and isinstance(w.args[2], fx.Node):
                    bt = _own_param(gm, w, w.args[2], f"{path}.bias")
                    b = _read(gm, bt)
                    if center:
                        b = b - b.mean()
                    write_attr(gm, bt, q.T @ b)
                    basis["first_axis"].append(bt)
        kept_tied = []
        for lin, na in readers:
            path = module_path(lin)
            if lin in tied:
                kept_tied.append(self._norm_matmul(gm, lin, na, q, basis, tied[lin]))
                continue
            wt = _own_param(gm, lin, lin.args[1], f"{path}.weight")
            wm = _read(gm, wt)
            g = _read(gm, na.weight.target) + na.offset
            bias = None
            if len(lin.args) > 2 and isinstance(lin.args[2], fx.Node):
                bias = _read(gm, _own_param(gm, lin, lin.args[2], f"{path}.bias"))
            if na.bias is not None:
                beta = _read(gm, na.bias.target)
                extra = wm @ beta
                bias = extra if bias is None else bias + extra
            write_attr(gm, wt, (wm * g[None, :]) @ q)
            basis["last_axis"].append(wt)
            basis.setdefault("readers", []).append(wt)
            if bias is not None:
                if len(lin.args) > 2 and isinstance(lin.args[2], fx.Node):
                    write_attr(gm, lin.args[2].target, bias)
                else:
                    bt = f"{path}.bias"
                    home = attr(gm, wt)
                    set_attr(gm, bt, bias.to(device=home.device, dtype=traced_dtype(lin.args[1]) or home.dtype), buffer=False)
                    with gm.graph.inserting_before(lin):
                        b_node = gm.graph.get_attr(bt)
                    lin.args = (lin.args[0], lin.args[1], b_node)
        for na in norms:
            ref = attr(gm, na.weight.target)
            write_attr(gm, na.weight.target, torch.full_like(ref, 1.0 - na.offset, dtype=torch.float64))  # weight + offset = 1
            basis["last_axis"].append(na.weight.target)
            if na.kind == "layer_norm":
                _layer_norm_to_rms(gm, na)
        online = []
        if plan.post_norms:
            home = attr(gm, norms[0].weight.target)
            dtype = traced_dtype(norms[0].weight) or home.dtype  # as captured, also where weights are stored narrower
            set_attr(gm, "llmq_rotation_residual", q.to(device=home.device, dtype=dtype).contiguous())
            basis["last_axis"].append("llmq_rotation_residual")
            for na in plan.post_norms:  # residual += norm(y) @ Q: the norm's own weight stays elementwise
                with gm.graph.inserting_after(na.node):
                    q_node = gm.graph.get_attr("llmq_rotation_residual")
                with gm.graph.inserting_after(q_node):
                    rotated = gm.graph.call_function(aten.matmul.default, (na.node, q_node))
                na.node.replace_all_uses_with(rotated, delete_user_cb=lambda u: u is not rotated)
                rotated.meta[ONLINE_ROTATION_META] = True
                rotated.meta["nn_module_stack"] = na.node.meta.get("nn_module_stack", {})
                online.append(na.node.meta.get("nn_module_stack") and module_path(na.node) or na.node.name)
        meta["residual_basis"] = {k: list(dict.fromkeys(v)) for k, v in basis.items()}
        return {"dim": d, "norm": kind, "centered": center, "full_hadamard": full_hadamard,
                "writers": len(writers), "readers": len(readers), "online_after_norms": online, "kept_tied": kept_tied,
                "norms_left_alone": [module_path(na.node) or na.node.name for na in plan.head_norms]}

    @torch.no_grad()
    def _rotated_maxima(self, gm: fx.GraphModule, norms: list, q: torch.Tensor, center: bool) -> list[torch.Tensor]:
        """Per norm that feeds rotated readers: each channel's largest magnitude in what those readers will
        read once the rotation is fused, ``n(x) Q`` with ``n(x)`` the norm's input normalized without its
        affine (centred first for a LayerNorm: the rotation's centring makes the stream zero-mean), from a
        float forward of the graph as it is now over the first ``sort.batches`` calibration batches."""
        maxima: dict[fx.Node, torch.Tensor] = {}
        inputs = {}
        for na in norms:
            inputs.setdefault(_norm_input(na), []).append(na.node)

        q32 = q.to(device=compute_device(gm), dtype=torch.float32)  # once, not per batch and norm

        def recorder(x_node: fx.Node):
            def add(x: torch.Tensor) -> None:
                x = x.reshape(-1, x.shape[-1]).float()
                if center:
                    x = x - x.mean(-1, keepdim=True)
                x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
                m = (x @ q32).abs().amax(0)
                for key in inputs[x_node]:
                    maxima[key] = m if key not in maxima else torch.maximum(maxima[key], m)
            return add

        record_outputs(gm, self._require_batches()[: self.options.sort.batches], {n: recorder(n) for n in inputs})
        if not maxima:
            raise UnsupportedModelError("sort_residual: no calibration batch reached the norms before the readers")
        return [maxima[na.node] for na in norms]

    def _norm_matmul(self, gm: fx.GraphModule, lin: fx.Node, na, q: torch.Tensor, basis: dict, emb: fx.Node) -> str:
        """Make the tied reader ``lin`` read ``norm(x) @ M`` (``M = Q^T diag(g) Q``, float, off the quantized
        Linears); its weight is the embedding table, rotated as a writer. Returns its module path."""
        path = module_path(lin)
        g = _read(gm, na.weight.target) + na.offset
        m = q.T @ (g[:, None] * q)
        target = "llmq_norm_affine_" + path.replace(".", "_")
        home = attr(gm, na.weight.target)
        set_attr(gm, target, m.to(device=home.device, dtype=traced_dtype(na.weight) or home.dtype).contiguous(), buffer=False)
        basis["both_axes"].append(target)
        x = lin.args[0]
        with gm.graph.inserting_before(lin):
            m_node = gm.graph.get_attr(target)
            affine = gm.graph.call_function(aten.matmul.default, (x, m_node))
        if "val" in x.meta:
            affine.meta["val"] = x.meta["val"]
        affine.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
        lin.replace_input_with(x, affine)
        if lin.args[1].target != emb.args[0].target:  # two names for one table: read the one rotated
            with gm.graph.inserting_before(lin):
                table = gm.graph.get_attr(emb.args[0].target)
            table.meta.update({k: v for k, v in lin.args[1].meta.items() if k == "val"})
            lin.replace_input_with(lin.args[1], table)
        return path

    # -- 4: value heads -------------------------------------------------------------------------
    @torch.no_grad()
    def _rotate_heads(self, gm: fx.GraphModule, pairs, gen: torch.Generator) -> dict:
        done = []
        for attn, v_proj, out, rows in pairs:
            val = attn.args[2].meta["val"]
            hd = int(val.shape[-1])
            h = rotation_matrix(hd, gen, random_signs=False)  # H_hd (a Paley-Kronecker Hadamard if hd is not a power of 2)
            vpath, opath = module_path(v_proj), module_path(out)
            vt = _own_param(gm, v_proj, v_proj.args[1], f"{vpath}.weight")
            full = _read(gm, vt)
            h = h.to(full.device)
            wv = full[rows]  # V's rows: all of v_proj, or V's part of a fused qkv_proj
            n_kv = wv.shape[0] // hd
            full[rows] = torch.einsum("ji,hjc->hic", h, wv.reshape(n_kv, hd, -1)).reshape(n_kv * hd, -1)
            write_attr(gm, vt, full)
            if len(v_proj.args) > 2 and isinstance(v_proj.args[2], fx.Node):
                bt = _own_param(gm, v_proj, v_proj.args[2], f"{vpath}.bias")
                bias = _read(gm, bt)
                bias[rows] = (bias[rows].reshape(n_kv, hd) @ h).reshape(-1)
                write_attr(gm, bt, bias)
            ot = _own_param(gm, out, out.args[1], f"{opath}.weight")
            wo = _read(gm, ot)
            n_q = wo.shape[1] // hd
            write_attr(gm, ot, (wo.reshape(wo.shape[0], n_q, hd) @ h).reshape(wo.shape[0], -1))
            done.append(vpath)
        return {"value_heads": len(done)}

    # -- 5: online fc2 input rotation -------------------------------------------------------------
    @torch.no_grad()
    def _online(self, gm: fx.GraphModule, targets: list[fx.Node], gen: torch.Generator) -> dict:
        graph = gm.graph
        done = []
        for lin in targets:
            x = lin.args[0]
            path = module_path(lin)
            wt = _own_param(gm, lin, lin.args[1], f"{path}.weight")
            w = _read(gm, wt)
            f = w.shape[1]
            a_mat, b_mat = (m.to(w.device) for m in kron_factors(f, gen))
            a, b = a_mat.shape[0], b_mat.shape[0]
            write_attr(gm, wt, kron_matmul(w, a_mat, b_mat))
            base = "llmq_rotation_" + path.replace(".", "_")
            home = attr(gm, wt)
            dtype = traced_dtype(lin.args[1]) or home.dtype  # as captured, also where weights are stored narrower
            set_attr(gm, f"{base}_a", a_mat.to(device=home.device, dtype=dtype).contiguous())
            set_attr(gm, f"{base}_b", b_mat.to(device=home.device, dtype=dtype).contiguous())
            stack = lin.meta.get("nn_module_stack", {})
            with graph.inserting_before(lin):
                a_node = graph.get_attr(f"{base}_a")
                b_node = graph.get_attr(f"{base}_b")
                # u [..., F] -> [..., a, b] -> (.. @ B) -> swap -> (.. @ A) -> swap -> [..., F]  ==  u (A (x) B)
                v = graph.call_function(aten.unflatten.int, (x, -1, [a, b]))
                v = graph.call_function(aten.matmul.default, (v, b_node))
                v = graph.call_function(aten.transpose.int, (v, -1, -2))
                v = graph.call_function(aten.matmul.default, (v, a_node))
                v = graph.call_function(aten.transpose.int, (v, -1, -2))
                v = graph.call_function(aten.flatten.using_ints, (v, -2, -1))
            n = v
            while n is not x:
                n.meta[ONLINE_ROTATION_META] = True
                n.meta["nn_module_stack"] = stack
                n = n.args[0]
            lin.replace_input_with(x, v)
            done.append({"linear": path, "size": f, "factors": [a, b]})
        return {"fc2_inputs": done}


def _residual_plan(gm: fx.GraphModule) -> _ResidualPlan:
    """Find the norms, the residual stream's writers and the norms' Linear readers; raise
    ``UnsupportedModelError`` for any pattern the rotation cannot absorb, before anything changes."""
    graph = gm.graph
    found = [na for n in graph.nodes if (na := norm_affine(n)) is not None]
    if not found:
        raise UnsupportedModelError("rotation: no LayerNorm/RMSNorm found in the graph")
    # The residual width: the width most norms have (2-4 per block and the final one, against 2 QK-norms
    # per block at most; a tie goes to the wider). A norm of another width normalizes something else
    # (QK-norm over a head): the residual rotation does not reach it.
    widths = {na.node: attr(gm, na.weight.target).numel() for na in found}
    counts = Counter(widths.values())
    d_model = max(counts, key=lambda w: (counts[w], w))
    head_norms = [na for na in found if widths[na.node] != d_model]
    norms, post_norms, why_not = [], [], None
    for na in found:
        if widths[na.node] != d_model:
            continue
        try:
            _linear_readers(na.node)
            norms.append(na)  # a pre-norm: Linears read it and absorb the rotation
        except UnsupportedModelError as err:
            post_norms.append(na)  # read by something else: on a writer's path (checked by the walk below)
            why_not = why_not or err
    if not norms:
        raise why_not or UnsupportedModelError("rotation: no norm of the residual width is read by Linears")
    kinds = {na.kind for na in norms + post_norms}
    if len(kinds) != 1:
        raise UnsupportedModelError(f"rotation: mixed norm kinds {sorted(kinds)} are not supported")
    kind = kinds.pop()
    norm_in = {na.node: _norm_input(na) for na in norms}
    internal = set()
    for na in norms:
        internal |= _norm_internal(na, norm_in[na.node])

    # Residual stream: walk up from the norm inputs through adds, views, casts, dropout.
    post_by_node = {na.node: na for na in post_norms}
    residual, writers, stack, online_writers = set(), [], list(norm_in.values()), []
    while stack:
        n = stack.pop()
        if n in residual:
            continue
        residual.add(n)
        if n in post_by_node:  # norm(Linear output) added to the residual (sandwich norms): rotated online after it
            online_writers.append(post_by_node[n])
            internal |= _norm_internal(post_by_node[n], _norm_input(post_by_node[n])) - {n}
        elif n.op == "call_function" and n.target == aten.add.Tensor and all(isinstance(a, fx.Node) for a in n.args[:2]):
            stack.extend(n.args[:2])
        elif n.op == "call_function" and n.target in _PASS_THROUGH:
            stack.append(n.args[0])
        elif (scaled := _scalar_multiple(n)) is not None:  # Gemma's embedding * sqrt(d): commutes with Q
            stack.append(scaled)
        elif is_linear(n) or (n.op == "call_function" and n.target == aten.embedding.default):
            writers.append(n)
        else:
            is_norm = norm_affine(n) is not None or n.target == aten.layer_norm.default
            hint = " (a norm on the residual stream: a post-LN block, as OPT-350m's)" if is_norm else ""
            raise UnsupportedModelError(
                f"rotation: residual stream is produced by {n.name} ({n.op} {n.target}), not by an "
                f"embedding, a Linear or an add{hint}"
            )
    for n in residual:
        for u in n.users:
            if u in residual or u in internal or u.target in _IGNORED or (
                u.target in _PASS_THROUGH and _only_feeds(u, residual | internal)
            ) or (u.target == aten.type_as.default and u.args[0] is not n):  # n only lends its dtype there
                continue
            raise UnsupportedModelError(
                f"rotation: residual value {n.name} feeds {u.name} ({u.target}), which is neither a norm nor "
                "the residual add (post-LN or an unsupported block)"
            )
    stray = [na.node.name for na in post_norms if all(o is not na for o in online_writers)]
    if stray:
        raise UnsupportedModelError(
            f"rotation: norm output {stray[0]} is read neither by Linears nor by the residual stream"
        )
    readers: list[tuple[fx.Node, object]] = []
    for na in norms:
        for lin in _linear_readers(na.node):
            readers.append((lin, na))

    for w in writers:
        if w.target == aten.embedding.default:
            _check_param(w, w.args[0])
        else:
            _check_param(w, w.args[1])
            if len(w.args) > 2 and isinstance(w.args[2], fx.Node):
                _check_param(w, w.args[2])
    for lin, _ in readers:
        _check_param(lin, lin.args[1])
        if len(lin.args) > 2 and isinstance(lin.args[2], fx.Node):
            _check_param(lin, lin.args[2])
    for na in norms:
        if na.kind == "layer_norm" and len(na.node.args[1]) != 1:
            raise UnsupportedModelError(
                f"rotation: {na.node.name} normalizes over {na.node.args[1]}, not the last dimension only"
            )
    return _ResidualPlan(norms, kind, writers, readers, online_writers, head_norms)


def _value_heads_left(gm: fx.GraphModule, pairs) -> list[dict]:
    """The attentions whose value heads the rotation did not reach, each with the reason."""
    done = {attn for attn, *_ in pairs}
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default]
    left = [{"attention": module_path(a) or a.name,
             "why": "V does not come from a Linear through views and a slice of whole heads"}
            for a in attentions if a not in done]
    if not attentions:
        left.append({"attention": "all", "why": "no scaled_dot_product_attention node (eager matmul/softmax attention, e.g. "
                     "with attention softcapping): value heads and out_proj inputs are not rotated"})
    return left


def _value_head_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """``(attention, v_proj, out_proj)`` of every attention whose value heads can be rotated."""
    pairs = []
    for out in linear_nodes(gm.graph):
        av = attention_value_source(out.args[0])
        if av is None:
            continue
        attn, v_proj, rows = av
        if attn.args[2].meta.get("val") is None:
            logger.info("rotation: no shape for %s, value heads not rotated", attn.name)
            continue
        if (rows.stop - rows.start) % int(attn.args[2].meta["val"].shape[-1]):
            logger.info("rotation: V of %s is not whole heads of %s, value heads not rotated", attn.name, v_proj.name)
            continue
        for lin in (v_proj, out):
            _check_param(lin, lin.args[1])
        if len(v_proj.args) > 2 and isinstance(v_proj.args[2], fx.Node):
            _check_param(v_proj, v_proj.args[2])
        pairs.append((attn, v_proj, out, rows))
    return pairs


def _online_targets(gm: fx.GraphModule) -> list[fx.Node]:
    """The fc2/down_proj Linears (input after the MLP activation) that get an online rotation."""
    targets = [lin for lin in linear_nodes(gm.graph) if site_role(lin.args[0], [lin]) == "fc2"]
    for lin in targets:
        _check_param(lin, lin.args[1])
    return targets


def _check_param(user: fx.Node, node) -> None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise UnsupportedModelError(f"rotation: {user.name} reads {node}, which is not a parameter")


# -- helpers ------------------------------------------------------------------------------------
def residual_basis(gm: fx.GraphModule) -> list[tuple[str, int]] | None:
    """The tensors ``RotatePass`` recorded as the residual basis, as ``(target, axis)`` (-1: the stream is
    their last axis, 0: their first, None: both, a ``d x d`` map from the stream to itself), each tensor
    once even when two names hold it; None when the graph
    has no rotated residual stream. ``LearnRotationPass`` transforms exactly these."""
    basis = gm.meta.get("llmq_fx", {}).get("residual_basis")
    if not basis or not basis.get("readers"):
        return None
    seen, out = set(), []
    for axis, key in ((-1, "last_axis"), (0, "first_axis"), (None, "both_axes")):
        for target in basis.get(key, []):
            if id(attr(gm, target)) not in seen:
                seen.add(id(attr(gm, target)))
                out.append((target, axis))
    return out


def _read(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """A parameter/buffer as float64 on the compute device (``graph.read_attr``)."""
    return read_attr(gm, target, torch.float64)


def _own_param(gm: fx.GraphModule, user: fx.Node, w_node: fx.Node, preferred: str) -> str:
    """Make ``user`` read a parameter nobody else reads (untie shared weights); return its target."""
    if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
        raise UnsupportedModelError(f"rotation: {user.name} reads {w_node}, which is not a parameter")
    if not attr_users_elsewhere(gm, w_node, user):
        return w_node.target
    target = preferred if preferred != w_node.target else f"{preferred}_untied"
    value = attr(gm, w_node.target).detach().clone()
    owner, _, name = target.rpartition(".")
    try:
        gm.get_submodule(owner) if owner else gm
    except AttributeError:
        target = "llmq_untied_" + target.replace(".", "_")
    set_attr(gm, target, value, buffer=False)
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(target)
    if "val" in w_node.meta:  # the captured dtype: a copy of a weight stored narrower computes as captured
        node.meta["val"] = w_node.meta["val"]
    user.replace_input_with(w_node, node)
    logger.info("rotation: untied %s -> %s for %s", w_node.target, target, user.name)
    return target


def _tied_heads(gm: fx.GraphModule, writers: list[fx.Node], readers) -> dict[fx.Node, fx.Node]:
    """``{reader: embedding}`` for readers whose weight is a token embedding's table (tied), where that
    table has no other user and the reader no bias."""
    tables = {}  # tied: one tensor, or two names sharing its storage
    for w in writers:
        if w.target == aten.embedding.default and isinstance(w.args[0], fx.Node) and w.args[0].op == "get_attr":
            tables[storage_key(attr(gm, w.args[0].target))] = w
    out = {}
    for lin, _ in readers:
        wn = lin.args[1]
        table = storage_key(attr(gm, wn.target)) if isinstance(wn, fx.Node) and wn.op == "get_attr" else None
        emb = tables.get(table)
        if emb is None or (len(lin.args) > 2 and lin.args[2] is not None):
            continue
        names = {name for name, t in list(gm.named_parameters(remove_duplicate=False))
                 + list(gm.named_buffers(remove_duplicate=False)) if storage_key(t) == table}
        users = {u for n in gm.graph.nodes if n.op == "get_attr" and (n.target in names or n in (wn, emb.args[0]))
                 for u in n.users}
        if users <= {lin, emb}:
            out[lin] = emb
    return out


def _embedding_path(node: fx.Node) -> str:
    return module_path(node) + ".weight" if node.meta.get("nn_module_stack") else f"llmq_embedding_{node.name}"


def _norm_input(na) -> fx.Node:
    """The residual value a norm normalizes."""
    if na.kind == "layer_norm":
        return na.node.args[0]
    other = na.node.args[1] if na.node.args[0] is na.scale else na.node.args[0]
    n = other
    while n.op == "call_function" and n.target in _PASS_THROUGH:
        n = n.args[0]
    # n = mul(x, rsqrt(...)): the operand that is not the rsqrt, down through casts.
    for a in n.args:
        if isinstance(a, fx.Node) and not (a.op == "call_function" and a.target == aten.rsqrt.default):
            while a.op == "call_function" and a.target in _CASTS:
                a = a.args[0]
            return a
    raise UnsupportedModelError(f"rotation: cannot find the input of norm {na.node.name}")


def _scalar_multiple(n: fx.Node) -> fx.Node | None:
    """``x`` when ``n`` is ``x * c`` with ``c`` a number or a one-element tensor (a rotation commutes with it)."""
    if not (n.op == "call_function" and n.target == aten.mul.Tensor and len(n.args) == 2):
        return None
    a, b = n.args
    for x, c in ((a, b), (b, a)):
        if not isinstance(x, fx.Node):
            continue
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return x
        val = c.meta.get("val") if isinstance(c, fx.Node) else None
        if val is not None and val.numel() == 1:
            return x
    return None


def _norm_internal(na, x: fx.Node) -> set[fx.Node]:
    """Nodes of a norm's computation between its input ``x`` and its output (inclusive)."""
    out, stack = set(), [na.node]
    while stack:
        n = stack.pop()
        if n in out or n is x or n.op in ("get_attr", "placeholder"):
            continue
        out.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return out


def _only_feeds(node: fx.Node, allowed: set[fx.Node]) -> bool:
    return all(
        u in allowed or u.target in _IGNORED or (u.target in _PASS_THROUGH and _only_feeds(u, allowed)) for u in node.users
    )


def _linear_readers(norm_out: fx.Node) -> list[fx.Node]:
    """Linears reading a norm's output through views; anything else reading it is unsupported."""
    found, stack = [], [norm_out]
    while stack:
        n = stack.pop()
        for u in n.users:
            if is_linear(u) and u.args[0] is n:
                found.append(u)
            elif u.target in _IGNORED:
                continue
            elif u.op == "call_function" and u.target in _PASS_THROUGH:
                stack.append(u)
            else:
                raise UnsupportedModelError(
                    f"rotation: norm output {norm_out.name} feeds {u.name} ({u.target}); only Linears can absorb "
                    "the rotation (post-LN models are not supported)"
                )
    return found


def _layer_norm_to_rms(gm: fx.GraphModule, na) -> None:
    """``layer_norm(x, shape, g, b, eps)`` -> ``g * (x * rsqrt(mean(x^2, -1) + eps))`` (g now ones, b folded)."""
    graph, ln = gm.graph, na.node
    args = list(ln.args) + [None] * (5 - len(ln.args))
    x, eps = args[0], args[4] if args[4] is not None else 1e-5
    if len(args[1]) != 1:
        raise UnsupportedModelError(f"rotation: {ln.name} normalizes over {args[1]}, not the last dimension only")
    stack = ln.meta.get("nn_module_stack", {})
    with graph.inserting_before(ln):
        sq = graph.call_function(aten.mul.Tensor, (x, x))
        ms = graph.call_function(aten.mean.dim, (sq, [-1], True))
        ad = graph.call_function(aten.add.Tensor, (ms, float(eps)))
        rs = graph.call_function(aten.rsqrt.default, (ad,))
        y = graph.call_function(aten.mul.Tensor, (x, rs))
        out = graph.call_function(aten.mul.Tensor, (na.weight, y))
    for n in (sq, ms, ad, rs, y, out):
        n.meta["nn_module_stack"] = stack
    ln.replace_all_uses_with(out)
    graph.erase_node(ln)
