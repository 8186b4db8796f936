"""Calibration pass: feed the calibration batches through a graph that carries observers.

Pattern: every observer site (``InsertObserversPass`` must have run).

Rewrite: no node changes; the observers' buffers accumulate their statistics (and moments), and
``gm.meta["llmq_fx"]["calib_tokens"]`` records how many tokens they saw. The statistics are checked
(``calibrate.check_statistics``): a site that saw no tokens or recorded NaN/Inf is an error naming
its observer node. Not in the recipe of sequential GPTQ, which calibrates inside its own walk.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx.calibrate import calibrate
from llmq_fx.passes.base import CalibratedPass

__all__ = ["CalibratePass", "CalibrateOptions"]


@dataclass(frozen=True)
class CalibrateOptions:
    """Options of ``CalibratePass``: ``batch_size`` sequences per forward (``quantize()`` cuts the
    calibration set into batches of ``QuantConfig.calib_batch_size``)."""

    batch_size: int = 4


class CalibratePass(CalibratedPass):
    """Run the bound calibration batches through the observed graph (``llmq_fx.calibrate``)."""

    Options = CalibrateOptions
    stage = "calibrate"

    @classmethod
    def from_config(cls, config) -> "CalibratePass | None":
        if config.runs_sequential_gptq():
            return None
        return cls(CalibrateOptions(batch_size=config.calib_batch_size))

    def call(self, gm: fx.GraphModule) -> PassResult:
        # The bound batches are already cut to the configured size; calibrate() re-checks them.
        tokens = calibrate(gm, self._require_batches(), self.options.batch_size, self.progress)
        gm.meta.setdefault("llmq_fx", {})["calib_tokens"] = tokens
        return PassResult(gm, True)
