"""Needle-in-a-haystack and MQAR accuracy of TitansLM checkpoints against context length; JSON + PNG.

    python -m benchmarks.niah --models runs/mac runs/swa --tasks passkey number word \\
        --lengths 2048 4096 8192 16384 --samples 100 --out benchmarks/results/niah.json

Each sample is read in blocks of --block tokens through the model's cache (memory stays bounded for the
windowed variants), and counts as answered when every answer token is the argmax.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.machine import device_name
from mlx_titans.files import write_json_atomic
from mlx_titans.model import load_model
from mlx_titans.niah import accuracy, plot
from mlx_titans.tasks import TASKS
from mlx_titans.train import find_checkpoint, json_arg


def checkpoint_of(path) -> Path:
    """A TitansLM checkpoint folder as it is, or a training run's newest checkpoint."""
    path = Path(path)
    return path if (path / "config.json").is_file() else find_checkpoint(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True,
                   help="TitansLM checkpoint folders, or training runs (their newest checkpoint)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["passkey", "number", "word"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=2048, help="tokens per forward call")
    p.add_argument("--haystack", help="a .txt file or folder of books whose bytes fill the haystack (default: noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", type=json_arg, default=None,
                   help='MemoryConfig fields to run the models with, e.g. \'{"max_decay": 0.1}\': forget ten times '
                        "slower than trained (README: what the forget gate does beyond the training length)")
    p.add_argument("--out", default="niah.json", help="JSON results; the plot goes beside it as .png")
    args = p.parse_args(argv)

    haystack = None
    if args.haystack:
        files = sorted(Path(args.haystack).rglob("*.txt")) if Path(args.haystack).is_dir() else [Path(args.haystack)]
        if not files:
            sys.exit(f"error: no .txt files at {args.haystack}")
        haystack = np.frombuffer(b"\n".join(f.read_bytes() for f in files), dtype=np.uint8).astype(np.int64)
    rows = []
    work = [(m, t, n) for m in args.models for t in args.tasks for n in args.lengths]
    models = {}
    for path, task, length in tqdm(work, desc="niah"):
        if path not in models:
            try:
                models[path] = load_model(checkpoint_of(path), memory=args.memory)
            except (ValueError, TypeError, FileNotFoundError) as e:
                sys.exit(f"error: {e}")
        acc = accuracy(models[path], task, length, args.samples, args.batch, args.seed, args.block, haystack)
        rows.append({"model": Path(path).name, "variant": models[path].config.variant, "task": task,
                     "length": length, "accuracy": acc, "samples": args.samples, "memory": args.memory})
        tqdm.write(f"model={Path(path).name} task={task} length={length} accuracy={100 * acc:.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"device": device_name(), "command": " ".join(sys.argv), "rows": rows})
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
