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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx
from tqdm.auto import tqdm

from llmq_fx.errors import CalibrationError, DeviceMemoryError, UnsupportedModelError
from llmq_fx.graph import ObserverSite, observer_sites

__all__ = ["SiteInputs", "SiteResult", "run_lockstep"]


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
    gm: fx.GraphModule, batches: list[torch.Tensor], on_site: Callable[[SiteInputs], SiteResult], progress: bool = True
) -> None:
    """Evaluate ``gm`` on ``batches`` node by node up to its last observer, calling ``on_site`` at each observer.

    The graph must take token ids as its only input. ``on_site`` may insert nodes into the graph
    after the observer (before its consumers); they are evaluated when the walk reaches them. The
    float lane's observer output is the producer's value; the observer module itself is not called.
    Nodes after the last observer (the logits) are not evaluated.
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
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    ref: list[dict[fx.Node, object]] = [{} for _ in batches]
    quant: list[dict[fx.Node, object]] = [{} for _ in batches]
    ref_overrides: dict[fx.Node, torch.Tensor] = {}
    raw_of: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # skipped consumer -> (observer, producer)
    extra_users: dict[fx.Node, set[fx.Node]] = {}  # producer -> skipped consumers that still read it
    done: set[fx.Node] = set()

    def evaluate(node: fx.Node, env: dict) -> object:
        interp.env = env
        if node in raw_of:  # a skipped Linear reads the raw producer, not the observer's QDQ
            obs, producer = raw_of[node]
            kept = env[obs]
            env[obs] = env[producer]
            try:
                return interp.run_node(node)
            finally:
                env[obs] = kept
        return interp.run_node(node)

    def release(node: fx.Node) -> None:
        for arg in list(node.all_input_nodes) + ([raw_of[node][1]] if node in raw_of else []):
            if arg in done and all(u in done for u in list(arg.users) + list(extra_users.get(arg, ()))):
                for b in range(len(batches)):
                    ref[b].pop(arg, None)
                    quant[b].pop(arg, None)

    current: list[fx.Node | None] = [None]

    def _walk(node: fx.Node) -> None:
        with torch.no_grad():
            while node is not None and node.op != "output":
                current[0] = node
                if node.op == "placeholder":
                    for b, batch in enumerate(batches):
                        ref[b][node] = quant[b][node] = batch.to(device)
                elif node in sites:
                    site = sites[node]
                    producer = site.producer
                    result = on_site(SiteInputs(site, [r[producer] for r in ref], [q[producer] for q in quant]))
                    for b in range(len(batches)):
                        ref[b][node] = ref[b][producer]
                        quant[b][node] = result.quant[b]
                    ref_overrides.update(result.ref_overrides)
                    for reader in result.raw_readers:
                        raw_of[reader] = (node, producer)
                        extra_users.setdefault(producer, set()).add(reader)
                    bar.update(1)
                else:
                    for b in range(len(batches)):
                        shared = node not in ref_overrides and all(ref[b][a] is quant[b][a] for a in node.all_input_nodes)
                        if shared and node not in raw_of:
                            ref[b][node] = quant[b][node] = evaluate(node, quant[b])
                        else:
                            ref[b][node] = ref_overrides[node] if node in ref_overrides else evaluate(node, ref[b])
                            quant[b][node] = evaluate(node, quant[b])
                done.add(node)
                release(node)
                if node is last:
                    break
                node = node.next

    bar = tqdm(total=len(sites), desc="sequential", unit="site", disable=not progress, leave=False)
    node = next(iter(gm.graph.nodes))
    try:
        _walk(node)
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

