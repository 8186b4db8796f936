"""Observer insertion pass.

Pattern: every ``aten.linear`` node, grouped by the node that produces its input (q/k/v share the
norm output, so they form one group).

Rewrite: one ``call_module`` node of an ``ActivationObserver`` per group, placed between the
producer and the group's Linears (other users of the producer, such as a residual add, keep the
raw value). The observer's node meta records the site's name, its consumer module paths and its
role (qkv / out_proj / fc1 / fc2 / other) read from the graph.

Each observer node carries the site's ``spec.SiteRecord`` (``node.meta[SITE_META]``): name, consumers
and role, for the passes after it to read and extend. Observer names are made unique: a Linear module
called at two places gets two observers, never one replacing the other.

With ``input_quant`` (a dynamic ``spec.ActivationSpec``: the quantizer the Linears will later read
through) the observers also record the moments of the quantized input that GPTQ needs to compensate
for activation quantization (``GPTQPass`` with ``act_aware``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.graph import attr, compute_device, linear_nodes, module_path, site_role
from llmq_fx.passes.base import LlmqPass
from llmq_fx.spec import SITE_META, ActivationSpec, SiteRecord
from llmq_fx.stats import ActivationObserver

__all__ = ["InsertObserversPass", "ObserveOptions", "OBSERVER_PREFIX"]

logger = logging.getLogger(__name__)

OBSERVER_PREFIX = "llmq_observer_"


@dataclass(frozen=True)
class ObserveOptions:
    """Options of ``InsertObserversPass``.

    Attributes:
        hessian: every observer also accumulates ``X^T X`` (one-pass GPTQ).
        input_quant: a dynamic activation scheme (group size an upper bound, resolved per site): the
            observers accumulate ``Q(X)^T Q(X)`` and ``Q(X)^T X`` instead (implies ``hessian``).
    """

    hessian: bool = False
    input_quant: ActivationSpec | None = None


class InsertObserversPass(LlmqPass):
    """Insert one streaming statistics observer per distinct Linear input."""

    Options = ObserveOptions
    stage = "observe"

    @classmethod
    def from_config(cls, config) -> "InsertObserversPass":
        # Sequential GPTQ takes its moments in its own walk; one-pass GPTQ needs them from calibration.
        one_pass_gptq = config.gptq and config.w_bits is not None and not config.runs_sequential_gptq()
        act_aware = one_pass_gptq and config.gptq_act_aware is not None and config.act_aware_unavailable() is None
        return cls(ObserveOptions(hessian=one_pass_gptq, input_quant=config.activation_spec() if act_aware else None))

    def call(self, gm: fx.GraphModule) -> PassResult:
        hessian = self.options.hessian or self.options.input_quant is not None
        groups: dict[fx.Node, list[fx.Node]] = {}
        for lin in linear_nodes(gm.graph):
            groups.setdefault(lin.args[0], []).append(lin)
        taken = {name for name, _ in gm.named_modules()}
        for producer, consumers in groups.items():
            weight = attr(gm, consumers[0].args[1].target)
            in_features = weight.shape[1]
            paths = [module_path(c) for c in consumers]
            name = paths[0] if len(paths) == 1 else _group_name(paths)
            target = OBSERVER_PREFIX + re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]", "_", name)).strip("_")
            target = _unique(target, taken)
            taken.add(target)
            quant = None if self.options.input_quant is None else self.options.input_quant.for_site(in_features)
            observer = ActivationObserver(in_features, hessian=hessian, input_quant=quant)
            gm.add_submodule(target, observer.to(compute_device(gm)))
            with gm.graph.inserting_after(producer):
                obs = gm.graph.call_module(target, (producer,))
            obs.meta[SITE_META] = SiteRecord(name=name, consumers=paths, role=site_role(producer, consumers))
            if "val" in producer.meta:
                obs.meta["val"] = producer.meta["val"]
            for c in consumers:
                c.replace_input_with(producer, obs)
            logger.debug("observer %s -> %s", name, paths)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(groups))


def _unique(target: str, taken: set[str]) -> str:
    """``target``, or ``target_2``, ``target_3``... if a module of that name exists already."""
    if target not in taken:
        return target
    i = 2
    while f"{target}_{i}" in taken:
        i += 1
    return f"{target}_{i}"


def _group_name(paths: list[str]) -> str:
    """``a.b.q_proj``, ``a.b.k_proj`` -> ``a.b.{q_proj,k_proj}``."""
    prefixes = {p.rpartition(".")[0] for p in paths}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        leaves = ",".join(p.rpartition(".")[2] for p in paths)
        return f"{prefix}.{{{leaves}}}" if prefix else f"{{{leaves}}}"
    return "+".join(paths)
