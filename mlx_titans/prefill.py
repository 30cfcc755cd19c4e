"""prefill: feed a long input through a model's cache in steps, with memory bounded by the cache, not the input."""

from typing import Optional

import mlx.core as mx


def prefill(model, tokens: mx.array, cache: list, step: Optional[int] = None, progress=None) -> mx.array:
    """Feed tokens (batch, n) through `cache`, `step` tokens per call, evaluating the cache after each (and freeing
    MLX's buffer cache) so that memory does not grow with n. Works for TitansLM, TitansQwen (`step` defaults to its
    titans segment_size) and stock mlx-lm models: anything called as model(tokens, cache=cache) whose caches have a
    `state`. The last token goes in a call of its own, so that no step computes the logits of all its tokens (the
    others are never evaluated). Returns the logits of the last position, (batch, vocab); progress(done, n) follows
    each call."""
    n = tokens.shape[1]
    if n == 0:
        raise ValueError("prefill needs at least one token")
    step = step or model.titans.segment_size
    for start in range(0, n - 1, step):
        end = min(start + step, n - 1)
        model(tokens[:, start:end], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        if progress is not None:
            progress(end, n)
    logits = model(tokens[:, -1:], cache=cache)[:, -1]
    if progress is not None:
        progress(n, n)
    return logits


def tokens_seen(cache: list) -> int:
    """The tokens a model's cache has taken in: the offset of its first layer cache that counts them (the ArraysCache
    of a linear-attention layer does not)."""
    return next(c.offset for c in cache if hasattr(c, "offset"))
