"""Where TitansQwen's prefill time goes against stock mlx-lm's rotating cache: the same prefill timed with parts of
the work added or taken away, in interleaved rounds in one process with the same base weights (issue 21, item 1).

    python -m benchmarks.prefill_parts --preset cpu-128 --no-quantize --dtype float32 --memory-layers 0 1 2 3 \
        --context 8192 --rounds 3 --out benchmarks/results/prefill_parts_cpu_128.json

mlx-lm's prefill evaluates only the caches (`mx.eval([c.state for c in cache])` per step), so the last layer's
attention output and MLP, which no cache needs, are never computed. A memory layer reads the attention output
(`h + gate * memory(norm(h))`), so a memory in the last layer makes that layer's attention part of the cache's state.
Parts, each a fresh cache prefilled to --context in steps of --prefill-step-size (once unmeasured, then per round):

    rotating                        stock mlx-lm, RotatingKVCache(--max-kv-size, keep 4): the reference
    rotating, last layer computed   the same, also evaluating the final hidden states (what a memory there forces)
    titans                          TitansQwen with --memory-layers
    titans, no memory in the last   the same without the memory in the last layer, if it has one
    titans, no memory               the bounded attention alone
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.context_scaling import add_model_args, burn_in, load_model_for, make_cache, model_source, random_tokens
from benchmarks.machine import command_line, device_name
from mlx_titans.files import write_json_atomic
from mlx_titans.qwen.config import text_config


def prefill_seconds(model, cache, tokens, step: int, last_layer: bool) -> float:
    """Seconds to prefill `tokens` (1, n) into `cache`, mlx-lm's way (the caches evaluated after each step), and
    with `last_layer` the final hidden states too."""
    tic = time.perf_counter()
    for start in range(0, tokens.shape[1], step):
        hidden = model.model(tokens[:, start : start + step], cache)
        mx.eval([c.state for c in cache], *([hidden] if last_layer else []))
    return time.perf_counter() - tic


def parts(args, config, titans, path) -> dict:
    """{part: (model, cache method, last layer computed)}."""
    stock = load_model_for("rotating", args, config, titans, path)
    layers, last = titans["memory_layers"], text_config(config)["num_hidden_layers"] - 1
    variants = {"titans": layers, "titans, no memory": []}
    if last in layers:
        variants["titans, no memory in the last"] = [i for i in layers if i != last]
    made = {
        "rotating": (stock, "rotating", False),
        "rotating, last layer computed": (stock, "rotating", True),
    }
    for name, memory_layers in variants.items():
        made[name] = (
            load_model_for("titans", args, config, {**titans, "memory_layers": memory_layers}, path),
            "titans",
            False,
        )
    return made


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prefill_parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.set_defaults(burn_in=0.0)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="prefill_parts.json")
    args = p.parse_args(argv)
    if args.context < 1 or args.rounds < 1:
        p.error("--context and --rounds must be >= 1")
    path, config, titans, name = model_source(args)
    models = parts(args, config, titans, path)
    vocab = text_config(config)["vocab_size"]
    if args.burn_in:
        burn_in(models["rotating"][0], "rotating", vocab, args)
    warmup = random_tokens(args.context, vocab)[None]
    for model, method, last_layer in models.values():  # unmeasured: each part compiles its kernels before round 1
        prefill_seconds(model, make_cache(model, method, args.max_kv_size), warmup, args.prefill_step_size, last_layer)
    rounds = []
    for r in range(args.rounds):
        tokens = random_tokens(args.context, vocab)[None]
        order = list(models)[r % len(models) :] + list(models)[: r % len(models)]
        seconds = {}
        for part in order:
            model, method, last_layer = models[part]
            cache = make_cache(model, method, args.max_kv_size)
            seconds[part] = prefill_seconds(model, cache, tokens, args.prefill_step_size, last_layer)
        rounds.append(seconds)
    summary = {
        part: {
            "prefill_tps": args.context / statistics.median(r[part] for r in rounds),
            "ratio_to_rotating": statistics.median(r["rotating"] / r[part] for r in rounds),
        }
        for part in models
    }
    for part, s in summary.items():
        print(f"{part:<32} {s['prefill_tps']:>9.1f} tok/s  {s['ratio_to_rotating']:.3f}x rotating")
    result = {
        "device": device_name(),
        "command": command_line("benchmarks.prefill_parts", argv),
        "ld_preload": os.environ.get("LD_PRELOAD"),  # on Linux CPUs, the BLAS that served the matmuls
        "model": name,
        "titans": titans,
        "context": args.context,
        "summary": summary,
        "rounds": rounds,
    }
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
