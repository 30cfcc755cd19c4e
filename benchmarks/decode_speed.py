"""Decode tok/s at one context length, TitansQwen against stock mlx-lm, in many short interleaved bursts: the number
to trust for "within 10% of stock" when the machine's speed drifts (on the H100, stock decode ranged 103-178 tok/s
within one run: benchmarks/results/decode_speed_h100.json).

    python -m benchmarks.decode_speed --preset qwen2.5-7b --context 4096 --rounds 40 \
        --methods titans window full rotating --out benchmarks/results/decode_speed_h100.json

Every method's model is built once (random weights of the preset's shapes, cast and quantized as convert/qwen.py
does, or --model's converted directory) and kept loaded. After --burn-in seconds of decoding on throwaway caches,
each method's cache is prefilled with --context random tokens once; then each round decodes a burst of
--generation-tokens from every method's cache in turn (a random token, then greedy decoding through mlx-lm's
generate_step), the order rotating from round to round, so the context grows by about rounds x (tokens + 2)
(final_context). The default burst, 64 tokens, is one memory chunk: every burst of TitansQwen pays for one chunk
update. Reported: each method's median burst tok/s, its tokens over its decode time across all rounds, and the
ratio of each method to `full` (stock mlx-lm, full KV cache): per round (median, min, max) and over all rounds.
`window` is TitansQwen without memory layers: what the bounded attention costs alone, so that `titans` against
`window` is what the memory layers cost.

--sync-tokens N then decodes N more tokens per method one at a time, waiting for each (host and device time with no
overlap): where the time goes. TitansQwen's tokens are split into those that only read the memory and those whose
call completes a memory chunk (one in chunk_size), reported apart.
"""

import argparse
import gc
import statistics
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.context_scaling import (
    add_model_args,
    load_model_for,
    make_cache,
    model_source,
    random_tokens,
    run_piece,
)
from benchmarks.machine import command_line, device_name
from mlx_titans.files import write_json_atomic
from mlx_titans.prefill import tokens_seen
from mlx_titans.qwen.config import text_config

METHODS = ("titans", "window", "full", "rotating")  # window: TitansQwen without memory layers (its attention alone)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["titans", "full"],
        help="`full` is the reference of the ratios and is always run",
    )
    p.add_argument("--context", type=int, default=4096, help="prompt tokens before decoding")
    p.add_argument("--generation-tokens", "-g", type=int, default=64, help="tokens per burst")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--sync-tokens", type=int, default=0, help="tokens per method timed one at a time, after the rounds")
    p.add_argument("--out", default="decode_speed.json")
    args = p.parse_args(argv)
    if args.context < 1 or args.rounds < 1 or args.generation_tokens < 2 or args.sync_tokens < 0:
        p.error("--context and --rounds must be >= 1, --generation-tokens >= 2 and --sync-tokens >= 0")
    args.methods = list(dict.fromkeys([*args.methods, "full"]))
    if args.model and "window" in args.methods:
        p.error("--methods window runs on --preset shapes only (a converted model's memory weights need its layers)")
    return args


def summary(rounds: list, methods: list, tokens: int) -> dict:
    """Per method: every round's tok/s, their median, the tok/s over all rounds, and the ratio to `full` per round
    (median, min, max) and over all rounds."""
    out = {}
    for method in methods:
        tps = [r[method] for r in rounds]
        ratios = [r[method] / r["full"] for r in rounds]
        overall = len(rounds) * tokens / sum(tokens / t for t in tps)
        out[method] = {
            "decode_tps": tps,
            "median_tps": statistics.median(tps),
            "overall_tps": overall,
            "ratio_to_full": ratios,
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
        }
    for method in methods:
        out[method]["overall_ratio"] = out[method]["overall_tps"] / out["full"]["overall_tps"]
    return out


