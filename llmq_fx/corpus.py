"""Built-in text (``calib``/``eval``, see ``llmq_fx/data/SOURCES.md``) and token streams for calibration and evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from llmq_fx.errors import CalibrationError, CheckpointError

__all__ = ["load_text", "tokenize", "calibration_set", "BUILTIN_TEXTS", "DATA"]

DATA = Path(__file__).parent / "data"
BUILTIN_TEXTS = ("calib", "eval")


def load_text(name_or_path: str | Path) -> str:
    """Text of a built-in corpus (``calib``, ``eval``) or of a UTF-8 text file."""
    name = str(name_or_path)
    path = DATA / f"{name}.txt" if name in BUILTIN_TEXTS else Path(name).expanduser()
    if not path.is_file():
        raise CheckpointError(f"text file not found: {path} (built-in corpora: {', '.join(BUILTIN_TEXTS)})")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise CalibrationError(f"text file {path} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """A 1-D LongTensor token stream (no special tokens between documents)."""
    if tokenizer is None:
        raise CheckpointError("this model has no tokenizer; pass token ids instead of text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_set(tokens: torch.Tensor, n_samples: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` consecutive non-overlapping windows from the start of a token stream."""
    n = min(n_samples, tokens.numel() // seq_len)
    if n == 0:
        raise CalibrationError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)
