"""Needle-in-a-haystack accuracy against context length, JSON + PNG: of TitansLM checkpoints (--models) or of a
TitansQwen folder beside stock mlx-lm (--qwen).

    python -m benchmarks.niah --models runs/mac runs/swa --tasks passkey number word \\
        --lengths 2048 4096 8192 16384 --samples 100 --out benchmarks/results/niah.json

TitansLM: each sample is read in blocks of --block tokens through the model's cache (memory stays bounded for the
windowed variants), and counts as answered when every answer token is the argmax.

    python -m benchmarks.niah --qwen qwen-titans --adapters runs/adapt/adapters --memory-updates on off \\
        --tasks passkey number --lengths 1024 2048 4096 8192 --samples 50 --haystack ../shared/data/books/valid \\
        --perplexity-length 8192 --perplexity-windows 16 --out benchmarks/results/qwen_niah.json

TitansQwen: RULER-style text needles (mlx_titans.text_needles) in the --haystack books, through the model's own
tokenizer; a sample counts as answered when greedy generation gives the value(s) (mlx_titans.text_eval). The same
samples, at depths evenly spread over [0, 1], go to every method (a row of the results):
  "stock mlx-lm, full attention"          load_plain_qwen(FOLDER): the plain Qwen the folder was converted from
  "stock mlx-lm, rotating cache W+4"      the same with mlx-lm's RotatingKVCache of the TitansQwen window + 4 sinks
  "TitansQwen, no adapters"               the folder as it is (converted: gate closed, the window alone)
  "TitansQwen + A"                        with each --adapters folder
  "TitansQwen + A, memory updates off"    the same memory frozen at its learned initial weights (--memory-updates
                                          off): what the gates and LoRA do without the memory's test-time learning
--perplexity-length N adds each method's held-out loss over --perplexity-windows windows of N haystack tokens: of
the tokens in the first W positions (where the window sees everything) and of those beyond the window (from the
first segment whose attention misses a token: TitansQwenConfig.first_beyond_window).
"""

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from benchmarks.machine import command_line, device_name
from mlx_titans.files import write_json_atomic
from mlx_titans.model import load_model
from mlx_titans.niah import accuracy, plot
from mlx_titans.qwen import TitansQwenConfig, build_model, load, load_plain_qwen, read_qwen_config
from mlx_titans.qwen.adapters import load_adapters
from mlx_titans.tasks import TASKS
from mlx_titans.text_eval import answer_loss, needle_accuracy, needle_samples, text_windows, window_losses
from mlx_titans.text_needles import TASKS as TEXT_TASKS
from mlx_titans.text_needles import read_haystack
from mlx_titans.train import json_arg

FROZEN_MEMORY = {"max_lr": 0.0, "max_decay": 0.0}  # no test-time updates: the memory stays at its initial weights
ROTATING_SINKS = 4  # the keys mlx-lm's make_prompt_cache keeps at the start of a RotatingKVCache


def titans_lm(args):
    if any(t not in TASKS for t in args.tasks):
        sys.exit(f"error: --models takes the tasks {', '.join(TASKS)}")
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
                models[path] = load_model(path, memory=args.memory)  # a checkpoint, or a run's newest
            except (ValueError, TypeError, FileNotFoundError) as e:
                sys.exit(f"error: {e}")
        acc = accuracy(models[path], task, length, args.samples, args.batch, args.seed, args.block, haystack)
        rows.append(
            {
                "model": Path(path).name,
                "variant": models[path].config.variant,
                "task": task,
                "length": length,
                "accuracy": acc,
                "samples": args.samples,
                "memory": args.memory,
            }
        )
        tqdm.write(f"model={Path(path).name} task={task} length={length} accuracy={100 * acc:.1f}%")
    return {"rows": rows}, {}


