"""``recipe(config)``: the passes a ``QuantConfig`` will run, in order, before anything runs.

Every pass in ``PIPELINE`` is asked, in that order, whether the config runs it
(``Pass.from_config(config)`` returns the pass with its options, or None). The result prints as one
line per pass and is what ``quantize()`` runs and what ``report.json`` records, so the pipeline a
config stands for can be read without running it:

    >>> print(llmq_fx.recipe(llmq_fx.QuantConfig()))
    rotate    RotatePass(seed=0, required=False, ...)
    observe   InsertObserversPass(hessian=False, input_quant=None)
    gptq      SequentialGPTQPass(weight=<W4 symmetric per-channel, clip search>, ...)
    quantize  InsertQDQPass(weight=<W4 ...>, activation=<A4 asymmetric dynamic groups of 64, clip 0.9>, ...)

A new pass is a new entry in ``PIPELINE`` (with its ``from_config``), not a new branch in ``quantize()``.
"""

from __future__ import annotations

from llmq_fx.config import QuantConfig
from llmq_fx.passes.base import LlmqPass
from llmq_fx.passes.calibrate import CalibratePass
from llmq_fx.passes.gptq import GPTQPass
from llmq_fx.passes.group_channels import GroupChannelsPass
from llmq_fx.passes.insert_observers import InsertObserversPass
from llmq_fx.passes.insert_qdq import InsertQDQPass
from llmq_fx.passes.rotate import RotatePass
from llmq_fx.passes.sequential_gptq import SequentialGPTQPass
from llmq_fx.passes.smooth import SmoothPass

__all__ = ["recipe", "Recipe", "PIPELINE"]

# Pipeline order. Sequential GPTQ calibrates inside its own walk, so a config runs either
# CalibratePass (then Smooth/Group/GPTQ on the recorded statistics) or SequentialGPTQPass.
PIPELINE: tuple[type[LlmqPass], ...] = (
    RotatePass,
    InsertObserversPass,
    CalibratePass,
    SequentialGPTQPass,
    SmoothPass,
    GroupChannelsPass,
    GPTQPass,
    InsertQDQPass,
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
