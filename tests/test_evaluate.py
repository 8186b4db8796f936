import math

import pytest
import torch

from llmq_fx.evaluate import perplexity, token_windows


def test_perplexity_equals_hf_loss(opt_model, opt_gm):
    tokens = torch.randint(0, 96, (75,), generator=torch.Generator().manual_seed(5))
    res = perplexity(opt_gm, tokens, seq_len=20, batch_size=2)
    assert res.windows == 3 and res.tokens == 3 * 19  # trailing 15 tokens dropped
    with torch.no_grad():
        w = tokens[:60].reshape(3, 20)
        losses = [opt_model(input_ids=w[i : i + 1], labels=w[i : i + 1], use_cache=False).loss.item() for i in range(3)]
    assert res.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert perplexity(opt_gm, tokens, seq_len=20, n_windows=1).ppl == pytest.approx(math.exp(losses[0]), rel=1e-5)


def test_too_short_stream_is_an_error():
    with pytest.raises(ValueError, match="shorter than one window"):
        token_windows(torch.arange(10), 512)
