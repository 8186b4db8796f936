"""Run and inspect an exported ONNX model.

``OnnxCausalLM`` wraps an ``onnxruntime.InferenceSession`` as ``model(input_ids) -> logits`` so
that ``llmq_fx.evaluate.perplexity`` scores the ONNX file like a GraphModule. ``onnx_qdq_report``
reads a file's graph (not its weights) and counts what the export promises: QuantizeLinear /
DequantizeLinear nodes, their integer element types, and INT4 weight initializers.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from llmq_fx.export.onnx_export import PACKED_META

__all__ = ["OnnxCausalLM", "onnx_qdq_report"]

logger = logging.getLogger(__name__)

_FOUR_BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


class OnnxCausalLM:
    """An exported causal LM run by onnxruntime on the CPU: ``model(input_ids) -> logits``.

    A KV-cache decoder (inputs ``attention_mask``, ``position_ids``, ``past_key_values.*``) runs as a
    first step: an all-ones mask, positions ``0..T-1`` and empty past tensors, so the same perplexity
    code scores it; a folder (``model.onnx`` inside) is accepted too.

    Args:
        path: an ``.onnx`` file written by ``llmq_fx.export.to_onnx``.
        intra_op_threads: onnxruntime's thread count (0: its default).
        fuse_qdq: let onnxruntime fuse QDQ patterns into integer kernels. Off by default: the
            graph then runs exactly as written (QuantizeLinear/DequantizeLinear in float, the
            semantics ``llmq_fx.qmath`` reproduces), and onnxruntime 1.32's fusion of an 8-bit
            activation QDQ into ``MatMulIntegerToFloat`` fails at run time on per-channel
            activation zero points ("Per-Channel is not supported yet").

    Example:
        >>> model = OnnxCausalLM("opt-w4a4.onnx")
        >>> llmq_fx.evaluate.perplexity(model, tokens, seq_len=512).ppl
    """

    def __init__(self, path: str | os.PathLike, intra_op_threads: int = 0, fuse_qdq: bool = False):
        import onnxruntime as ort  # imported here: only running a model needs it

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if not fuse_qdq:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.output_name = "logits" if any(o.name == "logits" for o in self.session.get_outputs()) else self.session.get_outputs()[0].name
        # KV-cache inputs: name -> [kv_heads, head_size] (the static dims of [batch, kv_heads, past, head_size]);
        # a dim the file leaves symbolic (onnxruntime-genai's builder names the head size) comes from
        # genai_config.json beside it.
        decoder = {}
        config = self.path.parent / "genai_config.json"
        if config.is_file():
            decoder = json.loads(config.read_text()).get("model", {}).get("decoder", {})
        fallback = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
        self.past = {}
        for i in inputs:
            if i.name.startswith("past_key_values."):
                dims = [i.shape[d] if isinstance(i.shape[d], int) else fallback[d] for d in (1, 3)]
                if None in dims:
                    raise ValueError(f"{self.path}: input {i.name} has symbolic dims {i.shape} and no genai_config.json gives them")
                self.past[i.name] = tuple(dims)
        self.has_mask = any(i.name == "attention_mask" for i in inputs)
        self.has_positions = any(i.name == "position_ids" for i in inputs)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = np.ascontiguousarray(input_ids.detach().cpu().numpy().astype(np.int64))
        feed = {self.input_name: ids}
        batch, seq = ids.shape
        if self.has_mask:
            feed["attention_mask"] = np.ones((batch, seq), dtype=np.int64)
        if self.has_positions:
            feed["position_ids"] = np.ascontiguousarray(np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)))
        for name, (heads, size) in self.past.items():
            feed[name] = np.zeros((batch, heads, 0, size), dtype=np.float32)
        (logits,) = self.session.run([self.output_name], feed)
        return torch.from_numpy(logits)

    def __repr__(self) -> str:
        return f"OnnxCausalLM({str(self.path)!r})"


def onnx_qdq_report(path: str | os.PathLike) -> dict:
    """Counts of the QDQ structure of an ONNX file (weights are not loaded).

    Returns:
        ``quantize_linear`` / ``dequantize_linear``: node counts;
        ``quantize_linear_types`` / ``dequantize_linear_types``: element type name -> count
        (the integer type of the zero point, or of DequantizeLinear's input);
        ``weight_dequantize_linear``: DequantizeLinear nodes reading an initializer (weights);
        ``int4_weight_initializers``: INT4/UINT4 initializers read by DequantizeLinear, and 4-bit
        packed weights of ``com.microsoft.MatMulNBits``;
        ``matmul_nbits``: MatMulNBits node count; ``matmul_nbits_bits``: bits -> weights they hold
        (a node packing q/k/v counts three);
        ``op_types``: op type -> count over the whole graph;
        ``float_initializer_elements``: elements of float initializers (embeddings, norms, scales...);
        ``file_bytes``: the model file plus any external-data files it references.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    init_types = {t.name: t.data_type for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def q_type(node: onnx.NodeProto) -> int | None:
        """Integer type of a QuantizeLinear: its zero point's type, else ``output_dtype``, else UINT8.

        A static zero point is an initializer; a dynamic (per-token) one is computed in float and
        ``Cast`` to the integer type, which then names the type.
        """
        if len(node.input) > 2 and node.input[2]:
            zp = node.input[2]
            if zp in init_types:
                return init_types[zp]
            producer = producers.get(zp)
            if producer is not None and producer.op_type == "Cast":
                return next((a.i for a in producer.attribute if a.name == "to"), None)
            return None
        attrs = {a.name: a.i for a in node.attribute}
        return attrs.get("output_dtype") or onnx.TensorProto.UINT8

    q_types: Counter = Counter()
    dq_types: Counter = Counter()
    nbits: Counter = Counter()
    weight_dq = 0
    int4_weights = set()
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            packed = next((json.loads(e.value) for e in node.metadata_props if e.key == PACKED_META), None)
            weights = [name for name, _ in packed] if packed else [node.input[1]]
            nbits[str(bits)] += len(weights)
            if bits == 4:
                int4_weights.update(weights)
        if node.op_type == "QuantizeLinear":
            q_types[_type_name(q_type(node))] += 1
        elif node.op_type == "DequantizeLinear":
            src = node.input[0]
            if src in init_types:
                weight_dq += 1
                dtype = init_types[src]
                if dtype in _FOUR_BIT:
                    int4_weights.add(src)
            elif src in producers and producers[src].op_type == "QuantizeLinear":
                dtype = q_type(producers[src])
            else:
                dtype = None
            dq_types[_type_name(dtype)] += 1

    float_elements = sum(
        int(np.prod(t.dims)) for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    )
    data_files = {
        entry.value
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    file_bytes = path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files)
    return {
        "quantize_linear": sum(q_types.values()),
        "dequantize_linear": sum(dq_types.values()),
        "quantize_linear_types": dict(q_types),
        "dequantize_linear_types": dict(dq_types),
        "weight_dequantize_linear": weight_dq,
        "int4_weight_initializers": len(int4_weights),
        "matmul_nbits": sum(nbits.values()),
        "matmul_nbits_bits": dict(nbits),
        "op_types": dict(Counter(node.op_type for node in graph.node)),
        "float_initializer_elements": float_elements,
        "file_bytes": file_bytes,
    }


def _type_name(dtype: int | None) -> str:
    return onnx.TensorProto.DataType.Name(dtype) if dtype is not None else "UNKNOWN"
