"""What every llmq_fx pass shares: one options object, a stage name, and a constructor from ``QuantConfig``.

A pass is built either from its options object (``GPTQPass(GPTQOptions(...))``) or from that
object's fields (``GPTQPass(act_aware=0.3)``), never from loose settings of its own, so the options a
pass runs with are one printable value. ``from_config(config)`` returns the pass ``config`` asks for,
or None when the config does not run it; ``llmq_fx.recipe`` asks every pass in pipeline order.

Passes that read calibration data (``CalibratedPass``) get it at run time from ``quantize()``
through ``with_calibration``, so a recipe is a pure function of the config and prints before
anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import torch
from torch.fx.passes.infra.pass_base import PassBase

__all__ = ["LlmqPass", "CalibratedPass", "options_dict"]


class LlmqPass(PassBase):
    """A ``PassBase`` configured by one frozen options dataclass (``Options``)."""

    Options: ClassVar[type]
    stage: ClassVar[str]  # the name quantize() times it under and the recipe prints

    def __init__(self, options: Any = None, **fields: Any):
        super().__init__()
        if options is not None and fields:
            raise TypeError(f"{type(self).__name__} takes an options object or its fields, not both")
        if options is None:
            options = self.Options(**fields)
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} options must be {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    @classmethod
    def from_config(cls, config) -> "LlmqPass | None":  # pragma: no cover - every pass defines it
        raise NotImplementedError

    def describe(self) -> str:
        """One line: the stage, the pass and its options."""
        return f"{self.stage:<10} {self!r}"

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_short(getattr(self.options, f.name))}" for f in dataclasses.fields(self.options))
        return f"{type(self).__name__}({fields})"

    def to_dict(self) -> dict:
        return {"stage": self.stage, "pass": type(self).__name__, "options": options_dict(self.options)}


class CalibratedPass(LlmqPass):
    """A pass that runs the model on calibration batches; ``quantize()`` binds them with ``with_calibration``."""

    batches: list[torch.Tensor] | None = None
    progress: bool = True

    def with_calibration(self, batches: list[torch.Tensor], progress: bool = True) -> "CalibratedPass":
        """A copy of this pass that runs on ``batches`` (validated ``[b, T]`` LongTensors)."""
        bound = copy.copy(self)
        bound.batches = batches
        bound.progress = progress
        return bound

    def _require_batches(self) -> list[torch.Tensor]:
        if self.batches is None:
            from llmq_fx.errors import CalibrationError

            raise CalibrationError(
                f"{type(self).__name__} needs calibration data: run it through llmq_fx.quantize(), or "
                "bind batches with .with_calibration(calibration_batches(ids))"
            )
        return self.batches


def options_dict(options: Any) -> dict:
    """An options dataclass as plain JSON-able values (nested specs as dicts, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(options):
        out[f.name] = _plain(getattr(options, f.name))
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _short(v: Any) -> str:
    """Readable option value: specs by their ``str``, the rest by ``repr``."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and type(v).__str__ is not object.__str__:
        return f"<{v}>"
    if isinstance(v, tuple):  # options hold tuples (frozen); read as the config's lists
        return repr(list(v))
    return repr(v)
