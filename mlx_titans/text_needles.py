"""Text needles in a haystack of real text, as RULER writes them, through a model's own tokenizer.

    haystack = read_haystack("../shared/data/books/valid", tokenizer)   # or make_haystack(ids, tokenizer)
    sample = make_sample("number", tokenizer, haystack, length=4096, depth=0.1, rng=np.random.default_rng(0))
    sample.prompt   # token ids: haystack with " The special magic number is 4817263." at 10% depth, then
                    # "\n\nWhat is the special magic number?"
    is_answered(generated_text, sample.values)          # every value appears in the greedy continuation

Tasks: passkey (5 digits), number (7 digits), uuid (RULER's UUID), multikey (four numbers under four keys, one
asked), multivalue (four numbers under one key, all asked). The needle goes in at a sentence end of the haystack
nearest the chosen depth, and every inserted piece starts with a space or a newline, where a byte-level BPE splits
words anyway. The question follows the haystack after a blank line, as
`mlx_titans.generate` joins a --file context and a --prompt. `training_row` appends the answer sentence
(" The special magic number is 4817263.") with a loss mask on it: the rows a model learns the format from.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TASKS = ("passkey", "number", "uuid", "multikey", "multivalue")
KEY_WORDS = (
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lagoon",
    "maple",
    "nickel",
    "orchid",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "tundra",
    "umber",
    "violet",
    "willow",
    "zephyr",
)
MULTI = 4  # needles of the multi-key and multi-value tasks


@dataclass
class NeedleSample:
    prompt: list  # token ids: haystack with the needle(s), then the question
    values: list  # the strings the answer must contain
    answer: str  # the answer sentence a trained model writes, beginning with a space
    needle_index: int  # where the (asked) needle starts in `prompt`, in tokens


def _key(rng) -> str:
    a, b = rng.choice(len(KEY_WORDS), 2, replace=False)
    return f"{KEY_WORDS[a]}-{KEY_WORDS[b]}"


def _digits(rng, n: int) -> str:
    return str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, n - 1))


def _uuid(rng) -> str:
    hexes = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, 32))
    return f"{hexes[:8]}-{hexes[8:12]}-{hexes[12:16]}-{hexes[16:20]}-{hexes[20:]}"


def needle_texts(task: str, rng) -> tuple:
    """(needle sentences, index of the asked one, question, answer sentence, values) of one sample."""
    if task == "passkey":
        v = _digits(rng, 5)
        return (
            [f" The pass key is {v}. Remember it. {v} is the pass key."],
            0,
            "What is the pass key?",
            f" The pass key is {v}.",
            [v],
        )
    if task == "number":
        v = _digits(rng, 7)
        return (
            [f" The special magic number is {v}."],
            0,
            "What is the special magic number?",
            f" The special magic number is {v}.",
            [v],
        )
    if task == "uuid":
        key, v = _key(rng), _uuid(rng)
        return (
            [f" The special magic uuid for {key} is {v}."],
            0,
            f"What is the special magic uuid for {key}?",
            f" The special magic uuid for {key} is {v}.",
            [v],
        )
    if task == "multikey":
        keys, values = [], [_digits(rng, 7) for _ in range(MULTI)]
        while len(keys) < MULTI:
            key = _key(rng)
            keys += [key] if key not in keys else []
        asked = int(rng.integers(MULTI))
        needles = [f" The special magic number for {k} is {v}." for k, v in zip(keys, values)]
        return (
            needles,
            asked,
            f"What is the special magic number for {keys[asked]}?",
            f" The special magic number for {keys[asked]} is {values[asked]}.",
            [values[asked]],
        )
    if task == "multivalue":
        key, values = _key(rng), [_digits(rng, 7) for _ in range(MULTI)]
        needles = [f" One of the special magic numbers for {key} is {v}." for v in values]
        return (
            needles,
            0,
            f"What are all the special magic numbers for {key}?",
            f" The special magic numbers for {key} are {', '.join(values)}.",
            values,
        )
    raise ValueError(f"unknown text needle task {task!r}; choose from {', '.join(TASKS)}")


@dataclass
class Haystack:
    ids: np.ndarray  # token ids of real text
    sentence_ends: np.ndarray  # per position: does this token end a sentence?


def make_haystack(ids, tokenizer) -> Haystack:
    """Token ids of real text, with where its sentences end (a token whose text ends in . ! or ?, quotes aside)."""
    ids = np.asarray(ids)
    unique = np.unique(ids)
    ends = np.zeros(int(unique[-1]) + 1, bool)
    ends[unique] = [tokenizer.decode([int(i)]).rstrip("\"'”’ ").endswith((".", "!", "?")) for i in unique]
    return Haystack(ids, ends[ids])


def read_haystack(folder, tokenizer) -> Haystack:
    """Every .txt file of `folder`, sorted by name, encoded and joined: a haystack of real text."""
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise ValueError(f"no .txt files in {folder} for a haystack")
    ids = [i for f in files for i in _encode(tokenizer, f.read_text(encoding="utf-8", errors="replace"))]
    return make_haystack(ids, tokenizer)


def _insertion_point(ends: np.ndarray, fraction: float) -> int:
    """The sentence end nearest `fraction` of the stretch (an index after that token), or that fraction's index."""
    candidates = np.flatnonzero(ends) + 1
    target = fraction * len(ends)
    return int(candidates[np.abs(candidates - target).argmin()]) if len(candidates) else round(target)


