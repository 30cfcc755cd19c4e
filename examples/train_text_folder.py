"""Train a small Titans LM (MAC) on a folder of .txt files, then continue a prompt with it.

    python examples/train_text_folder.py ../shared/data/books --out runs/example --steps 300

The folder holds train/ and valid/ subfolders of .txt files, or .txt files that are split by file. The run folder
gets a tokenizer, checkpoints and a log; `python -m mlx_titans.generate --model runs/example` runs its newest
checkpoint. Stop and rerun with --resume to continue. On a Mac this takes minutes; on the Linux CPU backend, much
longer.
"""

import argparse
import json

from mlx_titans.generate import main as generate
from mlx_titans.train import main as train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--out", default="runs/example")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    memory = {"chunk_size": 32, "heads": 2, "max_grad_norm": 1.0}  # the clamp keeps the inner loop stable
    argv = (
        ["--resume", args.out]
        if args.resume
        else [
            "--data",
            args.folder,
            "--vocab-size",
            "2048",
            "--out",
            args.out,
            "--variant",
            "mac",
            "--dim",
            "128",
            "--layers",
            "2",
            "--heads",
            "4",
            "--window",
            "64",
            "--memory",
            json.dumps(memory),
            "--seq-len",
            "256",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--warmup",
            "20",
            "--eval-every",
            "100",
            "--checkpoint-every",
            "100",
        ]
    )
    summary = train(argv + ["--steps", str(args.steps)])
    print(f"held-out perplexity {summary['valid_ppl']:.1f} after {summary['step']} steps")
    generate(["--model", args.out, "-p", "The", "-m", "40", "--temp", "0.8", "--seed", "0"])


if __name__ == "__main__":
    main()
