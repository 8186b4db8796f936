"""ONNX export of llmq_fx graphs and an onnxruntime runner for them.

    path = llmq_fx.export.to_onnx(qgm, "opt-w4a4.onnx")   # QuantizeLinear/DequantizeLinear, INT4 weights
    model = llmq_fx.export.OnnxCausalLM(path)            # model(input_ids) -> logits, via onnxruntime
    llmq_fx.export.onnx_qdq_report(path)                 # QDQ node counts, element types, file size
"""

from llmq_fx.export.onnx_export import to_onnx
from llmq_fx.export.runtime import OnnxCausalLM, onnx_qdq_report

__all__ = ["to_onnx", "OnnxCausalLM", "onnx_qdq_report"]
