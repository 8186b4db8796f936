"""Run calibration batches through an observed graph and check what the observers recorded."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from llmq_fx.errors import CalibrationError, StatisticsError
from llmq_fx.graph import observer_sites

__all__ = ["calibrate", "calibration_batches", "check_statistics", "MIN_CALIB_TOKENS"]

logger = logging.getLogger(__name__)

# Fewer tokens than this give min/max/std estimates too noisy to set a 4-bit range from.
MIN_CALIB_TOKENS = 16


def calibration_batches(calib: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4) -> list[torch.Tensor]:
    """Validate ``calib`` and cut it into ``[b, T]`` LongTensor batches."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 1:
            calib = calib[None]
        if calib.dim() != 2:
            raise CalibrationError(f"calibration tensor must be [N, T] token ids, got shape {tuple(calib.shape)}")
        items = list(calib.split(batch_size))
    else:
        items = []
        for i, t in enumerate(calib):
            if not isinstance(t, torch.Tensor):
                raise CalibrationError(f"calibration batch {i} is a {type(t).__name__}, not a LongTensor of token ids")
            items.append(t[None] if t.dim() == 1 else t)
    if not items or sum(t.numel() for t in items) == 0:
        raise CalibrationError("calibration set is empty: give at least one sequence of token ids")
    for i, t in enumerate(items):
        if t.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(f"calibration batch {i} has dtype {t.dtype}; token ids must be int64 (LongTensor)")
        if t.dim() != 2 or t.shape[1] == 0:
            raise CalibrationError(f"calibration batch {i} must be [batch, seq] with seq >= 1, got shape {tuple(t.shape)}")
    total = sum(t.numel() for t in items)
    if total < MIN_CALIB_TOKENS:
        raise CalibrationError(
            f"calibration set too short: {total} tokens, at least {MIN_CALIB_TOKENS} are needed for usable statistics"
        )
    return [t.long() for t in items]


def calibrate(
    gm: fx.GraphModule, calib: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4, progress: bool = True
) -> int:
    """Feed the calibration tokens through ``gm`` (which carries observers) under ``no_grad``.

    Returns the number of tokens seen. Raises ``CalibrationError`` for a bad calibration set and
    ``StatisticsError`` (naming the observer node) for NaN/Inf statistics.
    """
    sites = observer_sites(gm)
    if not sites:
        raise CalibrationError("graph has no observers: run InsertObserversPass before calibrate()")
    batches = calibration_batches(calib, batch_size)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    tokens = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
            try:
                gm(batch.to(device))
            except Exception as err:
                raise CalibrationError(
                    f"forward pass on calibration batch of shape {tuple(batch.shape)} failed: {str(err).splitlines()[0][:300]}"
                ) from err
            tokens += batch.numel()
    check_statistics(gm)
    return tokens


def check_statistics(gm: fx.GraphModule) -> None:
    for site in observer_sites(gm):
        st = site.module.stats()
        if st.count == 0:
            raise StatisticsError(f"observer node {site.observer.name} ({site.name}) saw no tokens")
        for key in ("min", "max", "mean", "std"):
            v = getattr(st, key)
            if not torch.isfinite(v).all():
                bad = int((~torch.isfinite(v)).sum())
                raise StatisticsError(
                    f"observer node {site.observer.name} ({site.name}) recorded NaN/Inf {key} in {bad} channel(s)"
                )
