"""Graph-rewrite passes, one per file, each a ``PassBase`` returning ``PassResult``."""

from llmq_fx.passes.gptq import GPTQPass
from llmq_fx.passes.group_channels import GroupChannelsPass, cluster_channels
from llmq_fx.passes.insert_observers import InsertObserversPass
from llmq_fx.passes.insert_qdq import InsertQDQPass
from llmq_fx.passes.smooth import SmoothPass, smoothing_scales

__all__ = [
    "InsertObserversPass",
    "SmoothPass",
    "GroupChannelsPass",
    "GPTQPass",
    "InsertQDQPass",
    "cluster_channels",
    "smoothing_scales",
]
