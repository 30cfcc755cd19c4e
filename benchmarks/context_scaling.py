"""Prefill tok/s, decode tok/s and peak memory against context length: TitansQwen vs stock mlx-lm (full KV cache,
and RotatingKVCache with --max-kv-size), side by side in one process, plus an analytic cost model and its
projection to an M3 Max.

    python -m benchmarks.context_scaling --preset qwen2.5-7b --q-bits 4 --out benchmarks/results/context_scaling.json
    python -m benchmarks.context_scaling --model ./qwen-titans --methods titans full --contexts 4096 32768

Random-weight presets need no download; --model takes a converted directory (convert/qwen.py). Each method runs
one growing stream through mlx-lm's generate_step (greedy): after a warm-up, the prompt is prefilled up to each
context length in turn, in --prefill-step-size pieces, and --generation-tokens are decoded there. prefill_tps at a
context is the tokens of the stream so far over the prefill time so far (what one prompt of that length measures,
mlx-lm style; the few decoded tokens count in the context); decode_tps is mlx-lm's generation tok/s; peak_gb is MLX's peak memory since the stream started
(weights included). A method stops when the next context would not finish within --time-budget seconds, or when
memory runs out. Output: one mlx_lm.benchmark-style line per measurement, a JSON file and a PNG beside it.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from benchmarks import cost_model
from benchmarks.machine import command_line, device_name
from mlx_titans.files import write_json_atomic
from mlx_titans.prefill import tokens_seen
from mlx_titans.qwen import TitansQwenConfig, build_model, load_plain_qwen, read_qwen_config
from mlx_titans.qwen.config import text_config
from mlx_titans.qwen.random_model import PRESETS, preset_config, random_model

DEFAULT_CONTEXTS = [1 << k for k in range(10, 20)]  # 1K .. 512K


def make_cache(model, method: str, max_kv_size: int):
    """The model's own cache; "rotating": each attention layer's KVCache a RotatingKVCache(max_kv_size, keep=4), as
    make_prompt_cache(max_kv_size=) makes for a model without make_cache (it ignores it for the hybrids, whose
    linear-attention layers keep their ArraysCache)."""
    cache = make_prompt_cache(model)
    if method == "rotating":
        cache = [RotatingKVCache(max_size=max_kv_size, keep=4) if type(c) is KVCache else c for c in cache]
    return cache


def run_piece(model, cache, prompt, generation_tokens: int, prefill_step_size: int):
    """Prefill `prompt` into the cache, then decode greedily: (prefill seconds, decode tok/s), mlx-lm's way
    (the prefill time runs to the first generated token)."""
    tic = time.perf_counter()
    for n, _ in enumerate(
        generate_step(
            prompt, model, prompt_cache=cache, max_tokens=generation_tokens, prefill_step_size=prefill_step_size
        )
    ):
        if n == 0:
            prefill_s, tic = time.perf_counter() - tic, time.perf_counter()
    return prefill_s, n / (time.perf_counter() - tic) if n else float("nan")


def random_tokens(n: int, vocab: int):
    return mx.random.randint(0, vocab, (n,))


def measure(model, method, contexts, vocab, args, report, time_budget=float("inf")):
    """One growing stream: prefill to each context in turn, decode there. Calls report(row) per context;
    returns why it stopped early, or None."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    cache = make_cache(model, method, args.max_kv_size)
    started, prefilled, prefill_total, last_rate, rates = time.perf_counter(), 0, 0.0, None, []
    for context in contexts:
        new = context - tokens_seen(cache)
        if new < 1:
            continue
        if rates:  # predict this piece from the last piece's rate, slowing as it did (attention grows)
            slowdown = max(1.0, rates[-2] / rates[-1]) if len(rates) > 1 else 1.0
            predicted = new / rates[-1] * slowdown + args.generation_tokens / max(last_rate, 1e-9)
            if time.perf_counter() - started + predicted > time_budget:
                return f"stopped before {context}: about {predicted:.0f} s more would pass --time-budget"
        try:
            piece_s, decode_tps = run_piece(
                model, cache, random_tokens(new, vocab), args.generation_tokens, args.prefill_step_size
            )
        except RuntimeError as e:  # out of memory
            return f"failed at {context}: {str(e).strip().splitlines()[0]}"
        prefilled, prefill_total, last_rate = prefilled + new, prefill_total + piece_s, decode_tps
        rates.append(new / piece_s)
        report(
            {
                "method": method,
                "context": context,
                "prefill_tps": prefilled / prefill_total,
                "decode_tps": decode_tps,
                "peak_gb": mx.get_peak_memory() / 1e9,
            }
        )
    return None


