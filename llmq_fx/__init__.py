"""llmq_fx: W4A4 quantization of LLMs as torch.fx graph rewrites, exported to ONNX.

    gm = llmq_fx.trace(model)                        # torch.export -> GraphModule
    gm = llmq_fx.trace_checkpoint(folder)            # or a checkpoint captured on meta, weights bfloat16 on the host
    print(llmq_fx.recipe(config))                    # the passes the config runs, with their options
    qgm = llmq_fx.quantize(gm, calib_ids, config)    # run them on a copy of gm
    llmq_fx.summary(qgm)                             # one row per Linear
"""

from llmq_fx import ops  # noqa: F401  (registers the llmq custom ops)
from llmq_fx.calibrate import calibrate
from llmq_fx.capture import trace
from llmq_fx.config import QuantConfig
from llmq_fx.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    ExportError,
    LlmqError,
    StatisticsError,
    UnsupportedModelError,
)
from llmq_fx.models import trace_checkpoint
from llmq_fx.quantize import quantize
from llmq_fx.recipe import Recipe, recipe
from llmq_fx.serialize import load, save
from llmq_fx.spec import ActivationSpec, WeightSpec
from llmq_fx.summary import format_summary, summary

__version__ = "0.2.0"


def __getattr__(name):
    # ``llmq_fx.export`` pulls in onnx/onnxscript/onnxruntime: import it only when it is used.
    if name == "export":
        import importlib

        return importlib.import_module("llmq_fx.export")
    raise AttributeError(f"module 'llmq_fx' has no attribute {name!r}")

__all__ = [
    "trace",
    "trace_checkpoint",
    "quantize",
    "recipe",
    "save",
    "load",
    "Recipe",
    "ActivationSpec",
    "WeightSpec",
    "calibrate",
    "summary",
    "format_summary",
    "QuantConfig",
    "LlmqError",
    "UnsupportedModelError",
    "ConfigError",
    "CalibrationError",
    "StatisticsError",
    "CheckpointError",
    "ExportError",
]
