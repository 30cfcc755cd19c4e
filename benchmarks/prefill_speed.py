"""Prefill and decode tok/s of TitansQwen against stock mlx-lm's rotating cache, in interleaved rounds in one process
with the same base weights: ratios that hold when the machine's speed drifts or is shared (issue 21's targets).

    python -m benchmarks.prefill_speed --preset cpu-128 --no-quantize --dtype float32 --memory-layers 0 1 2 3 \
        --contexts 2048 4096 8192 --rounds 3 --out benchmarks/results/prefill_speed_cpu_128.json

Methods: `titans`, `window` (TitansQwen without memory layers: the bounded attention alone), `full` and `rotating`
(stock mlx-lm, one model). Each round runs one stream per method (context_scaling.measure: a fresh cache prefilled
up to each context in turn, --generation-tokens decoded at each), the order rotating from round to round. Reported
per method and context: the median over rounds of its prefill and decode tok/s over the rotating cache's in the same
round. --memory sets MemoryConfig fields (chunk_size, batch_size) to measure the update's options.
"""

import argparse
import os
import statistics
from pathlib import Path

from mlx.utils import tree_flatten

from benchmarks.context_scaling import add_model_args, burn_in, load_model_for, measure, model_source
from benchmarks.machine import command_line, device_name
from mlx_titans.files import write_json_atomic
from mlx_titans.qwen.config import text_config

METHODS = ("titans", "window", "full", "rotating")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prefill_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.set_defaults(burn_in=0.0)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["titans", "rotating"])
    p.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--generation-tokens", "-g", type=int, default=64, help="decoded at each context: one memory chunk")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="prefill_speed.json")
    args = p.parse_args(argv)
    if sorted(args.contexts) != args.contexts or args.contexts[0] < 1 or args.rounds < 1:
        p.error("--contexts must be positive and increasing, --rounds >= 1")
    args.methods = list(dict.fromkeys([*args.methods, "rotating"]))
    return args


def build_models(args, config, titans, path) -> dict:
    """Every method's model; TitansQwen's take the stock model's weights (their memory weights stay their own)."""
    stock = load_model_for("rotating", args, config, titans, path)
    models = {}
    for method in args.methods:
        if method in ("full", "rotating"):
            models[method] = stock
            continue
        section = titans if method == "titans" else {**titans, "memory_layers": []}
        models[method] = load_model_for("titans", args, config, section, path)
        models[method].load_weights(tree_flatten(stock.parameters()), strict=False)
    return models


def summary(rounds: list, methods: list, contexts: list) -> dict:
    """Per method and context: median prefill and decode tok/s, and the median per-round ratio to `rotating`."""
    out = {}
    for method in methods:
        for context in contexts:
            rows = [r[method][context] for r in rounds if context in r[method] and context in r["rotating"]]
            if not rows:
                continue
            base = [r["rotating"][context] for r in rounds if context in r[method] and context in r["rotating"]]
            out[f"{method}@{context}"] = {
                kind: statistics.median(row[f"{kind}_tps"] for row in rows) for kind in ("prefill", "decode")
            } | {
                f"{kind}_ratio": statistics.median(r[f"{kind}_tps"] / b[f"{kind}_tps"] for r, b in zip(rows, base))
                for kind in ("prefill", "decode")
            }
    return out


def main(argv=None):
    args = parse_args(argv)
    path, config, titans, name = model_source(args)
    vocab = text_config(config)["vocab_size"]
    models = build_models(args, config, titans, path)
    for method in args.methods:  # compile every graph once
        measure(models[method], method, args.contexts[:1], vocab, args, lambda row: None)
    if args.burn_in:
        burn_in(models[args.methods[0]], args.methods[0], vocab, args)
    result = {
        "device": device_name(),
        "command": command_line("benchmarks.prefill_speed", argv),
        "ld_preload": os.environ.get("LD_PRELOAD"),  # on Linux CPUs, the BLAS that served the matmuls
        "model": name,
        "bits_label": f"{args.q_bits}-bit" if args.quantize else args.dtype,
        "titans": titans,
        "max_kv_size": args.max_kv_size,
        "rounds": [],
    }
    for k in range(args.rounds):
        order = args.methods[k % len(args.methods) :] + args.methods[: k % len(args.methods)]
        rows = {method: {} for method in args.methods}
        for method in order:
            measure(
                models[method],
                method,
                args.contexts,
                vocab,
                args,
                lambda row: rows[method].update({row["context"]: row}),
            )
        result["rounds"].append(rows)
        result["summary"] = summary(result["rounds"], args.methods, args.contexts)
        write_json_atomic(Path(args.out), result)  # after every round: a run cut short keeps what it measured
        print(f"round {k + 1} done", flush=True)
    for key, s in result["summary"].items():
        print(
            f"{key}: prefill {s['prefill']:.1f} tok/s ({s['prefill_ratio']:.3f}x rotating), "
            f"decode {s['decode']:.1f} tok/s ({s['decode_ratio']:.3f}x rotating)"
        )
    return result


if __name__ == "__main__":
    main()