def qwen_methods(args, titans) -> list:
    """(name, what to load: "stock" or (adapters, memory overrides), cache factory) of every method."""
    methods = []
    if "full" in args.stock:
        methods.append(("stock mlx-lm, full attention", "stock", make_prompt_cache))
    if "rotating" in args.stock:
        methods.append(
            (
                f"stock mlx-lm, rotating cache {titans.window}+{ROTATING_SINKS}",
                "stock",
                partial(make_prompt_cache, max_kv_size=titans.window + ROTATING_SINKS),
            )
        )
    methods.append(("TitansQwen, no adapters", (None, args.memory), make_prompt_cache))
    for adapters in args.adapters:
        if "on" in args.memory_updates:
            methods.append((f"TitansQwen + {adapters}", (adapters, args.memory), make_prompt_cache))
        if "off" in args.memory_updates:
            frozen = {**(args.memory or {}), **FROZEN_MEMORY}
            methods.append((f"TitansQwen + {adapters}, memory updates off", (adapters, frozen), make_prompt_cache))
    return methods


def load_method(folder, what):
    if what == "stock":
        return load_plain_qwen(folder)[0]
    adapters, memory = what
    return load(folder, adapter_path=adapters, memory=memory)[0]


def check_adapters(folder, adapters, titans):
    """Refuse, before anything runs, a folder that holds no adapters or adapters trained for another model (the
    base is built lazily: no weights are read)."""
    for path in adapters:
        load_adapters(build_model(Path(folder), titans.to_section(), lazy=True)[0], path, titans.to_section())


