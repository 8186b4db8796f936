"""ONNX export of llmq_fx graphs, onnxruntime-genai folders, and onnxruntime runners for them.

    llmq_fx.export.to_genai(qgm, model, tokenizer, "out/")   # model.onnx (KV cache) + genai_config.json + tokenizer
    llmq_fx.export.generate("out/", "The capital of France is", 32)   # onnxruntime-genai's generation loop
    path = llmq_fx.export.to_onnx(qgm, "opt-w4a4.onnx")      # input_ids -> logits; format="qdq" for standard ops only
    model = llmq_fx.export.OnnxCausalLM(path)                # model(input_ids) -> logits, via onnxruntime
    llmq_fx.export.onnx_qdq_report(path)                     # op counts, element types, file size
"""

from llmq_fx.export.decoder import quantized_decoder
from llmq_fx.export.genai import GenerationResult, generate, to_genai
from llmq_fx.export.onnx_export import to_onnx
from llmq_fx.export.runtime import OnnxCausalLM, onnx_qdq_report

__all__ = ["to_onnx", "to_genai", "generate", "GenerationResult", "quantized_decoder", "OnnxCausalLM", "onnx_qdq_report"]
