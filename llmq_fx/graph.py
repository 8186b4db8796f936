"""Pattern helpers shared by the passes: what a Linear, a norm, an observer site look like.

Everything here reads the graph, never module names: a site's role (``qkv``, ``out_proj``,
``fc1``, ``fc2``) is decided by what the Linear input is connected to, so a new model family is a
new pattern here, not a fork of the passes.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_map

from llmq_fx.spec import SITE_META, SiteRecord
from llmq_fx.stats import ActivationObserver

__all__ = [
    "LINEAR_OPS",
    "VIEW_OPS",
    "CASTS",
    "ObserverSite",
    "NormAffine",
    "is_linear",
    "storage_key",
    "record_outputs",
    "linear_nodes",
    "module_path",
    "attr",
    "set_attr",
    "read_attr",
    "write_attr",
    "moved",
    "on_device",
    "retarget_devices",
    "traced_dtype",
    "share_tensors_copy",
    "compute_device",
    "walk_devices",
    "observer_sites",
    "norm_affine",
    "site_role",
    "attention_output",
    "attention_value_source",
    "gated_up_source",
    "is_skipped",
    "attr_users_elsewhere",
]

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default}
# Ops that move or relabel elements without mixing channels of one token with each other's values.
VIEW_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.slice.Tensor,
    aten.alias.default,
    aten.dropout.default,  # exported in eval mode: identity
}
# Ops that broadcast a head to several heads (grouped-query attention's repeat_kv).
BROADCAST_OPS = {aten.unsqueeze.default, aten.expand.default}
_ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
# What RoPE does to q and k between the projection and attention.
_ROPE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.neg.default, aten.cat.default}
_ACTIVATIONS = {aten.relu.default, aten.gelu.default, aten.silu.default, aten.mul.Tensor}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
CASTS = _CASTS  # dtype casts: value-preserving for the passes that walk through them


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_OPS


def linear_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_linear(n)]


def module_path(node: fx.Node) -> str:
    """Module path of a node in the source model (``model.decoder.layers.3.self_attn.q_proj``)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        # Strict-mode exports spell the root as L['self']; keep only the dotted module path.
        return path.replace("L['self'].", "").replace("L__self___", "")
    if is_linear(node) and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        return node.args[1].target.rsplit(".", 1)[0]
    return node.name


def attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor behind a ``get_attr`` target (parameter or buffer, dotted path)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def compute_device(gm: fx.GraphModule) -> torch.device:
    """Where the passes compute: the device ``quantize(..., device=)`` named (the graph's weights then
    stay where they are and each is moved there when used), else where the graph's parameters are."""
    named = gm.meta.get("llmq_fx", {}).get("device")
    return torch.device(named) if named else next((p.device for p in gm.parameters()), torch.device("cpu"))


