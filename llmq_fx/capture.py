"""Capture a Hugging Face causal LM as a ``torch.fx.GraphModule`` with ``torch.export``.

Two captures of the same model: ``trace`` (``input_ids -> logits``, what the quantization passes run
on) and ``trace_decoder`` (the same model with a KV cache: ``input_ids, attention_mask, position_ids,
past key/values -> logits, present key/values``, what generation runs; ``llmq_fx.export.decoder``
moves a quantization from the first onto it).

The old transformers fx tracer is gone in transformers 5 and ``torch.fx.symbolic_trace`` fails on
HF attention code, so the model is exported non-strict with dynamic batch and sequence dims. The
wrapper re-registers the model's own children under their own names, so every parameter and every
``nn_module_stack`` path in the graph is spelled exactly as in the HF model
(``model.decoder.layers.3.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from torch.export import Dim
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmq_fx.errors import UnsupportedModelError
from llmq_fx.graph import linear_nodes

__all__ = ["trace", "trace_decoder", "DecoderSpec"]

logger = logging.getLogger(__name__)


class _Adopting(nn.Module):
    """A wrapper exposing the wrapped model's children and parameters as its own, so that the captured
    graph's parameter names and module paths are the model's (``model.layers.3.self_attn.q_proj``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        object.__setattr__(self, "_hf", model)


class _LogitsOnly(_Adopting):
    """``forward(input_ids) -> logits``."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if hasattr(self._hf, "config"):  # Hugging Face model: no KV cache in the captured graph
            out = self._hf(input_ids=input_ids, use_cache=False)
        else:
            out = self._hf(input_ids)
        return out.logits if hasattr(out, "logits") else out[0]


def _max_seq_len(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def _failing_op(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    m = re.search(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|torch\.ops\.[A-Za-z0-9_.]+)", text)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return f"op {m.group(1)}: {first}" if m else first


def trace(model: nn.Module, example_inputs: tuple[torch.Tensor] | torch.Tensor | None = None) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule ``input_ids [batch, seq] -> logits``.

    Args:
        model: a Hugging Face causal LM (``OPTForCausalLM``; Llama-family models work too).
        example_inputs: ``(input_ids,)`` used for the export; by default a random ``[2, 16]`` batch
            (batch 2 so that the batch dim stays dynamic instead of being specialised to 1).

    Returns:
        A ``torch.fx.GraphModule`` whose outputs equal the eager model's for any batch size and any
        sequence length up to ``max_position_embeddings``. Its parameters are the model's own
        tensors under their HF names (shared, not copied).

    Raises:
        UnsupportedModelError: naming the model class and the failing op.

    Example:
        >>> gm = llmq_fx.trace(OPTForCausalLM(config))
        >>> logits = gm(input_ids)
    """
    cls = type(model).__name__
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"trace() takes a torch.nn.Module, got {cls}")
    model.eval()
    if example_inputs is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        vocab = getattr(getattr(model, "config", None), "vocab_size", 2) or 2
        max_len = _max_seq_len(model) or 16
        gen = torch.Generator().manual_seed(0)
        example_inputs = (torch.randint(0, vocab, (2, min(16, max_len)), generator=gen).to(device),)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    ids = example_inputs[0]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise UnsupportedModelError(f"example input_ids must be an integer [batch, seq] tensor, got {ids.dtype} {tuple(ids.shape)}")

    max_len = _max_seq_len(model)
    seq = Dim("seq", min=1, max=max_len) if max_len else Dim("seq", min=1)
    dynamic = ({0: Dim("batch", min=1), 1: seq},)
    # On CUDA the fused attention kernels' shape rules pad the mask to a multiple of 8 columns, a
    # guard the dynamic ``seq`` range cannot prove; the math kernel's rules have none. The graph
    # still records aten.scaled_dot_product_attention, so at run time PyTorch picks the fused kernel.
    attention = sdpa_kernel([SDPBackend.MATH]) if ids.device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), attention:
            ep = torch.export.export(_LogitsOnly(model), tuple(example_inputs), strict=False, dynamic_shapes=dynamic)
    except Exception as err:  # torch.export raises many unrelated types; the user needs one message
        raise UnsupportedModelError(f"cannot capture {cls} with torch.export: {_failing_op(err)}") from err
    gm = ep.module()
    if not linear_nodes(gm.graph):
        raise UnsupportedModelError(f"{cls} traced, but its graph has no aten.linear node to quantize")
    gm.meta["llmq_fx"] = {
        "model_class": cls,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "max_seq_len": max_len,  # the sequence range the graph accepts (llmq_fx.save exports it again with it)
    }
    logger.info("captured %s: %d nodes, %d linears", cls, len(gm.graph.nodes), len(linear_nodes(gm.graph)))
    return gm