def titans_qwen(args, save=lambda results: None):
    """The rows of every method; `save(results so far)` after each method, so that a run cut short keeps them."""
    if any(t not in TEXT_TASKS for t in args.tasks):
        sys.exit(f"error: --qwen takes the tasks {', '.join(TEXT_TASKS)}")
    if not args.haystack:
        sys.exit("error: --qwen needs --haystack, a folder of .txt books")
    try:
        config = read_qwen_config(Path(args.qwen))
        titans = TitansQwenConfig.for_config(config.get("titans", {}), config)
        tokenizer = load_tokenizer(Path(args.qwen), eos_token_ids=config.get("eos_token_id"))
        check_adapters(args.qwen, args.adapters, titans)
        haystack = read_haystack(args.haystack, tokenizer)
        samples = {
            (t, n): needle_samples(t, tokenizer, haystack, n, args.samples, args.seed, args.depths)
            for t in args.tasks
            for n in args.lengths
        }
        windows = (
            text_windows(haystack.ids, args.perplexity_length, args.perplexity_windows)
            if args.perplexity_length
            else None
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    step = args.step or titans.segment_size
    methods = qwen_methods(args, titans)
    rows, perplexity, loaded, model = [], [], None, None
    results = {"titans": titans.to_section(), "rows": rows, "perplexity": perplexity}  # filled as the methods run
    total = len(methods) * (len(samples) * args.samples + (args.perplexity_windows if args.perplexity_length else 0))
    bar = tqdm(total=total, desc="niah", unit="sample")
    for name, what, make_cache in methods:
        if what != loaded:
            model, loaded = None, what  # free the previous model first
            model = load_method(args.qwen, what)
        for (task, length), group in samples.items():
            start = time.perf_counter()
            acc = needle_accuracy(model, tokenizer, group, make_cache, args.batch, step, bar.update)
            loss = answer_loss(model, tokenizer, group, make_cache, args.batch, step)
            rows.append(
                {
                    "method": name,
                    "task": task,
                    "length": length,
                    "accuracy": acc,
                    "answer_loss": loss,
                    "samples": len(group),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            tqdm.write(f"{name}: {task} at {length} tokens: {100 * acc:.1f}%, answer loss {loss:.3f}")
        if args.perplexity_length:
            start = time.perf_counter()
            first, beyond = window_losses(
                model, *windows, titans.window, titans.first_beyond_window, make_cache, step=step
            )
            bar.update(args.perplexity_windows)
            perplexity.append(
                {
                    "method": name,
                    "length": args.perplexity_length,
                    "windows": args.perplexity_windows,
                    "first_window_loss": first,
                    "beyond_window_loss": beyond,
                    "first_window_perplexity": math.exp(first),
                    "beyond_window_perplexity": None if beyond is None else math.exp(beyond),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            tqdm.write(
                f"{name}: loss {first:.4f} in the first {titans.window} positions"
                + ("" if beyond is None else f", {beyond:.4f} beyond the window")
            )
        save(results)
    bar.close()
    return results, {
        "line": "method",
        "window": titans.window,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.niah", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--models", nargs="+", help="TitansLM checkpoint folders, or training runs (their newest checkpoint)"
    )
    models.add_argument("--qwen", help="a TitansQwen folder (mlx_titans.qwen.convert), or a plain Qwen one")
    models.add_argument("--replot", metavar="JSON", help="only draw the plots of a result this command wrote, again")
    p.add_argument("--tasks", nargs="+", help="default: passkey number word (--models), passkey number (--qwen)")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384], help="prompt tokens")
    p.add_argument("--samples", type=int, default=100, help="samples per task and length")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--haystack",
        help="--models: a .txt file or folder of books whose bytes fill the haystack "
        "(default: noise); --qwen: a folder of .txt books, read through the model's tokenizer",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="niah.json", help="JSON results; the plot goes beside it as .png")
    lm = p.add_argument_group("TitansLM (--models)")
    lm.add_argument("--block", type=int, default=2048, help="tokens per forward call")
    p.add_argument(
        "--memory",
        type=json_arg,
        default=None,
        help="MemoryConfig fields to run the models with, e.g. '{\"max_decay\": 0.1}': forget ten times "
        "slower than trained (README: what the forget gate does beyond the training length); with --qwen, the "
        "TitansQwen rows' memory (e.g. '{\"batch_size\": 64}': another update rule for the trained weights)",
    )
    qwen = p.add_argument_group("TitansQwen (--qwen)")
    qwen.add_argument("--adapters", nargs="+", default=[], help="memory adapter folders (mlx_titans.adapt): a row each")
    qwen.add_argument(
        "--memory-updates",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="the adapters' rows with the memory's test-time updates on, off (frozen memory), or both",
    )
    qwen.add_argument(
        "--stock",
        nargs="*",
        choices=["full", "rotating"],
        default=["full", "rotating"],
        help="stock mlx-lm rows: full attention, a rotating cache of the window + 4 sinks (--stock alone: none)",
    )
    qwen.add_argument(
        "--depths",
        nargs="+",
        type=float,
        help="needle depths in [0, 1] the samples cycle through (default: evenly spread over [0, 1])",
    )
    qwen.add_argument("--step", type=int, help="prompt tokens per call (default: the TitansQwen segment_size)")
    qwen.add_argument("--perplexity-length", type=int, help="also the held-out loss of windows of this many tokens")
    qwen.add_argument("--perplexity-windows", type=int, default=16)
    args = p.parse_args(argv)
    if args.replot:
        return replot(args.replot)
    args.tasks = args.tasks or (["passkey", "number", "word"] if args.models else ["passkey", "number"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    header = {"device": device_name(), "command": command_line("benchmarks.niah", argv), "settings": settings}

    def save(results):
        write_json_atomic(out, {**header, **results})

    results, plot_options = titans_lm(args) if args.models else titans_qwen(args, save)
    save(results)
    plots(results["rows"], out, plot_options)


def plots(rows, out: Path, options: dict) -> None:
    """OUT.png (accuracy against length), and OUT_answer_loss.png when the rows have answer losses."""
    plot(rows, out.with_suffix(".png"), **options)
    written = [out.with_suffix(".png")]
    if rows and "answer_loss" in rows[0]:
        written.append(out.with_name(out.stem + "_answer_loss.png"))
        plot(rows, written[-1], value="answer_loss", **options)
    print(f"wrote {out} and " + " and ".join(map(str, written)))


def replot(path) -> None:
    """The plots of a result written by this command, again (python -m benchmarks.niah --replot OUT.json)."""
    result = json.loads(Path(path).read_text())
    qwen = "titans" in result
    options = {"line": "method", "window": result["titans"]["window"]} if qwen else {}
    plots(result["rows"], Path(path), options)


if __name__ == "__main__":
    main()