def walk_devices(gm: fx.GraphModule) -> list[torch.device]:
    """The devices the sequential walk spreads its calibration batches over (``quantize(..., device=[...])``):
    the compute device first; just it unless several were named."""
    named = gm.meta.get("llmq_fx", {}).get("walk_devices")
    return [torch.device(d) for d in named] if named else [compute_device(gm)]


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor, buffer: bool = True) -> None:
    """Create or replace a buffer/parameter at a dotted path, creating no new submodules."""
    owner, _, name = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if hasattr(mod, name):
        delattr(mod, name)
    if buffer:
        mod.register_buffer(name, value)
    else:
        mod.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def read_attr(gm: fx.GraphModule, target: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A parameter/buffer where the passes compute (``compute_device``), in ``dtype``: moved as stored,
    widened there. The counterpart of ``write_attr``; with the graph on the host and
    ``quantize(..., device=)``, the passes compute on the device one tensor at a time."""
    return moved(attr(gm, target).detach(), compute_device(gm)).to(dtype)


def traced_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype a ``get_attr`` node had when the graph was captured (its ``val``), if recorded."""
    val = node.meta.get("val")
    return getattr(val, "dtype", None) if isinstance(val, torch.Tensor) else None


def retarget_devices(gm: fx.GraphModule, old: str, new: torch.device | str) -> None:
    """Nodes that name a device of type ``old`` (factories, moves and checks traced with it: ``ones(...,
    device=)``, ``aten.to.device(x, device, dtype)``) name ``new`` instead; e.g. a graph captured on the
    meta device runs where its materialized weights are."""
    new = torch.device(new)
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"].type == old:
            node.kwargs = {**node.kwargs, "device": new}
        if any(isinstance(a, torch.device) and a.type == old for a in node.args):
            node.args = tuple(new if isinstance(a, torch.device) and a.type == old else a for a in node.args)
    gm.recompile()


_STAGE_BYTES = 256 * 2**20  # pinned staging buffer per GPU (one, reused): 256 MiB
_STAGE_MIN = 16 * 2**20  # tensors smaller than this move as they are
_stages: dict[torch.device, torch.Tensor] = {}


def _stage(device: torch.device, nbytes: int) -> torch.Tensor:
    """The pinned host buffer (at least ``nbytes``) that copies between the host and ``device`` go through."""
    if device not in _stages or _stages[device].numel() < nbytes:
        _stages[device] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return _stages[device]


def _staged_copy_(dst: torch.Tensor, src: torch.Tensor, gpu: torch.device) -> torch.Tensor:
    """``dst.copy_(src)`` between pageable host memory and ``gpu``, in chunks through the pinned buffer: the
    host side of each chunk is a copy by torch's threads, the device side a DMA at full bus speed.
    Measured on the H200 machine (16 host threads, 6 GiB in 256 MiB tensors): host-to-device 8.4 GB/s
    pageable, 33 GB/s pageable-to-pinned plus 52 GB/s pinned-to-device; device-to-host into fresh pageable
    memory 6.9 GB/s zeroed first, 10.4 GB/s through the buffer. Each DMA is synchronous, so the buffer
    is free again when the next chunk is staged."""
    chunk = min(_STAGE_BYTES, src.nbytes)
    stage = _stage(gpu, chunk)
    flat_dst, flat_src = dst.view(-1).view(torch.uint8), src.view(-1).view(torch.uint8)
    with torch.cuda.device(gpu):
        for lo in range(0, flat_src.numel(), chunk):
            hi = min(lo + chunk, flat_src.numel())
            buf = stage[: hi - lo]
            buf.copy_(flat_src[lo:hi])
            flat_dst[lo:hi].copy_(buf)
    return dst


def moved(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``; between the host and a GPU, through a pinned staging buffer (``_staged_copy_``)
    for tensors of 16 MiB and more: the passes move a host-stored graph's weights to the device and back
    one at a time, and a pageable copy runs at a fraction of the bus (a device-to-host copy into fresh
    pageable memory faults its pages in one thread as it goes: 1.4 GB/s on the H200 machine)."""
    device = torch.device(device)
    if t.device == device or t.device.type == device.type == "cpu":
        return t
    if {t.device.type, device.type} != {"cpu", "cuda"} or t.nbytes < _STAGE_MIN:
        return t.to(device)
    gpu = device if device.type == "cuda" else t.device
    if gpu.index is None:
        gpu = torch.device("cuda", torch.cuda.current_device())
    src = t.contiguous()
    return _staged_copy_(torch.empty(src.shape, dtype=src.dtype, device=device), src, gpu)


def write_attr(gm: fx.GraphModule, target: str, value: torch.Tensor, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> None:
    """Give a parameter/buffer a new value computed elsewhere (e.g. float64 on the compute device):
    narrowed to the tensor's dtype where it was computed, then moved to where the tensor lives.

    The tensor is replaced, not written into: every name bound to it in ``gm`` (tied weights) gets the
    new one, and a graph that shares its tensors with another (``quantize()``'s copy shares the
    input graph's) leaves the other's untouched. ``dtype``, ``device``: store it in that dtype, on that
    device, instead of the tensor's own (``device`` materializes a graph captured on the meta device)."""
    old = attr(gm, target)
    data = moved(value.to(dtype or old.dtype), device or old.device).reshape(old.shape).contiguous()
    new = torch.nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else data
    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is old:
                    store[name] = new
        for name, t in list(vars(mod).items()):
            if t is old:  # a constant held as a plain attribute
                setattr(mod, name, new)


def share_tensors_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (graph, submodules, meta) whose parameters and buffers are ``gm``'s own
    tensors: the passes replace tensors (``write_attr``, ``set_attr``) rather than write into them, so
    the copy costs no second copy of the weights and ``gm`` stays as it was."""
    memo = {}
    for mod in gm.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                memo[id(t)] = t
        for t in vars(mod).values():
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t
    return copy.deepcopy(gm, memo)


def storage_key(t: torch.Tensor):
    """What two names of one tied tensor share: where its data starts, or the tensor itself on the meta
    device (no storage there)."""
    return id(t) if t.device.type == "meta" else t.data_ptr()


def on_device(args: tuple, kwargs: dict, to: torch.device) -> tuple[tuple, dict]:
    """An op's fetched arguments made to run on ``to`` when the graph lives elsewhere: every tensor moved
    there (weights, and tensors that factories traced with the graph's device made), and a device argument
    (a factory's ``device=``, ``aten.to.device``'s positional one) retargeted to ``to``. The one rule the
    sequential walk (``lockstep``) and ``record_outputs`` follow for a graph stored off the compute device."""
    args, kwargs = tree_map(lambda v: moved(v, to) if isinstance(v, torch.Tensor) and v.device != to else v,
                            (args, kwargs))
    args = tuple(to if isinstance(a, torch.device) else a for a in args)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": to}
    return args, kwargs


def record_outputs(gm: fx.GraphModule, batches, watch: dict) -> None:
    """Run ``gm`` on each batch (moved to ``compute_device``), calling ``watch[node](output)`` with the
    output of each watched node as it is computed (no graph change, no hook left behind).

    A weight stored elsewhere than the compute device (``quantize(..., device=)`` with the graph on the
    host), or narrower than it was captured, is moved and widened for each op that reads it and dropped
    after: the device holds one op's weights, not the model, as in the sequential walk (``lockstep``).
    Tensors that the graph's own factories make where it was captured join the compute device the same
    way (``on_device``)."""
    device = compute_device(gm)
    offloaded = any(p.device != device for p in gm.parameters())

    def widened(n: fx.Node, value: object) -> object:
        if n.op != "get_attr" or not isinstance(value, torch.Tensor):
            return value
        want = traced_dtype(n)
        return value.to(want) if want is not None and value.is_floating_point() and value.dtype != want else value

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n.op == "get_attr":  # where it is stored; placed by each reader (``call_function`` below)
                return self.fetch_attr(n.target)
            if n.op == "call_function":
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                if offloaded:
                    args, kwargs = on_device(args, kwargs, device)
                args = tuple(_place_args(n.args, args, widened))
                kwargs = {k: _place_args([n.kwargs[k]], [v], widened)[0] for k, v in kwargs.items()}
                with self._set_current_node(n):
                    out = n.target(*args, **kwargs)
            else:
                out = super().run_node(n)
            if n in watch:
                watch[n](out.detach())
            return out

    with torch.no_grad():
        for batch in batches:
            Recorder(gm).run(batch.to(device))


def _place_args(nodes, values, placed) -> list:
    """``values`` (an op's arguments as fetched) with each one that a ``get_attr`` node gave placed."""
    out = []
    for n, v in zip(nodes, values):
        if isinstance(n, fx.Node):
            out.append(placed(n, v))
        elif isinstance(n, (list, tuple)) and isinstance(v, (list, tuple)):
            out.append(type(v)(_place_args(n, v, placed)))
        else:
            out.append(v)
    return out


def attr_users_elsewhere(gm: fx.GraphModule, get_attr_node: fx.Node, allowed: fx.Node) -> list[str]:
    """Other users of a parameter: graph users besides ``allowed`` and other names for the same tensor.

    Tied weights (OPT's embedding and lm_head) show up either as one get_attr node with several users
    or as two attribute names sharing storage; folding a scale into either would corrupt the other.
    """
    others = [u.name for u in get_attr_node.users if u is not allowed]
    tensor = attr(gm, get_attr_node.target)
    key = storage_key(tensor)
    # One walk over the modules' own tables (named_parameters/named_buffers would walk them twice and
    # name every tensor: RotatePass asks this for every weight; 2.7 s of a profiled opt-6.7b host rotation).
    for prefix, module in gm.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for leaf, p in store.items():
                if p is None or not p.numel() or storage_key(p) != key:
                    continue
                name = f"{prefix}.{leaf}" if prefix else leaf
                if name != get_attr_node.target:
                    others.append(name)
    return others


def is_skipped(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, f"*.{p}") for p in patterns)


@dataclass
class ObserverSite:
    """One activation site: an observer node, its producer, the Linears it feeds and its ``SiteRecord``."""

    observer: fx.Node
    producer: fx.Node
    consumers: list[fx.Node]
    module: ActivationObserver
    record: SiteRecord

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def role(self) -> str:
        return self.record.role


def observer_sites(gm: fx.GraphModule) -> list[ObserverSite]:
    """All observer sites in graph order (the observer pass must have run)."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, ActivationObserver):
            continue
        consumers = [u for u in node.users if is_linear(u)]
        record = node.meta.get(SITE_META)
        if record is None:  # an observer inserted by hand: a record from what the graph says
            record = node.meta[SITE_META] = SiteRecord(node.target, [module_path(c) for c in consumers])
        sites.append(ObserverSite(node, node.args[0], consumers, mod, record))
    return sites


def _through_views(node: fx.Node, broadcast: bool = False) -> fx.Node:
    """Walk up through view-like ops and casts (and head broadcasts) to the node that produced the values."""
    ops = VIEW_OPS | _CASTS | (BROADCAST_OPS if broadcast else set())
    while node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node


@dataclass
class NormAffine:
    """The affine part of a normalization: ``y = normalized(x) * (weight + offset) (+ bias)``.

    ``offset`` is 0 for LayerNorm and Llama's RMSNorm, 1 for Gemma's (``x * (1 + weight)``); ``scale``
    is the node the normalized value is multiplied by (``weight`` itself, or the ``weight + offset`` node).
    """

    node: fx.Node
    weight: fx.Node  # get_attr
    bias: fx.Node | None  # get_attr, or None (RMSNorm)
    kind: str  # "layer_norm" | "rms_norm"
    offset: float = 0.0
    scale: fx.Node | None = None

    def __post_init__(self):
        if self.scale is None:
            self.scale = self.weight


def _norm_weight(node) -> tuple[fx.Node, float] | None:
    """``(get_attr, offset)`` when ``node`` is a parameter, or a parameter (through casts) plus a constant."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node, 0.0
    if node.op == "call_function" and node.target == aten.add.Tensor and len(node.args) == 2:
        a, b = node.args
        for w, c in ((a, b), (b, a)):
            if isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(w, fx.Node):
                while w.op == "call_function" and w.target in _CASTS:
                    w = w.args[0]
                if w.op == "get_attr":
                    return w, float(c)
    return None


def norm_affine(node: fx.Node) -> NormAffine | None:
    """Match a normalization whose per-channel weight (and bias) can absorb a scale.

    * LayerNorm: one ``aten.layer_norm`` node with ``get_attr`` weight and bias.
    * RMSNorm as ``torch.export`` decomposes it (Llama): ``mul(weight, x * rsqrt(mean(x^2) + eps))``,
      the weight multiplied in last; or by ``weight + c`` (Gemma's ``1 + weight``: ``offset`` c).
    """
    if node.op != "call_function":
        return None
    if node.target == aten.layer_norm.default:
        args = list(node.args) + [None] * 4
        w, b = args[2], args[3]
        if isinstance(w, fx.Node) and w.op == "get_attr" and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
            return NormAffine(node, w, b, "layer_norm")
        return None
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        a, b = node.args
        for w, other in ((a, b), (b, a)):
            found = _norm_weight(w)
            if found is not None and isinstance(other, fx.Node):
                src = _through_views(other)
                if src.op == "call_function" and src.target == aten.mul.Tensor and any(
                    isinstance(x, fx.Node) and x.op == "call_function" and x.target == aten.rsqrt.default for x in src.args
                ):
                    return NormAffine(node, found[0], None, "rms_norm", offset=found[1], scale=w)
    return None


def _feeds_attention(node: fx.Node, depth: int = 10) -> bool:
    """Whether a Linear's output reaches an attention op's q/k/v input through views, RoPE and head repeats."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op != "call_function":
                    continue
                if u.target in _ATTENTION_OPS:
                    return True
                if u.target in VIEW_OPS or u.target in _CASTS or u.target in BROADCAST_OPS or u.target in _ROPE_OPS:
                    nxt.append(u)
        frontier = nxt
    return False


def attention_output(node: fx.Node) -> fx.Node | None:
    """The attention node whose output ``node`` is (through views), or None."""
    attn = _through_views(node)
    return attn if attn.op == "call_function" and attn.target in _ATTENTION_OPS else None


def _narrows_channels(node: fx.Node) -> bool:
    """Whether an ``aten.slice`` keeps only part of its input's last dimension (a full slice is a view)."""
    args = list(node.args) + [0, None, None][len(node.args) - 1:]
    src, dim, start, end = node.args[0], args[1], args[2], args[3]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if val is None:
        return True
    if dim % val.dim() != val.dim() - 1:
        return False
    size = val.shape[-1]
    return bool((start or 0) != 0 or (end is not None and end < size))


def attention_value_source(node: fx.Node) -> tuple[fx.Node, fx.Node, slice] | None:
    """If ``node`` is an attention output, return ``(attention node, v_proj linear, rows)``.

    ``rows`` are the Linear's output rows that are V: all of them for a plain v_proj, V's part of a
    fused projection whose output V is sliced from (Phi-3's ``qkv_proj``).
    """
    attn = attention_output(node)
    if attn is None:
        return None
    value, rows = attn.args[2], None
    ops = VIEW_OPS | _CASTS | BROADCAST_OPS
    while value.op == "call_function" and value.target in ops:
        if value.target == aten.slice.Tensor and _narrows_channels(value):
            src = value.args[0]
            if rows is not None or not is_linear(src) or (len(value.args) > 4 and value.args[4] not in (None, 1)):
                return None  # a narrowing slice that does not pick whole output rows of the Linear itself
            size = src.meta["val"].shape[-1]
            start = value.args[2] if len(value.args) > 2 and value.args[2] is not None else 0
            end = value.args[3] if len(value.args) > 3 and value.args[3] is not None else size
            rows = slice(int(start) % size, min(int(end), size))
        value = value.args[0]
    if not is_linear(value):
        return None
    return attn, value, rows if rows is not None else slice(0, value.meta["val"].shape[-1])


def site_role(producer: fx.Node, consumers: list[fx.Node]) -> str:
    """Role of an activation site, from the graph around it."""
    if any(_feeds_attention(c) for c in consumers):
        return "qkv"
    if attention_output(producer) is not None:
        return "out_proj"
    while producer.meta.get("llmq_online_rotation"):  # an online rotation (RotatePass) keeps the role
        producer = producer.args[0]
    src = _through_views(producer)
    if norm_affine(src) is not None:
        if all(any(u.op == "call_function" and u.target in _ACTIVATIONS for u in c.users) for c in consumers):
            return "fc1"
        return "other"  # e.g. final norm -> lm_head
    if src.op == "call_function" and src.target in _ACTIVATIONS:
        return "fc2"
    return "other"


def gated_up_source(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Match a gated MLP's down_proj input ``act(gate(x)) * up(x)``; return ``(mul node, up linear)``.

    The up projection is the Linear operand of the product; the other operand is an activation of
    another Linear (the gate).
    """
    if node.op != "call_function" or node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    a, b = node.args
    for act, up in ((a, b), (b, a)):
        if (
            isinstance(act, fx.Node) and act.op == "call_function" and act.target in _ACTIVATIONS - {aten.mul.Tensor}
            and is_linear(act.args[0]) and isinstance(up, fx.Node) and is_linear(up)
        ):
            return node, up
    return None
