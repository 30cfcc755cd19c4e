"""Needle accuracy and held-out loss of a language model on real text: TitansQwen or stock mlx-lm, any cache.

    samples = needle_samples("number", tokenizer, haystack, length=4096, count=50, seed=0)
    needle_accuracy(model, tokenizer, samples)                                   # the model's own cache
    answer_loss(model, tokenizer, samples)                      # the answers' loss, read after their prompts
    needle_accuracy(stock, tokenizer, samples, partial(make_prompt_cache, max_kv_size=4100))   # mlx-lm's rotating
    window_losses(model, *text_windows(haystack.ids, length=8192, count=16), 4096, model.titans.first_beyond_window)

`make_cache(model)` makes the cache a prompt is read through: mlx_lm.models.cache.make_prompt_cache (the default)
gives a TitansQwen its own bounded cache and a stock mlx-lm model full attention (KVCache), and with max_kv_size=W
mlx-lm's RotatingKVCache of W keys, 4 of them sinks. Prompts go through the cache `step` tokens per call
(mlx_titans.prefill), so memory is bounded by the cache, not the prompt; then greedy decoding continues in the same
cache. A sample is answered when the greedy continuation, cut at the first end-of-sequence token, holds every value
(RULER's string match).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .data import valid_windows
from .prefill import prefill
from .text_needles import is_answered, make_sample

PREFILL_STEP = 2048  # tokens per call, as mlx-lm's generate (prefill_step_size)
MARGIN = 16  # greedy tokens beyond the answer sentence's: room for a preamble before the value


def needle_samples(task: str, tokenizer, haystack, length: int, count: int, seed: int, depths=None) -> list:
    """`count` samples of `task` at `length` tokens, drawn from `seed` alone (the same for every model), the asked
    needle at depths evenly spread over [0, 1] (RULER), or cycling through `depths`."""
    rng = np.random.default_rng(seed)
    depths = np.linspace(0, 1, count) if depths is None else [depths[i % len(depths)] for i in range(count)]
    return [make_sample(task, tokenizer, haystack, length, float(d), rng) for d in depths]


def greedy_continuations(
    model, tokenizer, samples, make_cache=make_prompt_cache, step=PREFILL_STEP, margin=MARGIN
) -> list:
    """The greedy continuation texts of samples of one prompt length, read as one batch through a new cache:
    as many tokens as the longest answer sentence has plus `margin`, each cut at its first end-of-sequence token."""
    if len({len(s.prompt) for s in samples}) != 1:
        raise ValueError("greedy_continuations takes samples of one prompt length")
    new_tokens = max(len(tokenizer.encode(s.answer, add_special_tokens=False)) for s in samples) + margin
    cache = make_cache(model)
    logits = prefill(model, mx.array([s.prompt for s in samples]), cache, step)
    tokens = []
    for _ in range(new_tokens):
        tokens.append(logits.argmax(-1))
        logits = model(tokens[-1][:, None], cache=cache)[:, -1]
        mx.eval(tokens[-1], logits)
    texts = []
    for row in np.array(mx.stack(tokens, axis=1)).tolist():
        ends = [i for i, t in enumerate(row) if t in tokenizer.eos_token_ids]
        texts.append(tokenizer.decode(row[: ends[0]] if ends else row))
    return texts


def needle_accuracy(
    model, tokenizer, samples, make_cache=make_prompt_cache, batch=8, step=PREFILL_STEP, progress=None
) -> float:
    """The share of `samples` (one prompt length) whose greedy continuation holds every value, `batch` at a time;
    progress(n) follows each batch of n samples."""
    hits = []
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        texts = greedy_continuations(model, tokenizer, part, make_cache, step)
        hits += [is_answered(text, s.values) for text, s in zip(texts, part)]
        if progress is not None:
            progress(len(part))
    return float(np.mean(hits))


def answer_loss(model, tokenizer, samples, make_cache=make_prompt_cache, batch=8, step=PREFILL_STEP) -> float:
    """Mean next-token loss (nats) of the answer sentences' tokens read after their prompts (teacher forcing): a
    graded view of what greedy accuracy only counts when it is whole. `batch` samples (one prompt length) at a time."""
    total, count = 0.0, 0
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        answers = [list(tokenizer.encode(s.answer, add_special_tokens=False)) for s in part]
        width = max(map(len, answers))
        padded = mx.array([a + [0] * (width - len(a)) for a in answers])
        mask = mx.array([[i < len(a) for i in range(width)] for a in answers])
        cache = make_cache(model)
        first = prefill(model, mx.array([s.prompt for s in part]), cache, step)[:, None]
        logits = mx.concatenate([first, model(padded[:, :-1], cache=cache)], axis=1) if width > 1 else first
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), padded) * mask
        total, count = total + ce.sum().item(), count + int(mask.sum().item())
    return total / count


def text_windows(ids, length: int, count: int) -> tuple:
    """(inputs, targets): `count` windows of `length` tokens spread evenly over the token stream `ids`, and the
    tokens that follow each position."""
    if len(ids) < count * length + 1:
        raise ValueError(f"the haystack has {len(ids)} tokens, fewer than {count} windows of {length} and one more")
    inputs, targets, _ = valid_windows(ids, count, length, 1)[0]
    return inputs, targets


def window_losses(
    model, inputs, targets, window: int, beyond_from: int, make_cache=make_prompt_cache, batch=1, step=PREFILL_STEP
) -> tuple:
    """Mean next-token losses (nats) of windows (count, length) of text (`text_windows`): (of the tokens at
    positions < window, where a window sees everything before them; of those at positions >= beyond_from, e.g.
    TitansQwenConfig.first_beyond_window, where it no longer does; None when there are none). Each window goes
    through a new cache `step` tokens per call, `batch` windows at a time, the logits of one call at a time."""
    position = np.arange(inputs.shape[1])
    first, beyond = position < window, position >= beyond_from
    sums, counts = {"first": mx.array(0.0), "beyond": mx.array(0.0)}, {"first": 0, "beyond": 0}
    for b in range(0, len(inputs), batch):
        rows = slice(b, b + batch)
        cache = make_cache(model)
        for start in range(0, inputs.shape[1], step):
            piece = slice(start, start + step)
            logits = model(mx.array(inputs[rows, piece]), cache=cache).astype(mx.float32)
            ce = nn.losses.cross_entropy(logits, mx.array(targets[rows, piece]))
            for name, keep in (("first", first[piece]), ("beyond", beyond[piece])):
                sums[name] = sums[name] + (ce * mx.array(keep)).sum()
                counts[name] += int(keep.sum()) * ce.shape[0]
            mx.eval(sums, [c.state for c in cache])
            mx.clear_cache()
    return tuple(sums[k].item() / counts[k] if counts[k] else None for k in ("first", "beyond"))
