"""Exceptions a user can act on: each names the model, node, key or file at fault."""

__all__ = [
    "LlmqError",
    "UnsupportedModelError",
    "ConfigError",
    "CalibrationError",
    "StatisticsError",
    "CheckpointError",
    "ExportError",
    "DeviceMemoryError",
]


class LlmqError(Exception):
    """Base class of every error llmq_fx raises on purpose."""


class UnsupportedModelError(LlmqError):
    """The model cannot be captured, or its graph has a pattern no pass supports."""


class ConfigError(LlmqError, ValueError):
    """An unknown configuration key or an out-of-range value."""


class CalibrationError(LlmqError, ValueError):
    """The calibration set is empty, too short, or of the wrong dtype or shape."""


class StatisticsError(LlmqError):
    """An observer recorded NaN/Inf or saw no tokens."""


class CheckpointError(LlmqError, FileNotFoundError):
    """A model folder or built-in model is missing or is not a causal LM."""


class ExportError(LlmqError):
    """The ONNX export failed; no file was left behind."""


class DeviceMemoryError(LlmqError, MemoryError):
    """The device ran out of memory; the message names where, how much was asked and how much is free."""