def make_sample(task: str, tokenizer, haystack: Haystack, length: int, depth: float, rng) -> NeedleSample:
    """A sample whose prompt is `length` tokens: haystack (a random stretch of `haystack.ids`) with the needle at
    `depth` (0 = start, 1 = end; the other needles of multi-key / multi-value spread at random), then the question.
    `tokenizer` is an mlx-lm TokenizerWrapper or a transformers tokenizer (encode without special tokens, decode)."""
    return _assemble(needle_texts(task, rng), task, tokenizer, haystack, length, depth, rng)


def training_row(task: str, tokenizer, haystack: Haystack, length: int, rng):
    """(inputs, targets, loss_mask), each `length` long, of one sample at a uniform depth whose answer sentence
    ends the row: the model reads inputs, predicts targets (shifted by one), and the loss counts the answer."""
    texts = needle_texts(task, rng)
    answer_ids = _encode(tokenizer, texts[3])
    sample = _assemble(texts, task, tokenizer, haystack, length + 1 - len(answer_ids), float(rng.uniform()), rng)
    ids = np.array(sample.prompt + answer_ids, dtype=np.int32)
    mask = np.zeros(length, bool)
    mask[length - len(answer_ids) :] = True
    return ids[:-1], ids[1:], mask


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _assemble(texts, task, tokenizer, haystack: Haystack, length, depth, rng) -> NeedleSample:
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needles, asked, question, answer, values = texts
    needle_ids = [_encode(tokenizer, n) for n in needles]
    question_ids = _encode(tokenizer, "\n\n" + question)
    fill = length - sum(map(len, needle_ids)) - len(question_ids)
    if fill < 1:
        raise ValueError(
            f"length {length} is too short for a {task} sample ({length - fill} tokens of needle and question)"
        )
    if len(haystack.ids) <= fill:
        raise ValueError(f"the haystack has {len(haystack.ids)} tokens; a sample of {length} needs over {fill}")
    start = int(rng.integers(0, len(haystack.ids) - fill))
    hay, ends = haystack.ids[start : start + fill], haystack.sentence_ends[start : start + fill]
    points = [_insertion_point(ends, depth if i == asked else float(rng.uniform())) for i in range(len(needles))]
    prompt, previous, needle_index = [], 0, 0
    for i in sorted(range(len(needles)), key=lambda i: (points[i], i)):
        prompt += hay[previous : points[i]].tolist()
        previous = points[i]
        if i == asked:
            needle_index = len(prompt)
        prompt += needle_ids[i]
    prompt += hay[previous:].tolist() + question_ids
    return NeedleSample(prompt, values, answer, needle_index)


def is_answered(text: str, values) -> bool:
    """RULER's string match: every value appears in the generated text."""
    return all(v in text for v in values)
