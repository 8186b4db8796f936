"""``recipe(config)``: the passes a ``QuantConfig`` will run, in order, before anything runs.

Every pass in ``PIPELINE`` is asked, in that order, whether the config runs it
(``Pass.from_config(config)`` returns the pass with its options, or None). The result prints as one
line per pass and is what ``quantize()`` runs and what ``report.json`` records, so the pipeline a
config stands for can be read without running it:

    >>> print(llmq_fx.recipe(llmq_fx.QuantConfig()))
    rotate    RotatePass(seed=0, required=False, ..., sort=ResidualOrder(method='range', group=32, ...))
    observe   InsertObserversPass(hessian=False, input_quant=None)
    gptq      SequentialGPTQPass(weight=<W4 symmetric groups of 64, clip search>, ...)
    quantize  InsertQDQPass(weight=<W4 ...>, activation=<A4 asymmetric dynamic groups of 32, clip 0.9>, ...)

A new pass is a new entry in ``PIPELINE`` (with its ``from_config``), not a new branch in ``quantize()``.
"""

from __future__ import annotations

import dataclasses

from llmq_fx.config import QuantConfig
from llmq_fx.passes.base import LlmqPass
from llmq_fx.passes.calibrate import CalibratePass
from llmq_fx.passes.gptq import GPTQPass
from llmq_fx.passes.group_channels import GroupChannelsPass
from llmq_fx.passes.insert_observers import InsertObserversPass
from llmq_fx.passes.insert_qdq import InsertQDQPass
from llmq_fx.passes.learn_rotation import LearnRotationPass
from llmq_fx.passes.quantize_embeddings import QuantizeEmbeddingsPass
from llmq_fx.passes.rotate import RotatePass
from llmq_fx.passes.sequential_gptq import SequentialGPTQPass
from llmq_fx.passes.smooth import SmoothPass

__all__ = ["recipe", "Recipe", "PIPELINE"]

# Pipeline order. Sequential GPTQ calibrates inside its own walk, so a config runs either
# CalibratePass (then Smooth/Group/GPTQ on the recorded statistics) or SequentialGPTQPass.
PIPELINE: tuple[type[LlmqPass], ...] = (
    RotatePass,
    LearnRotationPass,
    InsertObserversPass,
    CalibratePass,
    SequentialGPTQPass,
    SmoothPass,
    GroupChannelsPass,
    GPTQPass,
    InsertQDQPass,
    QuantizeEmbeddingsPass,
)


class Recipe(list):
    """The passes of one config, in the order ``quantize()`` runs them; prints one line per pass."""

    def __str__(self) -> str:
        return "\n".join(p.describe() for p in self)

    def stages(self) -> list[str]:
        return [p.stage for p in self]

    def to_dict(self) -> list[dict]:
        """JSON-able: ``[{"stage", "pass", "options"}, ...]`` (what ``report.json`` records)."""
        return [p.to_dict() for p in self]

    def summary(self) -> str:
        """One line: the stages, then the weight and activation schemes (for help texts and logs)."""
        parts = [" -> ".join(self.stages())]
        qdq = next((p for p in self if isinstance(p, InsertQDQPass)), None)
        gptq = next((p for p in self if isinstance(p, GPTQPass)), None)
        rotate = next((p for p in self if isinstance(p, RotatePass)), None)
        if rotate is not None:
            order = rotate.options.sort
            parts.append("Hadamard rotation" + ("" if rotate.options.required else " where the graph allows it")
                         + ("" if order is None else f", residual channels ordered by {order.method}"))
        if qdq is not None and qdq.options.weight is not None:
            how = "round-to-nearest"
            if gptq is not None:
                how = "GPTQ" + (f" act-aware {gptq.options.act_aware:g}" if gptq.options.act_aware is not None else "")
                how += " sequential" if isinstance(gptq, SequentialGPTQPass) else ""
            parts.append(f"{qdq.options.weight} by {how}")
        else:
            parts.append("float weights")
        act = qdq.options.activation if qdq is not None else None
        if act is None:
            parts.append("float activations")
        else:
            searched = isinstance(gptq, SequentialGPTQPass) and gptq.options.clip_search
            text = str(dataclasses.replace(act, clip_ratio=1.0)) if searched else str(act)
            if searched:
                text += f", clip per site from {list(gptq.options.clip_search)}"
            group = next((p for p in self if isinstance(p, GroupChannelsPass)), None)
            if group is not None:
                text += f", k-means clusters {group.options.n_clusters}"
            parts.append(text)
        embeddings = next((p for p in self if isinstance(p, QuantizeEmbeddingsPass)), None)
        if embeddings is not None:
            opts = embeddings.options
            rotate = next((p for p in self if isinstance(p, RotatePass)), None)
            tied = opts.embedding is not None and opts.embedding == opts.lm_head
            gptq_head = " by GPTQ" if opts.lm_head_gptq else ""
            if tied:
                kept = " (one table where the model ties them)" if rotate is None or rotate.options.keep_tied else ""
                parts.append(f"embedding and lm_head {opts.embedding}{gptq_head}{kept}")
            else:
                parts += [f"{kind} {spec}{gptq_head if kind == 'lm_head' else ''}" for kind, spec in
                          (("embedding", opts.embedding), ("lm_head", opts.lm_head)) if spec is not None]
        smooth = next((p for p in self if isinstance(p, SmoothPass)), None)
        if smooth is not None:
            parts.append(f"SmoothQuant alpha {smooth.options.alpha:g} at {list(smooth.options.sites)}")
        return "; ".join(parts)


def recipe(config: QuantConfig | dict | None = None) -> Recipe:
    """The passes ``llmq_fx.quantize(gm, calib, config)`` runs, each built from its own options.

    Args:
        config: a ``QuantConfig``, a dict of its keys, or None for the default recipe.

    Returns:
        A ``Recipe`` (a list of passes); ``print`` it to see the pipeline and every option.

    Example:
        >>> print(llmq_fx.recipe({"rotate": False, "a_dynamic": False, "gptq": False, "smooth_alpha": 0.5}))
    """
    config = QuantConfig.coerce(config)
    return Recipe(p for cls in PIPELINE if (p := cls.from_config(config)) is not None)
