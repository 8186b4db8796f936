"""Built-in text (``calib``, ``tune``, ``eval``, ``prose``: see ``llmq_fx/data/SOURCES.md``), text files and token-id files,
turned into token streams and windows for calibration and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmq_fx.errors import CalibrationError, CheckpointError

__all__ = [
    "load_text",
    "tokenize",
    "calibration_set",
    "load_token_ids",
    "is_token_file",
    "BUILTIN_TEXTS",
    "TOKEN_SUFFIXES",
    "DATA",
]

DATA = Path(__file__).parent / "data"
BUILTIN_TEXTS = ("calib", "tune", "eval", "prose")
# Files read as token ids instead of text: NumPy arrays, torch tensors, safetensors.
TOKEN_SUFFIXES = (".npy", ".pt", ".safetensors")


def load_text(name_or_path: str | Path) -> str:
    """Text of a built-in corpus (``calib``, ``eval``) or of a UTF-8 text file.

    Raises ``CheckpointError`` (missing or unreadable file) or ``CalibrationError`` (empty, or not
    UTF-8), each naming the file.
    """
    name = str(name_or_path)
    path = DATA / f"{name}.txt" if name in BUILTIN_TEXTS else Path(name).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a text file")
    if not path.is_file():
        raise CheckpointError(f"text file not found: {path} (built-in corpora: {', '.join(BUILTIN_TEXTS)})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read text file {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"text file {path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"(re-encode it, or pass token ids as {'/'.join(TOKEN_SUFFIXES)})"
        ) from None
    if not text.strip():
        raise CalibrationError(f"text file {path} is empty")
    return text


def is_token_file(name_or_path: str | Path) -> bool:
    """Whether ``--calib``/``--eval`` names a file of token ids (by its suffix) rather than text."""
    return Path(str(name_or_path)).suffix.lower() in TOKEN_SUFFIXES


def load_token_ids(path: str | Path, vocab_size: int | None = None, two_d: bool = True) -> torch.Tensor:
    """An integer ``[N, T]`` array of token ids from ``.npy``, ``.pt`` or ``.safetensors``, as a LongTensor.

    ``.npy`` is read without pickle, ``.pt`` with ``torch.load(weights_only=True)`` (a tensor, or a
    dict holding one, e.g. ``{"input_ids": ...}``), ``.safetensors`` by key ``input_ids`` or its
    only tensor. With ``two_d=False`` a 1-D stream is accepted too. ``vocab_size`` bounds the ids.

    Raises ``CheckpointError`` (missing or unreadable file) or ``CalibrationError`` (wrong dtype,
    shape or range), each naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"token-id file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise CheckpointError(f"{path} is not a NumPy .npy file (no .npy header)")
            ids = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".pt":
            ids = _one_tensor(torch.load(path, map_location="cpu", weights_only=True), path)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            ids = _one_tensor(load_file(str(path)), path)
        else:
            raise CheckpointError(f"{path}: token ids must be {', '.join(TOKEN_SUFFIXES)}, not {suffix or 'no suffix'}")
    except CheckpointError:
        raise
    except Exception as err:  # numpy/torch/safetensors each raise their own types for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"cannot read token ids from {path}: {first}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"token ids in {path} must be integers, got {ids.dtype}")
    if (two_d and ids.dim() != 2) or ids.dim() not in (1, 2):
        want = "[N, T]" if two_d else "[N, T] or [T]"
        raise CalibrationError(f"token ids in {path} must be an {want} array, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise CalibrationError(f"token-id file {path} is empty")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise CalibrationError(
            f"token ids in {path} range over [{lo}, {hi}], outside the model's vocabulary [0, {vocab_size})"
        )
    return ids.long()


def _one_tensor(obj, path: Path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        if "input_ids" in obj:
            return obj["input_ids"]
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    raise CalibrationError(f"{path} must hold one tensor of token ids (or a key 'input_ids'), got {type(obj).__name__}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """A 1-D LongTensor token stream (no special tokens between documents)."""
    if tokenizer is None:
        raise CheckpointError(
            f"this model has no tokenizer; pass token ids instead of text (a file ending in {', '.join(TOKEN_SUFFIXES)})"
        )
    # verbose=False: a corpus is longer than the model's context on purpose; it is cut into windows later.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_set(tokens: torch.Tensor, n_samples: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` consecutive non-overlapping windows from the start of a token stream."""
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"calibration needs at least one window of at least one token, got {n_samples} x {seq_len}")
    n = min(n_samples, tokens.numel() // seq_len)
    if n == 0:
        raise CalibrationError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)
