"""Observer insertion pass.

Pattern: every ``aten.linear`` node, grouped by the node that produces its input (q/k/v share the
norm output, so they form one group).

Rewrite: one ``call_module`` node of an ``ActivationObserver`` per group, placed between the
producer and the group's Linears (other users of the producer, such as a residual add, keep the
raw value). The observer's node meta records the site's name, its consumer module paths and its
role (qkv / out_proj / fc1 / fc2 / other) read from the graph.

With ``input_quant`` (a ``stats.InputQuantizer``: the per-token dynamic activation quantizer the
Linears will later read through) the observers also record the moments of the quantized input that
GPTQ needs to compensate for activation quantization (``GPTQPass(act_aware=...)``).
"""

from __future__ import annotations

import logging
import re

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from llmq_fx.graph import attr, linear_nodes, module_path, site_role
from llmq_fx.stats import ActivationObserver, InputQuantizer

__all__ = ["InsertObserversPass", "OBSERVER_PREFIX"]

logger = logging.getLogger(__name__)

OBSERVER_PREFIX = "llmq_observer_"


class InsertObserversPass(PassBase):
    """Insert one streaming statistics observer per distinct Linear input.

    ``hessian=True`` makes every observer also accumulate ``X^T X`` (for GPTQ); with ``input_quant``
    it accumulates ``Q(X)^T Q(X)`` and ``Q(X)^T X`` instead (implies ``hessian``).
    """

    def __init__(self, hessian: bool = False, input_quant: InputQuantizer | None = None):
        super().__init__()
        self.hessian = hessian or input_quant is not None
        self.input_quant = input_quant

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups: dict[fx.Node, list[fx.Node]] = {}
        for lin in linear_nodes(gm.graph):
            groups.setdefault(lin.args[0], []).append(lin)
        for producer, consumers in groups.items():
            weight = attr(gm, consumers[0].args[1].target)
            in_features = weight.shape[1]
            paths = [module_path(c) for c in consumers]
            name = paths[0] if len(paths) == 1 else _group_name(paths)
            target = OBSERVER_PREFIX + re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]", "_", name)).strip("_")
            quant = None if self.input_quant is None else self.input_quant.for_site(in_features)
            observer = ActivationObserver(in_features, hessian=self.hessian, input_quant=quant)
            gm.add_submodule(target, observer.to(weight.device))
            with gm.graph.inserting_after(producer):
                obs = gm.graph.call_module(target, (producer,))
            obs.meta["llmq_site"] = {"name": name, "consumers": paths, "role": site_role(producer, consumers)}
            if "val" in producer.meta:
                obs.meta["val"] = producer.meta["val"]
            for c in consumers:
                c.replace_input_with(producer, obs)
            logger.debug("observer %s -> %s", name, paths)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(groups))


def _group_name(paths: list[str]) -> str:
    """``a.b.q_proj``, ``a.b.k_proj`` -> ``a.b.{q_proj,k_proj}``."""
    prefixes = {p.rpartition(".")[0] for p in paths}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        leaves = ",".join(p.rpartition(".")[2] for p in paths)
        return f"{prefix}.{{{leaves}}}" if prefix else f"{{{leaves}}}"
    return "+".join(paths)
