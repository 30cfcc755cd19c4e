"""Decode tok/s at one context length, TitansQwen against stock mlx-lm, in interleaved rounds: the number to trust
for "within 10% of stock" when a single pass is noisy.

    python -m benchmarks.decode_speed --preset qwen2.5-7b --context 4096 --rounds 5 \
        --out benchmarks/results/decode_speed_h100.json

Every method's model is built once (random weights of the preset's shapes, cast and quantized as convert/qwen.py
does, or --model's converted directory) and kept loaded. After --burn-in seconds of decoding, each round runs every
method in turn, the order rotating from round to round: a fresh cache, --context random tokens prefilled, then
--generation-tokens decoded greedily through mlx-lm's generate_step. Reported: each method's median decode tok/s
and the ratio of each method to `full` (stock mlx-lm, full KV cache) per round, with its median, min and max.
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.context_scaling import (add_model_args, load_model_for, make_cache, model_source, random_tokens,
                                        run_piece)
from benchmarks.machine import device_name
from mlx_titans.files import write_json_atomic

METHODS = ("titans", "full", "rotating")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["titans", "full"],
                   help="`full` is the reference of the ratios and is always run")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens before decoding")
    p.add_argument("--generation-tokens", "-g", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="decode_speed.json")
    args = p.parse_args(argv)
    if args.context < 1 or args.rounds < 1 or args.generation_tokens < 2:
        p.error("--context and --rounds must be >= 1 and --generation-tokens >= 2")
    args.methods = list(dict.fromkeys([*args.methods, "full"]))
    return args


def summary(rounds: list, methods: list) -> dict:
    """Per method: every round's tok/s, their median, and the per-round ratio to `full` (median, min, max)."""
    out = {}
    for method in methods:
        tps = [r[method] for r in rounds]
        ratios = [r[method] / r["full"] for r in rounds]
        out[method] = {"decode_tps": tps, "median_tps": statistics.median(tps),
                       "ratio_to_full": ratios, "median_ratio": statistics.median(ratios),
                       "min_ratio": min(ratios), "max_ratio": max(ratios)}
    return out


def main(argv=None):
    args = parse_args(argv)
    path, config, titans, name = model_source(args)
    vocab = config["vocab_size"]
    models = {}
    for method in args.methods:
        tic = time.perf_counter()
        models[method] = load_model_for(method, args, config, titans, path)
        print(f"{method}: built in {time.perf_counter() - tic:.1f} s", flush=True)

    def decode_tps(method):
        gc.collect()
        mx.clear_cache()
        cache = make_cache(models[method], method, args.max_kv_size)
        return run_piece(models[method], cache, random_tokens(args.context, vocab), args.generation_tokens,
                         args.prefill_step_size)[1]

    end = time.perf_counter() + args.burn_in
    while time.perf_counter() < end:
        for method in args.methods:
            decode_tps(method)
    device = device_name()
    result = {"device": device, "command": "python -m benchmarks.decode_speed "
              + " ".join(argv if argv is not None else sys.argv[1:]), "model": name,
              "bits_label": f"{args.q_bits}-bit" if args.quantize else args.dtype, "titans": titans,
              "context": args.context, "generation_tokens": args.generation_tokens, "rounds": []}
    for k in range(args.rounds):
        order = args.methods[k % len(args.methods):] + args.methods[: k % len(args.methods)]
        result["rounds"].append({method: decode_tps(method) for method in order})
        result["summary"] = summary(result["rounds"], args.methods)
        write_json_atomic(Path(args.out), result)  # after every round: a run cut short keeps what it measured
        print(f"round {k + 1}: " + ", ".join(f"{m} {result['rounds'][-1][m]:.1f} tok/s" for m in args.methods),
              flush=True)
    for method, s in result["summary"].items():
        print(f"{method}: median {s['median_tps']:.1f} tok/s, {s['median_ratio']:.3f}x full "
              f"(rounds {s['min_ratio']:.3f}-{s['max_ratio']:.3f})")
    return result


if __name__ == "__main__":
    main()
