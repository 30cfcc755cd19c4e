"""Peak memory and time of one memory-adapter training step against sample length, with and without recomputing
each segment in the backward pass (mlx_titans.adapt's default).

    python -m benchmarks.adapt_memory --model qwen-titans --multiples 4 8 16 32 --out benchmarks/results/x.json

One optimizer-free step (loss and gradients of the memory layers, as adapt computes them: segment by segment, or
with --no-grad-checkpoint as one graph) on random tokens, batch 1,
for samples of each multiple of the model's window; peak memory is MLX's (mx.get_peak_memory) after a reset, so it
includes the weights. JSON + PNG.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from benchmarks.machine import command_line, device_name
from mlx_titans.adapt import sample_loss, value_and_grad
from mlx_titans.files import run_reporting_errors, write_json_atomic
from mlx_titans.qwen import load
from mlx_titans.qwen.adapters import make_trainable


def measure(model, length: int, checkpoint: bool, repeats: int) -> dict:
    tokens = mx.random.randint(0, model.text_model.args.vocab_size, (1, length + 1), key=mx.random.key(length))
    args = (tokens[:, :-1], tokens[:, 1:], mx.ones((1, length)), mx.array([False]))
    if checkpoint:
        step = lambda: value_and_grad(model, *args)
    else:
        step = lambda: nn.value_and_grad(model, lambda m: sample_loss(m, *args))(model)
    mx.eval(step())  # warm-up (compiles the memory's kernels)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(step())
    seconds = (time.perf_counter() - tic) / repeats
    return {
        "length": length,
        "checkpoint": checkpoint,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "seconds_per_step": seconds,
        "tokens_per_s": length / seconds,
    }


def plot(rows, window: int, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for checkpoint, label in (
        (True, "segment by segment (adapt's default)"),
        (False, "one graph (--no-grad-checkpoint)"),
    ):
        mine = [r for r in rows if r["checkpoint"] == checkpoint]
        ax.plot([r["length"] / window for r in mine], [r["peak_memory_gb"] for r in mine], "o-", label=label)
    ax.set(xscale="log", xlabel="sample length / window", ylabel="peak memory (GB)", title="one adapter training step")
    ax.set_xticks([r["length"] / window for r in rows if r["checkpoint"]], minor=False)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> None:
    model, _, _ = load(args.model)
    make_trainable(model)
    window = model.titans.window
    rows = []
    for multiple in args.multiples:
        for checkpoint in (True, False):
            row = measure(model, multiple * window, checkpoint, args.repeats)
            rows.append(row)
            print(
                f"{multiple:>3} x window = {row['length']} tokens, checkpoint {checkpoint}: peak "
                f"{row['peak_memory_gb']:.3f} GB, {row['seconds_per_step']:.2f} s/step",
                flush=True,
            )
    out = Path(args.out)
    write_json_atomic(
        out,
        {
            "command": command_line("benchmarks.adapt_memory"),
            "machine": device_name(),
            "model": str(args.model),
            "titans": model.titans.to_section(),
            "rows": rows,
        },
    )
    plot(rows, window, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.adapt_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a TitansQwen folder")
    p.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16, 32], help="sample lengths / the window")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per length")
    p.add_argument("--out", default="benchmarks/results/adapt_memory.json")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