def burn_in(model, method, vocab, args):
    """Keep the machine busy for --burn-in seconds before the first measurement: on the H100 the first ~30 s of a
    process decoded up to 15% slower than the rest, whichever method came first."""
    end = time.perf_counter() + args.burn_in
    while time.perf_counter() < end:
        run_piece(
            model, make_cache(model, method, args.max_kv_size), random_tokens(2048, vocab), 64, args.prefill_step_size
        )


def analytic(config, titans, rows, methods, contexts, args) -> dict:
    """The cost model per method and context, its M3 Max projection, and a fit of the measured rows to it."""
    bits = args.q_bits if args.quantize else None
    cost = {}
    for method in methods:
        for context in contexts:
            decode = cost_model.decode_bytes(config, method, context, titans, args.max_kv_size, bits, args.q_group_size)
            prefill = cost_model.prefill_flops(config, method, context, titans, args.max_kv_size)
            cost[method, context] = {
                "method": method,
                "context": context,
                "decode_bytes": decode,
                "prefill_flops": prefill,
                "m3_max_decode_tps": cost_model.M3_MAX["bandwidth_gb_s"] * 1e9 / decode,
                "m3_max_prefill_tps": cost_model.M3_MAX["tflop_s"] * 1e12 / prefill,
                "weights_gb": cost_model.weight_bytes(config, method, titans, bits, args.q_group_size) / 1e9,
                "kv_gb": cost_model.kv_bytes_per_token(config)
                * cost_model.attended(method, context, titans, args.max_kv_size)
                / 1e9,
            }
    check = {}
    if len({(r["method"], r["context"]) for r in rows}) > 2:
        for kind, work, unit, scale in (
            ("decode", "decode_bytes", "gb_s", 1e9),
            ("prefill", "prefill_flops", "tflop_s", 1e12),
        ):
            fit = cost_model.fit_time_per_token(
                [cost[r["method"], r["context"]][work] for r in rows], [1 / r[f"{kind}_tps"] for r in rows]
            )
            for r, tps in zip(rows, fit.pop("predicted_tps")):
                r[f"model_{kind}_tps"] = tps
            fit[f"rate_{unit}"] = fit.pop("rate") / scale
            check[kind] = fit
    return {"reference": cost_model.M3_MAX, "cost": list(cost.values()), "fit": check}


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cost = result["rows"], result["analytic"]["cost"]
    colors = {"titans": "tab:red", "full": "tab:blue", "rotating": "tab:green"}
    labels = {"titans": "TitansQwen", "full": "mlx-lm full KV", "rotating": f"mlx-lm rotating {result['max_kv_size']}"}
    panels = [
        ("prefill_tps", "m3_max_prefill_tps", "prefill tok/s"),
        ("decode_tps", "m3_max_decode_tps", "decode tok/s"),
        ("peak_gb", None, "peak memory (GB)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, projected, title) in zip(axes, panels):
        for method in colors:
            pts = sorted((r["context"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(
                    *zip(*pts), marker="o", color=colors[method], label=f"{labels[method]} ({result['device_short']})"
                )
            proj = sorted((c["context"], c[projected]) for c in cost if c["method"] == method) if projected else []
            if proj:
                ax.plot(
                    *zip(*proj), ls="--", color=colors[method], alpha=0.6, label=f"{labels[method]} (M3 Max roofline)"
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{result['model']}, {result['bits_label']}: measured ({result['device_short']}) and projected")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_model_args(p):
    """The model flags this benchmark shares with benchmarks.decode_speed."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default="qwen2.5-7b", help="random weights of this shape")
    src.add_argument("--model", help="a converted TitansQwen / mlx-lm Qwen directory instead of a preset")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--burn-in", type=float, default=30.0, help="seconds of load before the first measurement")
    p.add_argument("--max-kv-size", type=int, default=4096, help="the rotating cache's size (mlx-lm --max-kv-size)")
    p.add_argument("--window", type=int, help="TitansQwen attention window (default: the titans section's)")
    p.add_argument("--memory-layers", type=int, nargs="*", help="TitansQwen's memory layers (default: the section's)")
    p.add_argument("--memory", type=json.loads, help="MemoryConfig fields as JSON, e.g. '{\"chunk_size\": 256}'")
    p.add_argument(
        "--quantize",
        "-q",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="presets: quantize the random weights (default) or keep --dtype",
    )
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def model_source(args):
    """(path or None, Qwen config, resolved titans section, name) for --model or --preset; a converted model's
    quantization replaces the --quantize flags. Exits with one line on a bad --model."""
    path = Path(args.model) if args.model else None
    if path is None:
        config, section, name = preset_config(args.preset), {}, args.preset
    else:
        try:
            config = read_qwen_config(path)
        except ValueError as e:
            sys.exit(f"error: {e}")
        section, name = dict(config.get("titans", {})), path.name
        q = config.get("quantization")
        args.quantize, args.q_bits, args.q_group_size = bool(q), (q or {}).get("bits"), (q or {}).get("group_size", 64)
    if args.window:
        section["window"] = args.window
    if args.memory_layers is not None:
        section["memory_layers"] = args.memory_layers
    if args.memory:
        section["memory"] = {**section.get("memory", {}), **args.memory}
    titans = TitansQwenConfig.for_config(section, config).to_section()
    return path, config, titans, name


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.context_scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--methods", nargs="+", choices=cost_model.METHODS, default=list(cost_model.METHODS))
    p.add_argument("--contexts", nargs="+", type=int, default=DEFAULT_CONTEXTS)
    p.add_argument("--generation-tokens", "-g", type=int, default=128)
    p.add_argument(
        "--warmup-context",
        type=int,
        default=16384,
        help="first run the stream through the contexts up to this, unmeasured, to compile the kernels",
    )
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds per method")
    p.add_argument("--out", default="context_scaling.json", help="JSON file; the PNG goes beside it")
    p.add_argument(
        "--rows-from",
        nargs="+",
        help="measure nothing: analyse and plot the rows of these JSON files "
        "(from runs with the same model settings, e.g. one method per command)",
    )
    args = p.parse_args(argv)
    if sorted(args.contexts) != args.contexts or args.contexts[0] < 1:
        p.error("--contexts must be positive and increasing")
    return args


def load_model_for(method, args, config, titans, path):
    """The method's model: random weights of the preset's shapes, or the converted directory's."""
    if path is None:
        bits = args.q_bits if args.quantize else None
        return random_model(config, titans if method == "titans" else None, bits, args.q_group_size, args.dtype)
    return build_model(path, titans)[0] if method == "titans" else load_plain_qwen(path)[0]


def main(argv=None):
    args = parse_args(argv)
    path, config, titans, name = model_source(args)
    device = device_name()
    result = {
        "device": device,
        "device_short": device.split(",")[0],
        "command": command_line("benchmarks.context_scaling", argv),
        "model": name,
        "bits_label": f"{args.q_bits}-bit" if args.quantize else args.dtype,
        "titans": titans,
        "max_kv_size": args.max_kv_size,
        "generation_tokens": args.generation_tokens,
        "prefill_step_size": args.prefill_step_size,
        "rows": [],
        "stopped": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for earlier in args.rows_from or []:  # measured before (other commands, other methods): analyse them together
        saved = json.loads(Path(earlier).read_text())
        result.update({k: saved[k] for k in ("device", "device_short", "command")})
        result["rows"] += [r for r in saved["rows"] if r["method"] in args.methods]
        result["stopped"].update({m: why for m, why in saved["stopped"].items() if m in args.methods})
    result["rows"] = list({(r["method"], r["context"]): r for r in result["rows"]}.values())  # the later file wins
    if args.rows_from:
        result["command"] = "; ".join(json.loads(Path(f).read_text())["command"] for f in args.rows_from)

    def report(row):
        row["device"] = device
        result["rows"].append(row)
        write_json_atomic(out, result)  # after every row: a run cut short keeps what it measured
        print(
            f"method={row['method']} context={row['context']} prompt_tps={row['prefill_tps']:.3f}, "
            f"generation_tps={row['decode_tps']:.3f}, peak_memory={row['peak_gb']:.3f}",
            flush=True,
        )

    vocab = text_config(config)["vocab_size"]
    for method in [] if args.rows_from else args.methods:
        print(f"== {method}: building the model", flush=True)
        tic = time.perf_counter()
        model = load_model_for(method, args, config, titans, path)
        warmup = [c for c in args.contexts if c <= args.warmup_context] or args.contexts[:1]
        print(f"   built in {time.perf_counter() - tic:.1f} s; warm-up stream to {warmup[-1]}", flush=True)
        measure(model, method, warmup, vocab, args, lambda row: None)
        if method == args.methods[0]:
            burn_in(model, method, vocab, args)
        stopped = measure(model, method, args.contexts, vocab, args, report, args.time_budget)
        if stopped:
            result["stopped"][method] = stopped
            print(f"   {method} {stopped}", flush=True)
        del model
        gc.collect()
        mx.clear_cache()
    result["analytic"] = analytic(config, titans, result["rows"], args.methods, args.contexts, args)
    write_json_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
