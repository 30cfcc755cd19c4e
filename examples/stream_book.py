"""Stream a long book through a trained TitansLM in constant memory, printing loss and peak memory per block.

    python examples/stream_book.py --model runs/example --book ../shared/data/books/valid/SOME_BOOK.txt

The model's cache keeps the attention window (or segment) and the memory state only, so peak memory stays
flat however long the book is, while the memory keeps learning from what it reads.
"""

import argparse
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from tokenizers import Tokenizer

from mlx_titans.model import checkpoint_folder, load_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a TitansLM checkpoint folder, or a training run's (its newest)")
    p.add_argument("--book", required=True, help="a UTF-8 text file")
    p.add_argument("--block", type=int, default=1024, help="tokens per forward call")
    args = p.parse_args()
    model = load_model(args.model)
    tokenizer = Tokenizer.from_file(str(checkpoint_folder(args.model) / "tokenizer.json"))
    ids = mx.array(tokenizer.encode(Path(args.book).read_text(encoding="utf-8")).ids)[None]
    cache = model.make_cache()
    for start in range(0, ids.shape[1] - 1, args.block):
        inputs, targets = ids[:, start : start + args.block], ids[:, start + 1 : start + args.block + 1]
        logits = model(inputs[:, : targets.shape[1]], cache)
        loss = nn.losses.cross_entropy(logits, targets).mean()
        mx.eval(loss, [c.state for c in cache])
        print(
            f"tokens {start + targets.shape[1]:>8}  ppl {math.exp(loss.item()):8.2f}  "
            f"peak memory {mx.get_peak_memory() / 2**20:7.1f} MiB"
        )


if __name__ == "__main__":
    main()
