"""A small Qwen3-architecture base model pretrained from scratch on the books with mlx-lm, full attention at --seq-len,
with text needle rows in the mix so that it retrieves within its context: the frozen base TitansQwen's memory is
trained onto. Stages, each skipped when its output in WORK exists:

    tokenizer  WORK/tokenizer   byte-level BPE of --vocab-size trained on DATA/train
    model      WORK/model       random qwen3 (mlx_titans.corpus.PRESET, --sizes to change) with that tokenizer
    data       WORK/data        train.jsonl (--tokens) / valid.jsonl (--valid-tokens) in mlx-lm's text format
    train      WORK/adapters    mlx-lm's lora --fine-tune-type full with every weight trained, configured by
                                WORK/train.yaml (AdamW, warmup then cosine decay); WORK/adapters/finished.json when done
    fuse       WORK/base        mlx_lm fuse: a standalone model folder that mlx_lm.load reads

    python -m benchmarks.qwen_base                         # tokenizer, model, data; prints the train and fuse commands
    python -m benchmarks.qwen_base train fuse              # runs them (streaming mlx-lm's progress)

--tokens defaults to the tokens the training reads (iters x batch size x seq len), so no row is seen twice.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from mlx_titans.corpus import PRESET, load_hf_tokenizer, text_files, write_data, write_random_model, write_tokenizer
from mlx_titans.files import atomic_folder, run_reporting_errors, write_json_atomic
from mlx_titans.text_needles import TASKS

STAGES = ("tokenizer", "model", "data", "train", "fuse")
OUTPUT_SETTINGS = (
    "data",
    "vocab_size",
    "sizes",
    "seq_len",
    "tokens",
    "valid_tokens",
    "needle_fraction",
    "needle_tasks",
    "seed",
)


def parse_sizes(pairs) -> dict:
    sizes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in PRESET or not value.isdigit():
            raise ValueError(f"--sizes takes KEY=INTEGER with KEY one of {', '.join(PRESET)}, got {pair!r}")
        sizes[key] = int(value)
    return sizes


def train_config(work: Path, args) -> dict:
    """mlx-lm lora's YAML options: AdamW, a linear warmup of 5% of the iterations, then cosine decay to lr / 10."""
    warmup = max(1, args.iters // 20)
    return {
        "model": str(work / "model"),
        "data": str(work / "data"),
        "adapter_path": str(work / "adapters"),
        "train": True,
        "fine_tune_type": "full",
        "num_layers": -1,
        "optimizer": "adamw",
        "seed": args.seed,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "learning_rate": args.learning_rate,
        "lr_schedule": {
            "name": "cosine_decay",
            "arguments": [args.learning_rate, max(1, args.iters - warmup), args.learning_rate / 10],
            "warmup": warmup,
        },
        "max_seq_length": args.seq_len + 1,  # a row of seq_len tokens plus the eos mlx-lm appends
        "steps_per_report": args.steps_per_report,
        "steps_per_eval": args.steps_per_eval,
        "val_batches": args.val_batches,
        "save_every": args.save_every,
    }


def check_settings(work: Path, settings: dict) -> None:
    """The outputs already in WORK must have been made with these settings (recorded in WORK/settings.json)."""
    path = work / "settings.json"
    if path.is_file() and any((work / name).exists() for name in ("tokenizer", "model", "data")):
        made = json.loads(path.read_text())
        for key in OUTPUT_SETTINGS:
            if made.get(key) != settings[key]:
                raise ValueError(
                    f"{work} was made with {key} {made.get(key)!r}, not {settings[key]!r}; use another "
                    "--work or the same settings"
                )
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def require(work: Path, name: str, stage: str) -> None:
    if not (work / name).exists():
        raise ValueError(f"the {stage} stage needs {work / name}: run the stage that writes it first")


def run_command(command: list) -> None:
    print("$ " + shlex.join(command), flush=True)
    if subprocess.run(command).returncode:
        raise RuntimeError(f"{command[2]} failed (its output is above)")


def run(args) -> None:
    work, data = Path(args.work), Path(args.data)
    stages = args.stages or ["tokenizer", "model", "data"]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    if args.seq_len < 64 or args.iters < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        raise ValueError("--seq-len must be at least 64, --iters and --batch-size positive, --learning-rate > 0")
    if not 0 <= args.needle_fraction <= 1:
        raise ValueError(f"--needle-fraction must be in [0, 1], got {args.needle_fraction}")
    tokens = args.tokens or args.iters * args.batch_size * args.seq_len
    settings = {
        "data": str(data),
        "vocab_size": args.vocab_size,
        "sizes": parse_sizes(args.sizes),
        "seq_len": args.seq_len,
        "tokens": tokens,
        "valid_tokens": args.valid_tokens,
        "needle_fraction": args.needle_fraction,
        "needle_tasks": args.needle_tasks,
        "seed": args.seed,
    }
    check_settings(work, settings)

    if "tokenizer" in stages and not (work / "tokenizer").exists():
        print(f"training a {args.vocab_size}-token BPE on {data / 'train'}", flush=True)
        write_tokenizer(work / "tokenizer", text_files(data / "train"), args.vocab_size)
    if "model" in stages and not (work / "model").exists():
        require(work, "tokenizer", "model")
        config = write_random_model(work / "model", work / "tokenizer", args.seed, **settings["sizes"])
        print(f"wrote {work / 'model'}: " + ", ".join(f"{k} {config[k]}" for k in (*PRESET, "vocab_size")))
    if "data" in stages and not (work / "data").exists():
        require(work, "tokenizer", "data")
        summary = write_data(
            work / "data",
            load_hf_tokenizer(work / "tokenizer"),
            data / "train",
            data / "valid",
            args.seq_len,
            tokens,
            args.valid_tokens,
            args.needle_fraction,
            args.seed,
            args.needle_tasks,
        )
        print(f"wrote {work / 'data'}: {summary}")

    finished = work / "adapters" / "finished.json"
    train = [sys.executable, "-m", "mlx_titans.corpus", "-c", str(work / "train.yaml")]
    fuse = [
        sys.executable,
        "-m",
        "mlx_lm",
        "fuse",
        "--model",
        str(work / "model"),
        "--adapter-path",
        str(work / "adapters"),
        "--save-path",
    ]
    if not finished.exists():
        (work / "train.yaml").write_text(yaml.safe_dump(train_config(work, args), sort_keys=False))
        if "train" in stages:
            require(work, "model", "train")
            require(work, "data", "train")
            run_command(train)
            write_json_atomic(finished, {"command": shlex.join(train), "config": train_config(work, args)})
    if "fuse" in stages and not (work / "base").exists():
        require(work, "adapters/finished.json", "fuse")
        with atomic_folder(work / "base") as tmp:
            run_command(fuse + [str(tmp)])
    if not finished.exists() or not (work / "base").exists():
        print("train: " + shlex.join(["python", *train[1:]]))
        print("fuse:  " + shlex.join(["python", *fuse[1:], str(work / "base")]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.qwen_base", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stages", nargs="*", help=f"stages to run, of {', '.join(STAGES)} (default: tokenizer model data)")
    p.add_argument("--work", default="runs/qwen_base", help="folder of every stage's output")
    p.add_argument("--data", default="../shared/data/books", help="folder with train/ and valid/ .txt files")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument(
        "--sizes", nargs="*", default=[], metavar="KEY=N", help=f"model sizes other than the preset {PRESET}"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (full attention over all of them)")
    p.add_argument("--tokens", type=int, help="train.jsonl tokens (default: iters x batch size x seq len)")
    p.add_argument("--valid-tokens", type=int, default=262144)
    p.add_argument("--needle-fraction", type=float, default=0.1, help="fraction of rows that are text needle rows")
    p.add_argument("--needle-tasks", nargs="+", default=list(TASKS), choices=TASKS, help="their tasks, drawn uniformly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--steps-per-report", type=int, default=50)
    p.add_argument("--steps-per-eval", type=int, default=250)
    p.add_argument("--val-batches", type=int, default=25)
    p.add_argument("--save-every", type=int, default=500)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