@dataclass(frozen=True)
class DecoderSpec:
    """The KV-cache interface of a decoder graph (what ``genai_config.json`` describes)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    context_length: int
    model_type: str

    @property
    def input_names(self) -> list[str]:
        past = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *past]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *[f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "DecoderSpec":
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            context_length=getattr(config, "max_position_embeddings", None) or 2048,
            model_type=config.model_type,
        )


class _DecoderWithPast(_Adopting):
    """``forward(input_ids, attention_mask, position_ids, past) -> (logits, *present)``.

    ``past`` is a flat list ``[key_0, value_0, key_1, ...]`` of ``[batch, kv_heads, past_len, head_size]``
    tensors (length 0 for a first step); the model runs on a ``DynamicCache`` filled from it and returns
    the cache it grew. The model's children are this module's, so module paths match ``trace``'s.
    """

    def __init__(self, model: nn.Module, spec: DecoderSpec):
        super().__init__(model)
        self.num_layers = spec.num_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self._hf.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self._hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def decoder_example_inputs(spec: DecoderSpec, device="cpu", batch: int = 2, seq: int = 5, past: int = 7):
    """Example ``(input_ids, attention_mask, position_ids, past)`` for tracing or exporting a decoder graph."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen).to(device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device)[None].expand(batch, seq).contiguous()
    cache = [torch.randn(batch, spec.num_kv_heads, past, spec.head_size, generator=gen).to(device)
             for _ in range(2 * spec.num_layers)]
    return ids, mask, positions, cache


def decoder_dynamic_shapes(spec: DecoderSpec):
    """Every batch, sequence and past-length dim dynamic (torch.export works out their relations)."""
    d = Dim.DYNAMIC
    return ({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d}, [{0: d, 2: d}] * (2 * spec.num_layers))


def trace_decoder(model: nn.Module) -> fx.GraphModule:
    """Capture ``model`` with its KV cache: ``(input_ids, attention_mask, position_ids, past) -> (logits, *present)``.

    ``attention_mask`` is ``[batch, past_len + seq]`` (1 = attend), ``position_ids`` ``[batch, seq]``, and
    ``past`` the flat ``[key_0, value_0, ...]`` list (empty tensors on a first step). The parameters are
    the model's own, under the same names as in ``trace``'s graph; ``gm.meta["llmq_fx"]["decoder"]``
    holds the ``DecoderSpec``.

    Raises:
        UnsupportedModelError: the model is not a Hugging Face causal LM whose cache torch.export captures.
    """
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise UnsupportedModelError(f"trace_decoder() needs a Hugging Face causal LM with a config, got {cls}")
    spec = DecoderSpec.from_config(config)
    model.eval()
    device = next(model.parameters()).device
    example = decoder_example_inputs(spec, device)
    attention = sdpa_kernel([SDPBackend.MATH]) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), attention:
            ep = torch.export.export(_DecoderWithPast(model, spec), example, strict=False,
                                     dynamic_shapes=decoder_dynamic_shapes(spec))
    except Exception as err:  # torch.export raises many unrelated types; the user needs one message
        raise UnsupportedModelError(f"cannot capture {cls} with its KV cache: {_failing_op(err)}") from err
    gm = ep.module()
    gm.meta["llmq_fx"] = {"model_class": cls, "model_type": spec.model_type, "max_seq_len": spec.context_length,
                          "decoder": spec.to_dict()}
    logger.info("captured %s with its KV cache: %d nodes", cls, len(gm.graph.nodes))
    return gm
