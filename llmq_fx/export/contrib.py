"""onnxruntime's contrib ops as onnxscript ops, for the ``fast`` format's translations.

onnxscript builds a node only for an op whose schema it knows, and ONNX ships no schemas for
onnxruntime's own ops. The schemas below state the inputs, outputs and attributes this project
uses, as onnxruntime 1.32 documents them (its ``get_all_operator_schema()``), so the translation of
``llmq.rms_norm`` and ``llmq.group_query_attention`` emits those ops directly. ``SimplifiedLayerNormalization``
lives in the ONNX domain in onnxruntime; its schema is registered with ``onnx.defs`` in this process
so that ``onnx.checker`` accepts the exported file.
"""

from __future__ import annotations

import onnx.defs
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

__all__ = ["SimplifiedLayerNormalization", "GroupQueryAttention"]

_FLOAT = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")
_P, _A = OpSchema.FormalParameter, OpSchema.Attribute
_OPTIONAL = OpSchema.FormalParameterOption.Optional


def _op(domain: str, name: str, inputs, outputs, constraints, attributes) -> Op:
    schema = OpSchema(name, domain, 1, inputs=inputs, outputs=outputs, type_constraints=constraints, attributes=attributes)
    if domain == "" and not onnx.defs.has(name):
        # onnxruntime registers this op in the ONNX domain; the ONNX checker only knows it from here.
        onnx.defs.register_schema(schema)
    return Op(Opset(domain, 1), name, schema)


SimplifiedLayerNormalization = _op(
    "", "SimplifiedLayerNormalization",
    [_P("X", "T"), _P("scale", "T")],
    [_P("Y", "T")],
    [_FLOAT],
    [_A("axis", OpSchema.AttrType.INT, "", required=False), _A("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
     _A("stash_type", OpSchema.AttrType.INT, "", required=False)],
)
"""``Y = X / sqrt(mean(X^2, axis..) + epsilon) * scale`` (onnxruntime registers it in the ONNX domain)."""

GroupQueryAttention = _op(
    "com.microsoft", "GroupQueryAttention",
    [_P("query", "T"), _P("key", "T", param_option=_OPTIONAL), _P("value", "T", param_option=_OPTIONAL),
     _P("past_key", "T", param_option=_OPTIONAL), _P("past_value", "T", param_option=_OPTIONAL),
     _P("seqlens_k", "M"), _P("total_sequence_length", "M"), _P("cos_cache", "T", param_option=_OPTIONAL),
     _P("sin_cache", "T", param_option=_OPTIONAL), _P("position_ids", "P", param_option=_OPTIONAL)],
    [_P("output", "T"), _P("present_key", "T"), _P("present_value", "T")],
    [_FLOAT, ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
    [_A("num_heads", OpSchema.AttrType.INT, "", required=True), _A("kv_num_heads", OpSchema.AttrType.INT, "", required=True),
     _A("scale", OpSchema.AttrType.FLOAT, "", required=False), _A("do_rotary", OpSchema.AttrType.INT, "", required=False),
     _A("rotary_interleaved", OpSchema.AttrType.INT, "", required=False),
     _A("local_window_size", OpSchema.AttrType.INT, "", required=False)],
)
"""Causal attention over a KV cache (``llmq.group_query_attention``'s semantics)."""
