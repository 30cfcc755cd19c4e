"""Synthetic long-context tasks: single needle in a haystack (RULER's S-NIAH: pass-key, number, word, UUID) and
multi-query associative recall (MQAR).

Everything lives in a small task vocabulary: PAD, NEEDLE, QUERY markers, ten digits, then symbols used for keys,
words and the haystack. A word's value is 6 symbols from the whole vocabulary (thousands of classes, most of them
tokens a book haystack rarely holds); a UUID's is 8 hex characters as RULER writes its UUIDs: the ten digits and
the first six symbols for a-f, a 16-letter alphabet (in a book haystack those six are text tokens too, as RULER's
letters are: with benchmarks/reproduce.py's tokenizer, <|endoftext|> ! " # $ %). The haystack is uniform noise, or
book text folded into the symbol range (token id modulo the number of symbols), which keeps natural text's statistics
without clashing with the markers.

`make_batch(task, batch, length, rng, vocab, haystack=None)` returns numpy arrays (inputs, targets, loss_mask),
each (batch, length): the model reads `inputs`, predicts `targets` (inputs shifted by one), and only the answer
positions count (loss_mask). A sample is answered when every masked position's argmax equals its target.
"""

import numpy as np

PAD, NEEDLE, QUERY = 0, 1, 2
DIGITS = np.arange(3, 13)
FIRST_SYMBOL = 13
HEX = np.concatenate([DIGITS, np.arange(FIRST_SYMBOL, FIRST_SYMBOL + 6)])  # a UUID's alphabet: 0-9, then a-f
TASKS = ("passkey", "number", "word", "uuid", "mqar")
MIN_VOCAB = 64


def _symbols(vocab, rng, shape):
    return rng.integers(FIRST_SYMBOL, vocab, size=shape)


def _haystack(rng, vocab, n, haystack):
    if haystack is None:
        return _symbols(vocab, rng, n)
    start = rng.integers(0, len(haystack) - n)
    return FIRST_SYMBOL + haystack[start : start + n] % (vocab - FIRST_SYMBOL)


def _needle_sample(task, rng, vocab, length, haystack):
    if task == "passkey":
        key, value = np.array([], dtype=np.int64), rng.choice(DIGITS, 5)
    elif task == "number":
        key, value = _symbols(vocab, rng, 2), rng.choice(DIGITS, 7)
    elif task == "word":
        key, value = _symbols(vocab, rng, 2), _symbols(vocab, rng, 6)
    else:  # uuid: a UUID's first group
        key, value = _symbols(vocab, rng, 2), rng.choice(HEX, 8)
    needle = np.concatenate([[NEEDLE], key, value])
    question = np.concatenate([[QUERY], key])
    fill = length + 1 - len(needle) - len(question) - len(value)
    if fill < 1:
        raise ValueError(f"length {length} is too short for a {task} sample")
    hay = _haystack(rng, vocab, fill, haystack)
    depth = rng.integers(0, fill + 1)
    seq = np.concatenate([hay[:depth], needle, hay[depth:], question, value])
    answer = np.zeros(length + 1, bool)
    answer[-len(value) :] = True
    return seq, answer


def _mqar_sample(rng, vocab, length, haystack, pairs=8):
    """`pairs` key->value pairs up front, a haystack, then every key asked in a random order."""
    keys = rng.choice(np.arange(FIRST_SYMBOL, vocab), pairs, replace=False)
    values = _symbols(vocab, rng, pairs)
    order = rng.permutation(pairs)
    context = np.stack([keys, values], 1).reshape(-1)
    queries = np.stack([np.full(pairs, QUERY), keys[order], values[order]], 1).reshape(-1)
    fill = length + 1 - len(context) - len(queries)
    if fill < 1:
        raise ValueError(f"length {length} is too short for an mqar sample")
    seq = np.concatenate([context, _haystack(rng, vocab, fill, haystack), queries])
    answer = np.zeros(length + 1, bool)
    answer[len(seq) - len(queries) + 2 :: 3] = True
    return seq, answer


def make_batch(task: str, batch: int, length: int, rng: np.random.Generator, vocab: int, haystack=None):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if vocab < MIN_VOCAB:
        raise ValueError(f"the tasks need a vocabulary of at least {MIN_VOCAB} tokens, got {vocab}")
    samples = [
        _mqar_sample(rng, vocab, length, haystack)
        if task == "mqar"
        else _needle_sample(task, rng, vocab, length, haystack)
        for _ in range(batch)
    ]
    seqs = np.stack([s for s, _ in samples]).astype(np.int32)
    answers = np.stack([a for _, a in samples])
    return seqs[:, :-1], seqs[:, 1:], answers[:, 1:]


def answered(logits, targets, loss_mask):
    """Per sample: is every answer token the argmax? (numpy or mlx arrays in, numpy bools out)."""
    hit = np.asarray(logits.argmax(-1)) == np.asarray(targets)
    mask = np.asarray(loss_mask)
    return (hit | ~mask).all(-1)
