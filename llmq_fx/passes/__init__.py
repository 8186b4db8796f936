"""Graph-rewrite passes, one per file, each an ``LlmqPass`` (a ``PassBase`` with one options object)."""

from llmq_fx.passes.base import CalibratedPass, LlmqPass
from llmq_fx.passes.calibrate import CalibrateOptions, CalibratePass
from llmq_fx.passes.gptq import GPTQOptions, GPTQPass
from llmq_fx.passes.group_channels import GroupChannelsPass, GroupOptions, cluster_channels
from llmq_fx.passes.insert_observers import InsertObserversPass, ObserveOptions
from llmq_fx.passes.insert_qdq import InsertQDQPass, QDQOptions
from llmq_fx.passes.quantize_embeddings import EmbeddingsOptions, QuantizeEmbeddingsPass
from llmq_fx.passes.rotate import RotateOptions, RotatePass
from llmq_fx.passes.sequential_gptq import SequentialGPTQOptions, SequentialGPTQPass
from llmq_fx.passes.smooth import SmoothOptions, SmoothPass, smoothing_scales
from llmq_fx.passes.learn_rotation import LearnRotationOptions, LearnRotationPass

__all__ = [
    "LlmqPass",
    "CalibratedPass",
    "RotatePass",
    "RotateOptions",
    "LearnRotationPass",
    "LearnRotationOptions",
    "InsertObserversPass",
    "ObserveOptions",
    "CalibratePass",
    "CalibrateOptions",
    "SequentialGPTQPass",
    "SequentialGPTQOptions",
    "SmoothPass",
    "SmoothOptions",
    "GroupChannelsPass",
    "GroupOptions",
    "GPTQPass",
    "GPTQOptions",
    "InsertQDQPass",
    "QDQOptions",
    "QuantizeEmbeddingsPass",
    "EmbeddingsOptions",
    "cluster_channels",
    "smoothing_scales",
]
