"""An onnxruntime-genai folder of a quantized model, and text generation with it.

``to_genai(qgm, model, tokenizer, folder)`` writes what onnxruntime-genai loads as it is:

* ``model.onnx`` (+ ``model.onnx.data`` when the weights pass 2 GB): the KV-cache decoder of the
  quantized graph (``export.decoder.quantized_decoder``), in the ``fast`` format by default
  (MatMulNBits weights);
* ``genai_config.json``: the decoder's inputs/outputs, head counts and sizes, context length, special
  token ids and greedy search defaults;
* the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...), from ``save_pretrained``.

``generate(folder, prompt, max_new_tokens)`` runs onnxruntime-genai's own generation loop (its KV
cache handling, its tokenizer and detokenizer stream) and times the prompt and the new tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from llmq_fx.errors import CheckpointError, ExportError

__all__ = ["to_genai", "generate", "GenerationResult", "GENAI_CONFIG", "is_genai_folder", "shares_cache_buffer"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# Model types onnxruntime-genai 0.18 knows by name; any other decoder-only model loads as "decoder".
_GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "olmo",
                "nemotron", "smollm3"}


def to_genai(
    qgm: fx.GraphModule,
    model: nn.Module,
    tokenizer,
    folder: str | os.PathLike,
    format: str = "fast",
    accuracy_level: int = 4,
    decoder: fx.GraphModule | None = None,
) -> Path:
    """Write an onnxruntime-genai folder for ``qgm`` (the result of ``llmq_fx.quantize`` on ``model``).

    Args:
        qgm: the quantized graph, or ``llmq_fx.trace(model)`` itself for a float folder.
        model: the float Hugging Face model (its decoder is captured with a KV cache); not modified.
        tokenizer: the model's tokenizer (saved into the folder), or None to write no tokenizer files.
        folder: the folder to write (a temporary folder beside it is renamed into place at the end).
        format, accuracy_level: as ``to_onnx``.
        decoder: the KV-cache decoder if already built (``quantized_decoder(qgm, model)``).

    Returns:
        The folder.

    Raises:
        ExportError / UnsupportedModelError: naming the node, tensor or file; nothing is left behind.
    """
    from llmq_fx.export.decoder import quantized_decoder
    from llmq_fx.export.onnx_export import to_onnx

    folder = Path(folder)
    dgm = decoder if decoder is not None else quantized_decoder(qgm, model, fuse=format == "fast")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as err:
        raise ExportError(f"cannot write {folder}: {err.strerror or err}") from None
    try:
        to_onnx(dgm, stage / "model.onnx", format=format, accuracy_level=accuracy_level)
        (stage / GENAI_CONFIG).write_text(json.dumps(genai_config(dgm, model), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        for f in stage.iterdir():
            f.chmod(0o644)
        stage.chmod(0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(stage, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def genai_config(dgm: fx.GraphModule, model: nn.Module) -> dict:
    """``genai_config.json`` of a decoder graph: the interface from its ``DecoderSpec``, the special
    tokens from the model's generation config, greedy search by default."""
    from llmq_fx.capture import DecoderSpec

    spec = DecoderSpec(**dgm.meta["llmq_fx"]["decoder"])
    config = model.config
    gen = getattr(model, "generation_config", None)

    def token(name):
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else getattr(config, name, None)

    eos = token("eos_token_id")
    return {
        "model": {
            "bos_token_id": token("bos_token_id"),
            "context_length": spec.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": spec.head_size,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": token("pad_token_id") if token("pad_token_id") is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": spec.model_type if spec.model_type in _GENAI_TYPES else "decoder",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": spec.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_cache_buffer(dgm),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def shares_cache_buffer(dgm: fx.GraphModule) -> bool:
    """Whether onnxruntime-genai may keep each layer's past and present KV cache in one buffer
    (``past_present_share_buffer``): only when every layer's attention is the fused
    ``GroupQueryAttention``, which writes the new keys/values into the cache in place and takes the
    valid lengths from the attention mask, not from the cache's shape. Otherwise (unfused attention,
    the ``qdq`` format) the graph concatenates past and new, and genai must hand it a cache of exactly
    the past length, copying it into a grown buffer at every step (the whole cache per token)."""
    from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
    from llmq_fx.capture import DecoderSpec

    spec = DecoderSpec(**dgm.meta["llmq_fx"]["decoder"])
    fused = sum(1 for n in dgm.graph.nodes if n.target is torch.ops.llmq.group_query_attention.default)
    return fused == spec.num_layers


def is_genai_folder(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / GENAI_CONFIG).is_file() and (folder / "model.onnx").is_file()


@dataclass
class GenerationResult:
    """What ``generate`` produced and how long it took."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding (the first comes out of the prefill)."""
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0


def generate(
    folder: str | os.PathLike,
    prompt: str | list[int],
    max_new_tokens: int = 64,
    on_text: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Greedy generation with onnxruntime-genai from a folder written by ``to_genai`` (or its builder).

    Args:
        folder: an onnxruntime-genai folder.
        prompt: text (tokenized by the folder's tokenizer) or token ids.
        max_new_tokens: how many tokens to generate at most.
        on_text: called with each new piece of text as it is decoded (streaming).
        stop_at_eos: stop at the end-of-sequence token (False: always ``max_new_tokens``, for timing).

    Raises:
        CheckpointError: not a genai folder, an empty prompt, or a prompt that leaves no room for a
            new token in the model's context; one line naming the folder or the lengths.
    """
    import numpy as np
    import onnxruntime_genai as og

    folder = Path(folder)
    if not is_genai_folder(folder):
        raise CheckpointError(f"{folder} is not an onnxruntime-genai folder (no {GENAI_CONFIG} and model.onnx)")
    context = json.loads((folder / GENAI_CONFIG).read_text())["model"]["context_length"]
    try:
        model = og.Model(str(folder))
        tokenizer = og.Tokenizer(model) if isinstance(prompt, str) or on_text is not None else None
    except Exception as err:  # genai raises RuntimeError/OrtException with its own text
        raise CheckpointError(f"onnxruntime-genai cannot load {folder}: {str(err).splitlines()[0][:300]}") from None
    ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise CheckpointError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise CheckpointError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if len(ids) + 1 > context:
        raise CheckpointError(f"the prompt has {len(ids)} tokens; the model's context is {context}, leaving no room to generate")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=min(context, len(ids) + max_new_tokens), do_sample=False)
    if not stop_at_eos:
        params.set_search_options(min_length=min(context, len(ids) + max_new_tokens))
    generator = og.Generator(model, params)
    stream = tokenizer.create_stream() if tokenizer is not None else None
    result = GenerationResult(prompt_tokens=len(ids))
    t0 = time.perf_counter()
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    result.prefill_s = time.perf_counter() - t0
    pieces = []
    t0 = time.perf_counter()
    first = True
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if first:  # the first new token is read off the prompt's logits: prefill, not decode
            result.prefill_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            first = False
        result.tokens.append(token)
        if stream is not None:
            piece = stream.decode(token)
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
    result.decode_s = time.perf_counter() - t0
    result.text = "".join(pieces)
    return result
