"""Training data: folders of text documents (.txt files, or mlx-lm's train.jsonl / valid.jsonl) to token streams,
random training windows, a fixed validation set, synthetic tasks, and mixtures of needle samples hidden in book text
with plain text windows (benchmarks/reproduce.py's training data).

Every source gives global batches `(inputs, targets, loss_mask)` of numpy arrays, each (batch, length); under
data parallelism each process trains on its own rows of the global batch (`shard`).
"""

import importlib
import json
import os
from functools import cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .files import fingerprint
from .tasks import FIRST_SYMBOL, make_batch
from .tokenizer import EOS, read_text


def split_files(folder) -> dict:
    """{"train": [...], "valid": [...]} document files: .txt files of train/ and valid/ subfolders; else mlx-lm's
    text layout, train.jsonl and valid.jsonl (each row {"text": ...} a document); else every 10th .txt file is valid."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    if (folder / "train").is_dir() and (folder / "valid").is_dir():
        splits = {split: sorted((folder / split).rglob("*.txt")) for split in ("train", "valid")}
    elif (folder / "train.jsonl").is_file() or (folder / "valid.jsonl").is_file():
        splits = {split: [folder / f"{split}.jsonl"] for split in ("train", "valid")}
        for split, (file,) in splits.items():
            if not file.is_file():
                raise ValueError(
                    f"data folder {folder} has no {split}.jsonl (mlx-lm's layout needs train.jsonl and valid.jsonl)"
                )
    else:
        files = sorted(folder.rglob("*.txt"))
        if not files:
            raise ValueError(f"data folder {folder} has no .txt files, nor train.jsonl and valid.jsonl")
        if len(files) == 1:
            raise ValueError(f"data folder {folder} has one .txt file; a split by file needs at least 2")
        splits = {"train": [f for i, f in enumerate(files) if i % 10], "valid": files[::10]}
    for split, files in splits.items():
        if not files:
            raise ValueError(f"data folder {folder} has no .txt files for the {split} split")
    return splits


def documents(file) -> list:
    """The documents of a file: a .txt file is one; each row of a .jsonl file is one, its "text" (mlx-lm's format)."""
    if Path(file).suffix != ".jsonl":
        return [read_text(file)]
    texts = []
    for number, line in enumerate(read_text(file).split("\n"), 1):  # not splitlines: rows may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} line {number} is not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f'{file} line {number} has no "text" string (mlx-lm\'s text format: {{"text": ...}})')
        texts.append(row["text"])
    if not texts:
        raise ValueError(f"{file} has no rows")
    return texts


def token_stream(files, tokenizer, cache_dir, name: str) -> np.ndarray:
    """The files' documents encoded and joined, each followed by EOS; cached as a .npy keyed by the tokenizer and the
    files' paths, sizes and modification times."""
    key = fingerprint(
        {
            "tokenizer": tokenizer.to_str(),
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }
    )
    path = Path(cache_dir) / f"tokens-{name}-{key}.npy"
    if not path.exists():
        dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
        eos = np.array([tokenizer.token_to_id(EOS)], dtype=dtype)
        parts = [
            part
            for f in tqdm(files, desc=f"encode {name}", unit="file", disable=None)  # on a terminal only
            for text in documents(f)
            for part in (np.array(tokenizer.encode(text).ids, dtype=dtype), eos)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.concatenate(parts))
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _as_batch(windows):
    windows = windows.astype(np.int32)
    return windows[:, :-1], windows[:, 1:], np.ones((len(windows), windows.shape[1] - 1), dtype=np.float32)


def random_windows(tokens, batch: int, length: int, rng):
    """`batch` windows of length + 1 tokens at uniformly random offsets."""
    starts = rng.integers(0, len(tokens) - length, size=batch)
    return _as_batch(np.stack([tokens[s : s + length + 1] for s in starts]))


def valid_windows(tokens, batch: int, length: int, max_batches: int) -> list:
    """Non-overlapping windows spread evenly over the stream: the same batches at every evaluation."""
    windows = (len(tokens) - 1) // length
    n = min(windows // batch, max_batches)
    if n == 0:
        raise ValueError(
            f"the validation stream has {len(tokens)} tokens, fewer than one batch of {batch} x {length + 1}"
        )
    starts = np.arange(n * batch).reshape(n, batch) * (windows // (n * batch)) * length
    return [_as_batch(np.stack([tokens[s : s + length + 1] for s in row])) for row in starts]


@cache
def load_tokens(path: str) -> np.ndarray:
    """A token stream saved as .npy, memory-mapped (once per process)."""
    return np.load(path, mmap_mode="r")


@cache
def text_vocab(path: str) -> int:
    """One more than the largest token id in the stream."""
    return int(load_tokens(path).max()) + 1


def needle_row(task, length, rng, vocab, stream):
    """One S-NIAH sample in the stream's text, its answer tokens weighing length / answer tokens each."""
    inputs, targets, answer = make_batch(task, 1, length, rng, vocab, stream)
    return inputs, targets, (answer * (length / answer.sum())).astype(np.float32)


def mixed_batch(task, batch, length, rng, vocab, tokens, needle_fraction=0.5):
    """A task source for mlx_titans.train: round(batch x needle_fraction) S-NIAH rows, their task drawn uniformly
    per row from `task` (comma-separated), their haystack from the token stream `tokens` (a .npy file) and their
    answer tokens weighing length / answer tokens each; then windows of the stream, every token weighing 1. Text ids
    are shifted by FIRST_SYMBOL, so `vocab` is the text's vocabulary + FIRST_SYMBOL."""
    if not 0 <= needle_fraction <= 1:
        raise ValueError(f"needle_fraction must be in [0, 1], got {needle_fraction}")
    if vocab < FIRST_SYMBOL + text_vocab(str(tokens)):
        raise ValueError(
            f"vocab {vocab} is too small for {tokens}: its ids need {FIRST_SYMBOL} + {text_vocab(str(tokens))}"
        )
    stream, tasks = load_tokens(str(tokens)), task.split(",")
    needles = round(batch * needle_fraction)
    rows = [needle_row(tasks[rng.integers(len(tasks))], length, rng, vocab, stream) for _ in range(needles)]
    if needles < batch:
        inputs, targets, mask = random_windows(stream, batch - needles, length, rng)
        rows.append((inputs + FIRST_SYMBOL, targets + FIRST_SYMBOL, mask))
    return tuple(np.concatenate(parts) for parts in zip(*rows))


def load_task_source(spec: str):
    """'module:function' -> a synthetic task source: function(task, batch, length, rng, vocab) -> a batch."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load the task source {spec!r} (want 'module:function'): {e}") from None


def shard(batch, rank: int, size: int):
    """This process's rows of a global batch."""
    rows = len(batch[0]) // size
    return tuple(np.asarray(a)[rank * rows : (rank + 1) * rows] for a in batch)
