"""Throughput and peak memory of NeuralMemory, ours (MLX) and titans-pytorch's side by side, in one process.

    python -m benchmarks.memory_throughput --dim 512 --heads 4 --chunk 64 16 --batch 1 4 --tokens 4096 \\
        --modes fwd fwdbwd --impl mlx titans-pytorch --batch-size-semantics paper titans --out results.json

Semantics of our memory: "paper" takes each chunk's gradient at the weights the previous chunk left (the
paper's mini-batch gradient descent, sequential over chunks); "titans" takes every gradient at the initial
weights, which is what titans-pytorch computes by default, so mlx/titans vs titans-pytorch is like for like.

Times are medians over --repeats after --warmup calls. peak_gb (1e9 bytes) is MLX's peak allocation and, for
titans-pytorch, torch.cuda.max_memory_allocated; it is null for torch on CPU, whose high-water mark (max RSS)
cannot be reset between measurements.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_titans import MemoryConfig, NeuralMemory

DEPTH, EXPANSION = 2, 4
SEMANTICS = {"paper": None, "titans": 0}  # MemoryConfig.batch_size


def flops_per_token(dim, heads, dim_head, mode):
    """Rough matmul FLOPs per token (2 per multiply-add), ignoring norms, gates' nonlinearities and the scans.

    Forward: q/k/v projections and combine_heads (4 * dim * inner), the lr/momentum/decay/retrieve-gate
    projections (4 * dim * heads), per head the memory MLP's forward and backward on the key to store it
    (~3x the MLP's forward) and its forward on the query to retrieve. fwdbwd: ~3x the forward.
    """
    hidden = dim_head * EXPANSION
    mlp = 2 * (dim_head * hidden + hidden * dim_head)
    fwd = 2 * 4 * dim * heads * dim_head + 2 * 4 * dim * heads + heads * (3 * mlp + mlp)
    return fwd if mode == "fwd" else 3 * fwd


def is_oom(e):
    msg = str(e).lower()
    return any(s in msg for s in ("out of memory", "allocate memory", "malloc", "resource limit"))


def measure(step, sync, reset_peak, warmup, repeats):
    """Median seconds of `repeats` synced calls of `step`, after `warmup` calls (the first compiles kernels)."""
    for _ in range(warmup):
        sync(step())
    reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_mlx(semantics, dim, heads, chunk, batch, tokens, dtype, mode, warmup, repeats):
    """(seconds, peak GB) for our memory."""
    cfg = MemoryConfig(
        dim=dim, heads=heads, chunk_size=chunk, batch_size=SEMANTICS[semantics], depth=DEPTH, expansion=EXPANSION
    )
    model = NeuralMemory(cfg)
    model.set_dtype(getattr(mx, dtype))
    x = mx.random.normal((batch, tokens, dim)).astype(getattr(mx, dtype))
    mx.eval(x, model.parameters())
    if mode == "fwd":

        def step():
            return model(x)[0]
    else:
        grad_fn = nn.value_and_grad(model, lambda x: model(x)[0].astype(mx.float32).sum())

        def step():
            return grad_fn(x)

    seconds = measure(step, mx.eval, mx.reset_peak_memory, warmup, repeats)
    return seconds, mx.get_peak_memory() / 1e9


def bench_torch(device, dim, heads, chunk, batch, tokens, dtype, mode, warmup, repeats):
    """(seconds, peak GB or None on CPU) for titans-pytorch's memory."""
    import torch
    from titans_pytorch import NeuralMemory as TitansMemory

    model = TitansMemory(dim, heads=heads, dim_head=dim // heads, chunk_size=chunk)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    x = torch.randn(batch, tokens, dim, device=device, dtype=getattr(torch, dtype))
    cuda = device.type == "cuda"

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return model(x)[0]
        model.zero_grad(set_to_none=True)
        loss = model(x)[0].float().sum()
        loss.backward()
        return loss

    def sync(out):
        if cuda:
            torch.cuda.synchronize()

    seconds = measure(step, sync, torch.cuda.reset_peak_memory_stats if cuda else lambda: None, warmup, repeats)
    return seconds, torch.cuda.max_memory_allocated() / 1e9 if cuda else None


def torch_backend(impls):
    """(torch device, description, note) when titans-pytorch is asked for and importable, else (None, ...)."""
    if "titans-pytorch" not in impls:
        return None, None, None
    try:
        import titans_pytorch  # noqa: F401
        import torch
    except ImportError as e:
        return None, None, f"titans-pytorch skipped: {e}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    note = None if device.type == "cuda" else "titans-pytorch peak_gb is null: peak memory is only measured on CUDA"
    return device, f"torch {torch.__version__} on {device.type} ({name})", note


def ratios_table(rows):
    """mlx tokens/s divided by titans-pytorch tokens/s, per config and mode."""
    key = lambda r: (r["chunk"], r["batch"], r["mode"])
    ref = {key(r): r["tokens_per_s"] for r in rows if r["impl"] == "titans-pytorch" and r["tokens_per_s"]}
    lines = []
    for r in rows:
        if r["impl"] == "mlx" and r["tokens_per_s"] and key(r) in ref:
            lines.append(
                f"chunk={r['chunk']:<4} batch={r['batch']:<3} mode={r['mode']:<7} "
                f"semantics={r['semantics']:<7} mlx/titans-pytorch={r['tokens_per_s'] / ref[key(r)]:.2f}x"
            )
    return lines


def run_one(args, impl, semantics, device, chunk, batch, mode):
    """One result row; an out-of-memory failure is recorded in it rather than raised."""
    row = {
        "impl": impl,
        "semantics": semantics,
        "dim": args.dim,
        "heads": args.heads,
        "chunk": chunk,
        "batch": batch,
        "tokens": args.tokens,
        "dtype": args.dtype,
        "mode": mode,
        "tokens_per_s": None,
        "peak_gb": None,
        "flops_per_token": flops_per_token(args.dim, args.heads, args.dim // args.heads, mode),
        "roofline_ratio": None,
        "error": None,
    }
    setting = (args.dim, args.heads, chunk, batch, args.tokens, args.dtype, mode, args.warmup, args.repeats)
    try:
        if impl == "mlx":
            seconds, row["peak_gb"] = bench_mlx(semantics, *setting)
        else:
            seconds, row["peak_gb"] = bench_torch(device, *setting)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        row["error"] = "out of memory"
        return row
    row["tokens_per_s"] = batch * args.tokens / seconds
    if args.peak_tflops:
        row["roofline_ratio"] = row["tokens_per_s"] * row["flops_per_token"] / (args.peak_tflops * 1e12)
    return row


def format_row(r):
    head = f"impl={r['impl']} semantics={r['semantics']} chunk={r['chunk']} batch={r['batch']} mode={r['mode']}"
    if r["error"]:
        return f"{head} error={r['error']}"
    peak = "null" if r["peak_gb"] is None else f"{r['peak_gb']:.4g}"
    line = f"{head} tokens/s={r['tokens_per_s']:.0f} peak_gb={peak}"
    return line + (f" roofline={r['roofline_ratio']:.3f}" if r["roofline_ratio"] is not None else "")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunk", type=int, nargs="+", default=[64])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--impl", nargs="+", choices=["mlx", "titans-pytorch"], default=["mlx", "titans-pytorch"])
    p.add_argument("--batch-size-semantics", nargs="+", choices=list(SEMANTICS), default=list(SEMANTICS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for --dtype; gives roofline_ratio (default: not computed)",
    )
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")

    device, torch_desc, note = torch_backend(args.impl)
    notes = [note] if note else []
    if note and device is None:
        print(note, file=sys.stderr)
    desc = (
        f"mlx {mx.__version__} on {mx.default_device()}; "
        + (f"{torch_desc}; " if torch_desc else "")
        + platform.platform()
    )

    runs = [("mlx", s) for s in args.batch_size_semantics] if "mlx" in args.impl else []
    if device is not None:
        runs.append(("titans-pytorch", "titans"))
    configs = [(c, b) for c in args.chunk for b in args.batch]
    rows = []
    for i, (chunk, batch) in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] chunk={chunk} batch={batch}", file=sys.stderr, flush=True)
        for impl, semantics in runs:
            for mode in args.modes:
                row = run_one(args, impl, semantics, device, chunk, batch, mode)
                rows.append(row)
                print(format_row(row), flush=True)
        mx.clear_cache()
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    table = ratios_table(rows)
    if table:
        print("\n" + "\n".join(table))
    if args.out:
        command = " ".join(sys.argv if argv is None else [sys.argv[0], *argv])
        result = {"device": desc, "command": command, "rows": rows}
        if notes:
            result["notes"] = notes
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
