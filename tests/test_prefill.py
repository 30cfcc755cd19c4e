"""mlx_titans.prefill: one helper for long inputs through any model's cache."""

import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from mlx_titans import TitansLM, TitansLMConfig, prefill
from test_qwen import assert_close, prompt


def test_prefill_serves_titans_lm_and_stock_mlx_lm_models(hf):
    """The one prefill helper: the last position's logits of a TitansLM and of a stock mlx-lm Qwen, fed in steps,
    equal their uncached forward; progress follows each call; no tokens is an error."""
    tokens = prompt(23)
    titans_lm = TitansLM(
        TitansLMConfig(
            variant="mag", vocab_size=1000, dim=32, layers=2, heads=2, window=6, memory={"chunk_size": 4, "heads": 2}
        )
    )
    stock, _ = load_model(hf["qwen2"])
    for model in (titans_lm, stock):
        done = []
        last = prefill(model, tokens, make_prompt_cache(model), 5, lambda d, n: done.append((d, n)))
        assert_close(last, model(tokens)[:, -1], tol=1e-4)
        assert done == [(5, 23), (10, 23), (15, 23), (20, 23), (22, 23), (23, 23)]
    with pytest.raises(ValueError, match="at least one token"):
        prefill(stock, tokens[:, :0], make_prompt_cache(stock), 5)
