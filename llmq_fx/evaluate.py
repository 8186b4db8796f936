"""Token-level perplexity of a float or quantized graph (or any ``ids -> logits`` callable)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity", "PerplexityResult", "token_windows"]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(tokens: torch.Tensor, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from a 1-D token stream (a trailing partial window is dropped)."""
    tokens = tokens.reshape(-1)
    n = tokens.numel() // seq_len
    if n_windows is not None:
        n = min(n, n_windows)
    if n == 0:
        raise ValueError(f"token stream of {tokens.numel()} tokens is shorter than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def perplexity(
    model,
    tokens: torch.Tensor,
    seq_len: int = 512,
    n_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens.

    Each window is scored independently (no context carried over): the loss covers tokens 2..T of
    every window, predicted from the tokens before them, the usual WikiText-style protocol.

    Args:
        model: ``model(ids [b, T]) -> logits [b, T, V]`` (a GraphModule, an HF model, an ONNX runner).
        tokens: a 1-D LongTensor token stream.
    """
    windows = token_windows(tokens, seq_len, n_windows)
    device = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), torch.device("cpu"))
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        logits = _logits(model, batch.to(device)).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1).to(logits.device), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, windows.shape[0], seq_len)
