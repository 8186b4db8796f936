"""Run an observed graph over every calibration batch one node at a time, in two lanes.

Sequential weight quantization (``SequentialGPTQPass``) needs, at each observer site, the inputs
the *already quantized* upstream model gives that site, over all calibration batches, before it can
quantize the site's Linears, and the quantized model's inputs to the next site depend on that
result. Running the whole model once per site would cost a forward pass per site. Instead
``run_lockstep`` walks the graph's nodes in order and evaluates each node for every batch before
moving on, so at an observer node all batches' inputs are at hand, and whatever the site callback
rewrites downstream (new weight nodes inserted before the consumers) is what the next nodes run.

Two lanes are kept per batch:

* ``ref``: the float model (the graph as captured, weights and activations unquantized);
* ``quant``: the model as it will be deployed so far (quantized weights, quantized activations at
  the sites already visited).

A value that is the same in both lanes (everything upstream of the first site, the attention mask,
position ids, parameters) is computed once and shared. Values are dropped as soon as every user of
their node has run, so memory is the live set of the graph times the number of batches, as in a
layer-by-layer GPTQ that keeps every calibration sequence's hidden state.

Weights are fetched when a node first reads them, not where their ``get_attr`` nodes stand (a
captured graph lists them all at its top), moved to the compute device (``graph.compute_device``)
and freed after their last reader: with the graph on the host and ``quantize(..., device="cuda")``,
the device holds the layer being walked, not the model. With ``dtype`` (``calib_dtype``, bfloat16)
the Linears and attention run in that dtype, as under autocast: their inputs are cast, their outputs
and the elementwise ops after them (activation functions, gates; the sites' inputs) stay in it, and
what meets a float32 tensor (the residual stream, norms, positions) stays float32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from llmq_fx.errors import CalibrationError, DeviceMemoryError, UnsupportedModelError
from llmq_fx.graph import ObserverSite, compute_device, is_linear, observer_sites

__all__ = ["SiteInputs", "SiteResult", "run_lockstep"]

_aten = torch.ops.aten
_PRODUCTS = {_aten.scaled_dot_product_attention.default, _aten.matmul.default, _aten.mm.default, _aten.bmm.default,
             _aten.addmm.default, _aten.baddbmm.default, _aten.einsum.default}


@dataclass
class SiteInputs:
    """What a site callback gets: the site and its producer's value per batch in each lane."""

    site: ObserverSite
    ref: list[torch.Tensor]
    quant: list[torch.Tensor]


@dataclass
class SiteResult:
    """What a site callback returns.

    Attributes:
        quant: the observer's output per batch in the quantized lane (what the quantized Linears
            read, e.g. the activation QDQ of the producer).
        ref_overrides: value to use in the float lane for nodes the callback inserted whose
            quantized-lane value differs (a dequantized weight -> the float weight it replaced).
        raw_readers: consumers that read the producer's raw value in the quantized lane (skipped
            Linears), not the callback's ``quant``.
    """

    quant: list[torch.Tensor]
    ref_overrides: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    raw_readers: list[fx.Node] = field(default_factory=list)


