"""Run an observed graph over every calibration batch up to each observer in turn, in two lanes.

Sequential weight quantization (``SequentialGPTQPass``) needs, at each observer site, the inputs
the *already quantized* upstream model gives that site, over all calibration batches, before it can
quantize the site's Linears, and the quantized model's inputs to the next site depend on that
result. Running the whole model once per site would cost a forward pass per site. Instead
``run_lockstep`` keeps every batch's state at a point of the graph (a *checkpoint*: the values
computed before that point that a node after it still reads) and, for the next observer, runs each
batch from the checkpoint up to the observer and hands the callback the producer's value per batch.
Whatever the callback rewrites downstream (new weight nodes inserted before the consumers) is what
the walk runs next.

Two lanes are kept per batch:

* ``ref``: the float model (the graph as captured, weights and activations unquantized);
* ``quant``: the model as it will be deployed so far (quantized weights, quantized activations at
  the sites already visited).

A value that is the same in both lanes (everything upstream of the first site, the attention mask,
position ids, parameters) is computed once and shared. Values are dropped as soon as every node that
reads them has run.

**Memory.** The site's inputs over all batches are the states at the site; keeping them is what makes
the walk cost one forward per lane. ``budget`` caps the bytes of activations kept across batches:
while the states at a site fit it (measured on the first batch), they become the new checkpoint and
the callback's later passes read them from memory; where they do not (an fc2 input four times the
hidden width), the checkpoint stays where it was (a narrower point, typically the previous site) and
each pass over the site's inputs recomputes them batch by batch from there. The result is the same
either way (the same operations on the same values); a smaller budget costs recomputation, not
accuracy. ``budget=None``: no cap.

**Weights.** Weights are fetched when a node first reads them, not where their ``get_attr`` nodes
stand (a captured graph lists them all at its top), moved to the compute device
(``graph.compute_device``) and freed once the checkpoint has passed their last reader: with the graph
on the host and ``quantize(..., device="cuda")``, the device holds the layer being walked, not the
model. With ``dtype`` (``calib_dtype``, bfloat16) the Linears and attention run in that dtype, as under
autocast: their inputs are cast, their outputs and the elementwise ops after them (activation
functions, gates; the sites' inputs) stay in it, and what meets a float32 tensor (the residual stream,
norms, positions) stays float32.

**Several devices.** With ``quantize(..., device=["cuda:0", "cuda:1"])`` (``graph.walk_devices``) batch
``b`` is walked on device ``b mod n``: its states stay there, and each device fetches its own copy of
the layer's weights. The batches are independent, so the devices compute side by side (CUDA queues
work without waiting for the host), each holding ``1/n`` of the states; the callback receives each
batch's inputs where they are (GPTQ reduces its moments per device and adds the sums on the compute
device, the first one). The budget is per device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from llmq_fx.errors import CalibrationError, DeviceMemoryError, UnsupportedModelError
from llmq_fx.graph import ObserverSite, compute_device, is_linear, moved, on_device, observer_sites, traced_dtype, walk_devices

__all__ = ["SiteInputs", "SiteResult", "run_lockstep"]

_aten = torch.ops.aten
_PRODUCTS = {_aten.scaled_dot_product_attention.default, _aten.matmul.default, _aten.mm.default, _aten.bmm.default,
             _aten.addmm.default, _aten.baddbmm.default, _aten.einsum.default}

Env = dict[fx.Node, object]


class SiteInputs:
    """What a site callback gets: the site, and its producer's value per batch in each lane.

    Iterating yields ``(ref, quant)`` per batch, in batch order; it may be iterated more than once
    (each pass reads the values from memory or recomputes them, see the module docstring), so a
    callback should keep what it accumulates, not the tensors.
    """

    def __init__(self, site: ObserverSite, stream: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], n: int):
        self.site = site
        self._stream = stream
        self._n = n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._stream()

    def __len__(self) -> int:
        return self._n


@dataclass
class SiteResult:
    """What a site callback returns.

    Attributes:
        transform: the observer's output in the quantized lane as a function of the producer's value
            there (what the quantized Linears read, e.g. the activation QDQ); None: the producer's value.
        ref_overrides: value to use in the float lane for nodes the callback inserted whose
            quantized-lane value differs (a dequantized weight -> the float weight it replaced).
        raw_readers: consumers that read the producer's raw value in the quantized lane (skipped
            Linears), not the callback's ``transform``.
    """

    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ref_overrides: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    raw_readers: list[fx.Node] = field(default_factory=list)


def _tensors(env: Env) -> dict[int, int]:
    """Distinct storages of an environment's tensors -> bytes."""
    out = {}
    for value in tree_leaves(list(env.values())):
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            out[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return out


def run_lockstep(
    gm: fx.GraphModule, batches: list[torch.Tensor], on_site: Callable[[SiteInputs], SiteResult], progress: bool = True,
    dtype: torch.dtype = torch.float32, budget: int | None = None,
) -> dict:
    """Evaluate ``gm`` on ``batches`` up to each observer in turn, calling ``on_site`` at each observer.

    The graph must take token ids as its only input. ``on_site`` may insert nodes into the graph
    after the observer (before its consumers); they are evaluated when the walk reaches them. The
    float lane's observer output is the producer's value; the observer module itself is not called.
    Nodes after the last observer (the logits) are not evaluated. ``budget``: the most bytes of
    activations kept across batches (None: no cap), see the module docstring.

    Returns ``{"peak_weight_bytes", "peak_state_bytes", "recomputed_sites"}``: the most bytes of weights
    (fetched parameters and the float weights the float lane keeps for quantized Linears) held on one
    device at once, the most bytes of activation states kept across batches (all devices), and how many
    sites read their inputs by recomputation.
    """
    sites = {s.observer: s for s in observer_sites(gm)}
    if not sites:
        raise CalibrationError("graph has no observers: run InsertObserversPass before sequential calibration")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"sequential calibration runs graphs with one input (token ids); this one has {len(placeholders)}: "
            + ", ".join(n.name for n in placeholders)
        )
    device = compute_device(gm)
    devices = walk_devices(gm)  # batch b is walked on devices[b % len(devices)]
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    offloaded = len(devices) > 1 or any(p.device != device for p in gm.parameters())

    def place(value: object, to: torch.device = device) -> object:
        """A weight or batch on a walk device."""
        return moved(value, to) if isinstance(value, torch.Tensor) and value.device != to else value

    def low(value: object) -> object:
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def run(node: fx.Node, to: torch.device) -> object:
        product = dtype != torch.float32 and (is_linear(node) or node.target in _PRODUCTS)
        if node.op != "call_function" or not (offloaded or product):
            return interp.run_node(node)
        args, kwargs = interp.fetch_args_kwargs_from_env(node)
        if offloaded:
            # The graph lives elsewhere: tensors a node made there (factories traced with that device,
            # or with none) join the batch's walk device, and factories make theirs on it.
            args, kwargs = on_device(args, kwargs, to)
        if product and (is_linear(node) or dtype in {a.dtype for a in tree_leaves((args, kwargs))
                                                    if isinstance(a, torch.Tensor) and a.is_floating_point()}):
            # A Linear, or a product that meets the lanes' dtype (attention, an online rotation), runs in
            # that dtype with its float inputs cast (the weight once per batch, as autocast does); a
            # product of float32 values only (rotary angles from positions) stays float32.
            args, kwargs = tree_map(low, (args, kwargs))
        return node.target(*args, **kwargs)

    # Walk state: per batch, the values at its checkpoint (`start`: the first node not evaluated yet).
    ref: list[Env] = [{} for _ in batches]
    quant: list[Env] = [{} for _ in batches]
    # Per walk device: fetched get_attr values (shared by lanes and that device's batches), and the float
    # lane's value of a node the callbacks inserted.
    weights: list[dict[fx.Node, torch.Tensor]] = [{} for _ in devices]
    ref_overrides: list[dict[fx.Node, torch.Tensor]] = [{} for _ in devices]
    transforms: dict[fx.Node, Callable | None] = {}  # visited observer -> its quantized-lane function
    raw_of: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # skipped consumer -> (observer, producer)
    extra_users: dict[fx.Node, set[fx.Node]] = {}  # producer -> skipped consumers that still read it
    stats = {"peak_weight_bytes": 0, "peak_state_bytes": 0, "recomputed_sites": 0}
    current: list[fx.Node | None] = [None]
    pos: dict[fx.Node, int] = {}
    last_use: dict[fx.Node, int] = {}

    def index() -> None:
        """Positions and each value's last reader, after the graph changed."""
        pos.clear()
        pos.update((n, i) for i, n in enumerate(gm.graph.nodes))
        last_use.clear()
        for n in gm.graph.nodes:
            readers = list(n.users) + list(extra_users.get(n, ()))
            last_use[n] = max((pos[u] for u in readers), default=pos[n])

    def note_weights() -> None:
        held = max(sum(w.nbytes for w in weights[k].values()) + sum(w.nbytes for w in ref_overrides[k].values())
                   for k in range(len(devices)))  # on one device
        stats["peak_weight_bytes"] = max(stats["peak_weight_bytes"], held)

    def note_states(nbytes: int) -> None:
        stats["peak_state_bytes"] = max(stats["peak_state_bytes"], nbytes)

    def fetch(node: fx.Node, k: int) -> None:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in weights[k]:
                value = place(interp.fetch_attr(arg.target), devices[k])
                want = traced_dtype(arg)  # weights stored narrower than captured (bfloat16 on the host) compute as captured
                if want is not None and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != want:
                    value = value.to(want)
                weights[k][arg] = value
                note_weights()

    def evaluate(node: fx.Node, env: Env, lane_ref: bool, k: int) -> object:
        if node in sites:  # a visited observer: the producer in the float lane, its transform in the other
            producer = node.args[0]
            fn = transforms.get(node)
            return env[producer] if lane_ref or fn is None else fn(env[producer])
        if lane_ref and node in ref_overrides[k]:
            return ref_overrides[k][node]
        interp.env = env
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        for a in attrs:
            env[a] = weights[k][a]
        swapped = None
        if not lane_ref and node in raw_of:  # a skipped Linear reads the raw producer, not the observer's QDQ
            obs, producer = raw_of[node]
            swapped = env[obs]
            env[obs] = env[producer]
        try:
            return run(node, devices[k])
        finally:
            if swapped is not None:
                env[raw_of[node][0]] = swapped
            for a in attrs:
                env.pop(a, None)

    def advance(b: int, stop: fx.Node) -> tuple[Env, Env]:
        """Batch ``b``'s two lanes evaluated from its checkpoint up to ``stop`` (exclusive): new environments."""
        r, q = dict(ref[b]), dict(quant[b])
        k = b % len(devices)
        node = start[b]
        while node is not stop:
            current[0] = node
            if node.op == "placeholder":
                r[node] = q[node] = batches[b].to(devices[k])
            elif node.op == "get_attr":
                pass  # fetched when a node first reads it
            elif node.op == "output":
                raise CalibrationError(f"the walk passed the graph's output before observer {stop.name}")
            else:
                fetch(node, k)
                shared = (node not in sites and node not in ref_overrides[k] and node not in raw_of
                          and all(a.op == "get_attr" or r[a] is q[a] for a in node.all_input_nodes))
                if shared:
                    r[node] = q[node] = evaluate(node, q, False, k)
                else:
                    r[node] = evaluate(node, r, True, k)
                    q[node] = evaluate(node, q, False, k)
            here = pos[node]
            for arg in [*node.all_input_nodes, node]:
                if arg.op != "get_attr" and last_use[arg] <= here:
                    r.pop(arg, None)
                    q.pop(arg, None)
            node = node.next
        current[0] = stop  # what follows (the callback's work) is the site's
        return r, q

    def release_weights() -> None:
        """Weights and float-lane overrides whose every reader lies before every batch's checkpoint."""
        here = min(pos[n] for n in start)
        for store in (*weights, *ref_overrides):
            for n in [n for n in store if last_use[n] < here and pos[n] < here]:
                del store[n]

    def state_bytes() -> int:
        seen: dict[int, int] = {}
        for env in ref + quant:
            seen.update(_tensors(env))
        return sum(seen.values())

    checked: list[bool] = []

    def preflight(per_batch: int) -> None:
        """At the first site, before anything is quantized: does the device hold the least the walk needs,
        the largest layer's weights plus every batch's states at a site in two lanes? One line if not."""
        checked.append(True)
        layer, needed = _largest_layer(gm)
        needed = needed if offloaded else 0  # a graph on the device holds its weights there already
        for k, on in enumerate(devices):
            free = _free_device_bytes(on)
            if free is None:
                continue
            count = len(range(k, len(batches), len(devices)))  # the batches walked on this device
            states = 2 * per_batch * count
            if needed + states > free:
                held = f"{layer} needs {needed / 2**30:.2f} GiB of weights and " if offloaded else ""
                raise DeviceMemoryError(
                    f"not enough device memory for the sequential walk: {held}the {count} calibration batches' "
                    f"states at a site need {states / 2**30:.2f} GiB (two lanes), {free / 2**30:.2f} GiB free on {on}: "
                    "calibrate on fewer or shorter sequences, or on a larger device"
                )

    first = next(iter(gm.graph.nodes))
    start: list[fx.Node] = [first for _ in batches]  # each batch's checkpoint: its first node not evaluated

    def stream_for(site: ObserverSite) -> tuple[Callable[[], Iterator], Callable[[], bool]]:
        """The site's inputs per batch. When the states at the site fit the budget (estimated on the first
        batch computed), each batch computed moves its checkpoint to the site, so later passes read them
        from memory; otherwise every pass recomputes them from the checkpoints."""
        stop = site.observer
        keep: list[bool | None] = [None]  # undecided until a batch is computed

        def one_pass() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in range(len(batches)):
                if start[b] is stop:
                    yield ref[b][site.producer], quant[b][site.producer]
                    continue
                r, q = advance(b, stop)
                if keep[0] is None:
                    per_batch = sum((_tensors(r) | _tensors(q)).values())
                    if not checked:
                        preflight(per_batch)
                    keep[0] = budget is None or per_batch * -(-len(batches) // len(devices)) <= budget  # per device
                if keep[0]:
                    ref[b], quant[b], start[b] = r, q, stop
                    note_states(state_bytes() if budget is not None or b == len(batches) - 1 else 0)
                yield r[site.producer], q[site.producer]
                del r, q

        def settle() -> bool:
            """After the callback: finish a move it left halfway; True when the site was recomputed."""
            if keep[0] is None:
                return False
            if keep[0]:
                for b in range(len(batches)):
                    if start[b] is not stop:
                        ref[b], quant[b] = advance(b, stop)
                        start[b] = stop
                note_states(state_bytes())
                release_weights()
            return not keep[0]

        return one_pass, settle

    index()
    bar = tqdm(total=len(sites), desc="sequential", unit="site", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for observer, site in sites.items():
                current[0] = observer
                stream, settle = stream_for(site)
                result = on_site(SiteInputs(site, stream, len(batches)))
                transforms[observer] = result.transform
                for node, v in result.ref_overrides.items():
                    for k, on in enumerate(devices):
                        ref_overrides[k][node] = place(v, on)
                for reader in result.raw_readers:
                    raw_of[reader] = (observer, site.producer)
                    extra_users.setdefault(site.producer, set()).add(reader)
                note_weights()
                index()
                stats["recomputed_sites"] += settle()
                bar.update(1)
        return stats
    except torch.OutOfMemoryError as err:
        raise out_of_memory(err, current[0], len(batches)) from None
    finally:
        bar.close()
        interp.env = {}


def _free_device_bytes(device: torch.device) -> int | None:
    """Bytes the walk can still allocate on ``device`` (free plus what PyTorch holds unused); None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _largest_layer(gm: fx.GraphModule) -> tuple[str, int]:
    """The module (``...layers.N``) whose parameters and buffers take the most bytes, and those bytes; the
    largest single tensor where the graph has no numbered layers."""
    sizes: dict[str, int] = {}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        found = re.match(r"(.*?(?:layers?|blocks?|h)\.\d+)\.", name)
        key = found.group(1) if found else name
        sizes[key] = sizes.get(key, 0) + t.nbytes
    if not sizes:
        return "the graph", 0
    key = max(sizes, key=sizes.get)
    return key, sizes[key]


def out_of_memory(err: BaseException, node: fx.Node | None, batches: int) -> DeviceMemoryError:
    """One line: where the walk ran out of device memory, what was asked, what is free, what to change."""
    from llmq_fx.graph import module_path

    where = "before the first node" if node is None else f"at node {node.name}" + (
        f" ({module_path(node)})" if node.meta.get("nn_module_stack") else "")
    found = re.search(r"Tried to allocate ([\d.]+ ?[KMGT]?i?B)", str(err))
    asked = f"asked {found.group(1)}" if found else (str(err).splitlines() or ["out of memory"])[0][:120]
    free = ""
    if torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        free = f"; {free_b / 2**30:.1f} GiB free of {total_b / 2**30:.1f} GiB"
    return DeviceMemoryError(
        f"out of device memory {where} ({asked}{free}) while {batches} calibration batches are held in two lanes: "
        "calibrate on fewer or shorter sequences, or on a larger device"
    )