def sync_latencies(model, cache, vocab: int, tokens: int) -> list:
    """Greedy decode steps timed one at a time with a wait for each: [(ms, whether the step takes the memory's
    storing path: it completes a chunk, or it is the stream's first call)], always False without memory layers."""
    layers = getattr(getattr(model, "titans", None), "memory_layers", ())
    memory, layer_cache = (model.layers[layers[0]].memory, cache[layers[0]]) if layers else (None, None)
    token, rows = random_tokens(1, vocab)[None], []
    for _ in range(tokens):
        state = None if layer_cache is None else layer_cache.memory
        completes = memory is not None and (state is None or memory.completes_chunk(state, 1))
        tic = time.perf_counter()
        token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1)[None]
        mx.eval(token)
        rows.append((1e3 * (time.perf_counter() - tic), completes))
    return rows


def sync_summary(rows: list) -> dict:
    reads = [ms for ms, completes in rows if not completes]
    return {
        "median_ms": statistics.median(reads) if reads else None,
        "chunk_ms": [ms for ms, completes in rows if completes],
    }


def main(argv=None):
    args = parse_args(argv)
    path, config, titans, name = model_source(args)
    vocab = text_config(config)["vocab_size"]
    models = {}
    for method in args.methods:
        tic = time.perf_counter()
        if method == "window":
            models[method] = load_model_for("titans", args, config, {**titans, "memory_layers": []}, path)
        else:
            models[method] = load_model_for(method, args, config, titans, path)
        print(f"{method}: built in {time.perf_counter() - tic:.1f} s", flush=True)

    def fresh(method, tokens):
        """A new cache holding `tokens` random tokens and one decoded token."""
        gc.collect()
        mx.clear_cache()
        cache = make_cache(models[method], method, args.max_kv_size)
        run_piece(models[method], cache, random_tokens(tokens, vocab), 1, args.prefill_step_size)
        return cache

    def burst(method, cache):
        return run_piece(
            models[method], cache, random_tokens(1, vocab), args.generation_tokens + 1, args.prefill_step_size
        )[1]

    end = time.perf_counter() + args.burn_in
    while time.perf_counter() < end:
        for method in args.methods:
            burst(method, fresh(method, 2048))
    caches = {method: fresh(method, args.context) for method in args.methods}
    device = device_name()
    result = {
        "device": device,
        "command": command_line("benchmarks.decode_speed", argv),
        "model": name,
        "bits_label": f"{args.q_bits}-bit" if args.quantize else args.dtype,
        "titans": titans,
        "context": args.context,
        "generation_tokens": args.generation_tokens,
        "rounds": [],
    }
    for k in range(args.rounds):
        order = args.methods[k % len(args.methods) :] + args.methods[: k % len(args.methods)]
        result["rounds"].append({method: burst(method, caches[method]) for method in order})
        result["summary"] = summary(result["rounds"], args.methods, args.generation_tokens)
        result["final_context"] = tokens_seen(caches["full"])
        write_json_atomic(Path(args.out), result)  # after every round: a run cut short keeps what it measured
        print(
            f"round {k + 1}: " + ", ".join(f"{m} {result['rounds'][-1][m]:.1f} tok/s" for m in args.methods), flush=True
        )
    if args.sync_tokens:
        result["sync"] = {
            m: sync_summary(sync_latencies(models[m], caches[m], vocab, args.sync_tokens)) for m in args.methods
        }
        write_json_atomic(Path(args.out), result)
        for m, s in result["sync"].items():
            reads = "" if s["median_ms"] is None else f" median {s['median_ms']:.2f} ms"
            chunk_ms = ", ".join(f"{ms:.1f}" for ms in s["chunk_ms"])
            chunks = f", chunk-completing steps {chunk_ms} ms" if chunk_ms else ""
            print(f"{m}: one step at a time,{reads}{chunks}")
    for method, s in result["summary"].items():
        print(
            f"{method}: median {s['median_tps']:.1f} tok/s, {s['median_ratio']:.3f}x full "
            f"(rounds {s['min_ratio']:.3f}-{s['max_ratio']:.3f}; over all rounds {s['overall_ratio']:.3f}x)"
        )
    return result


if __name__ == "__main__":
    main()