def run_lockstep(
    gm: fx.GraphModule, batches: list[torch.Tensor], on_site: Callable[[SiteInputs], SiteResult], progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Evaluate ``gm`` on ``batches`` node by node up to its last observer, calling ``on_site`` at each observer.

    The graph must take token ids as its only input. ``on_site`` may insert nodes into the graph
    after the observer (before its consumers); they are evaluated when the walk reaches them. The
    float lane's observer output is the producer's value; the observer module itself is not called.
    Nodes after the last observer (the logits) are not evaluated.

    Returns ``{"peak_weight_bytes": ...}``: the most bytes of weights (fetched parameters and the
    float weights the float lane keeps for quantized Linears) held on the compute device at once.
    """
    sites = {s.observer: s for s in observer_sites(gm)}
    if not sites:
        raise CalibrationError("graph has no observers: run InsertObserversPass before sequential calibration")
    last = list(sites)[-1]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"sequential calibration runs graphs with one input (token ids); this one has {len(placeholders)}: "
            + ", ".join(n.name for n in placeholders)
        )
    device = compute_device(gm)
    interp = fx.Interpreter(gm, garbage_collect_values=False)

    offloaded = any(p.device != device for p in gm.parameters())

    def place(value: object) -> object:
        """A weight or batch on the compute device."""
        return value.to(device) if isinstance(value, torch.Tensor) and value.device != device else value

    def low(value: object) -> object:
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def run(node: fx.Node) -> object:
        product = dtype != torch.float32 and (is_linear(node) or node.target in _PRODUCTS)
        if node.op != "call_function" or not (offloaded or product):
            return interp.run_node(node)
        args, kwargs = interp.fetch_args_kwargs_from_env(node)
        if offloaded:
            # The graph lives elsewhere: tensors a node made there (factories traced with that device,
            # or with none) join the walk's device, and factories make theirs on it.
            args, kwargs = tree_map(place, (args, kwargs))
            if "device" in kwargs:
                kwargs = {**kwargs, "device": device}
        if product and (is_linear(node) or dtype in {a.dtype for a in tree_leaves((args, kwargs))
                                                    if isinstance(a, torch.Tensor) and a.is_floating_point()}):
            # A Linear, or a product that meets the lanes' dtype (attention, an online rotation), runs in
            # that dtype with its float inputs cast (the weight once per batch, as autocast does); a
            # product of float32 values only (rotary angles from positions) stays float32.
            args, kwargs = tree_map(low, (args, kwargs))
        return node.target(*args, **kwargs)

    ref: list[dict[fx.Node, object]] = [{} for _ in batches]
    quant: list[dict[fx.Node, object]] = [{} for _ in batches]
    ref_overrides: dict[fx.Node, torch.Tensor] = {}
    raw_of: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # skipped consumer -> (observer, producer)
    extra_users: dict[fx.Node, set[fx.Node]] = {}  # producer -> skipped consumers that still read it
    done: set[fx.Node] = set()
    held: dict[fx.Node, int] = {}  # weights on the device now -> bytes
    peak = [0]

    def hold(node: fx.Node, value: torch.Tensor) -> None:
        held[node] = value.nbytes
        peak[0] = max(peak[0], sum(held.values()))

    def evaluate(node: fx.Node, env: dict) -> object:
        interp.env = env
        if node in raw_of:  # a skipped Linear reads the raw producer, not the observer's QDQ
            obs, producer = raw_of[node]
            kept = env[obs]
            env[obs] = env[producer]
            try:
                return run(node)
            finally:
                env[obs] = kept
        return run(node)

    def fetch_weights(node: fx.Node) -> None:
        """The ``get_attr`` inputs of ``node`` not yet on the device: moved there once, shared by both lanes."""
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in quant[0]:
                value = place(interp.fetch_attr(arg.target))
                hold(arg, value)
                for b in range(len(batches)):
                    ref[b][arg] = quant[b][arg] = value

    def release(node: fx.Node) -> None:
        for arg in list(node.all_input_nodes) + ([raw_of[node][1]] if node in raw_of else []):
            if arg in done and all(u in done for u in list(arg.users) + list(extra_users.get(arg, ()))):
                for b in range(len(batches)):
                    ref[b].pop(arg, None)
                    quant[b].pop(arg, None)
                held.pop(arg, None)

    current: list[fx.Node | None] = [None]

    def _walk(node: fx.Node) -> None:
        with torch.no_grad():
            while node is not None and node.op != "output":
                current[0] = node
                if node.op == "placeholder":
                    for b, batch in enumerate(batches):
                        ref[b][node] = quant[b][node] = batch.to(device)
                elif node.op == "get_attr":
                    pass  # fetched when a node first reads it (fetch_weights)
                elif node in sites:
                    site = sites[node]
                    producer = site.producer
                    result = on_site(SiteInputs(site, [r[producer] for r in ref], [q[producer] for q in quant]))
                    for b in range(len(batches)):
                        ref[b][node] = ref[b][producer]
                        quant[b][node] = result.quant[b]
                    for k, v in result.ref_overrides.items():
                        ref_overrides[k] = place(v)
                        hold(k, ref_overrides[k])
                    for reader in result.raw_readers:
                        raw_of[reader] = (node, producer)
                        extra_users.setdefault(producer, set()).add(reader)
                    bar.update(1)
                else:
                    fetch_weights(node)
                    for b in range(len(batches)):
                        shared = node not in ref_overrides and all(ref[b][a] is quant[b][a] for a in node.all_input_nodes)
                        if shared and node not in raw_of:
                            ref[b][node] = quant[b][node] = evaluate(node, quant[b])
                        else:
                            ref[b][node] = ref_overrides[node] if node in ref_overrides else evaluate(node, ref[b])
                            quant[b][node] = evaluate(node, quant[b])
                    ref_overrides.pop(node, None)  # held by the lanes now; freed with them
                done.add(node)
                release(node)
                if node is last:
                    break
                node = node.next

    bar = tqdm(total=len(sites), desc="sequential", unit="site", disable=not progress, leave=False)
    node = next(iter(gm.graph.nodes))
    try:
        _walk(node)
        return {"peak_weight_bytes": peak[0]}
    except torch.OutOfMemoryError as err:
        raise out_of_memory(err, current[0], len(batches)) from None
    finally:
        bar.close()
        interp.env = {}


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

