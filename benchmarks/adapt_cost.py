"""Expected peak memory and time of memory-adapter training (mlx_titans.adapt) on a Mac, from the cost model.

    python -m benchmarks.adapt_cost --out benchmarks/results/adapt_cost.json
    python -m benchmarks.adapt_cost --tflops 5 --multiples 8 --check-against benchmarks/results/adapt_memory_cpu.json

For each preset (random_model.PRESETS: the shapes of the Hugging Face configs) at --bits with the default titans
section, and sample lengths of each multiple of the window: the peak memory of one step (cost_model.adapt_peak_bytes:
weights, gradients and AdamW state of the memory layers, the cache kept at every segment's start, one segment's
activations) and the hours per million trained tokens at --tflops effective (cost_model.adapt_flops: about three
forwards per token). The default rate is an estimate for an M3 Max, not a measurement of training.

--check-against compares the model with measured peaks of benchmarks/adapt_memory.py (its JSON; the model folder it
names must be here): adapt_memory takes no optimizer step, so the prediction it is set beside leaves AdamW's state out.
"""

import argparse
import json
import sys
from pathlib import Path

from benchmarks import cost_model
from benchmarks.machine import command_line
from mlx_titans.files import run_reporting_errors, write_json_atomic
from mlx_titans.qwen import TitansQwenConfig, read_qwen_config
from mlx_titans.qwen.random_model import PRESETS, preset_config

TFLOPS_SOURCE = (
    "estimate, not a measurement: ~10.6 TFLOP/s effective on an M3 Max (40-core GPU), back-solved from "
    "a measured mlx-lm prefill of an 8B 4-bit model at 32K tokens (428 tok/s); paper-and-peers "
    "reference notes section 4.4. Training's backward may run below a prefill's rate."
)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9


def row(name, config, titans, length, bits, tflops) -> dict:
    peak = cost_model.adapt_peak_bytes(config, titans, length, bits=bits)
    flops = cost_model.adapt_flops(config, titans, length)
    return {
        "model": name,
        "bits": bits,
        "sample_length": length,
        "window_multiple": length / titans["window"],
        **{f"{part}_gb": value / GB for part, value in peak.items()},
        "gflop_per_token": flops / 1e9,
        "seconds_per_sample": length * flops / (tflops * 1e12),
        "hours_per_million_tokens": 1e6 * flops / (tflops * 1e12) / 3600,
    }


def check(path: Path) -> dict:
    """The predicted peak (AdamW's state left out) beside each segment-by-segment row of an adapt_memory JSON."""
    measured = json.loads(path.read_text())
    config = read_qwen_config(Path(measured["model"]))
    bits = (config.get("quantization") or {}).get("bits")
    dtype_bytes = DTYPE_BYTES[config.get("torch_dtype", "bfloat16")]
    rows = []
    for r in (r for r in measured["rows"] if r["checkpoint"]):
        peak = cost_model.adapt_peak_bytes(config, measured["titans"], r["length"], bits=bits, dtype_bytes=dtype_bytes)
        predicted = (peak["total"] - peak["optimizer"]) / GB
        flops = cost_model.adapt_flops(config, measured["titans"], r["length"])
        rows.append(
            {
                "sample_length": r["length"],
                "measured_peak_gb": r["peak_memory_gb"],
                "predicted_peak_gb": predicted,
                "predicted_over_measured": predicted / r["peak_memory_gb"],
                "measured_seconds_per_step": r["seconds_per_step"],
                "effective_gflop_s": r["length"] * flops / r["seconds_per_step"] / 1e9,
            }
        )
    return {"file": str(path), "machine": measured.get("machine"), "model": measured["model"], "rows": rows}


def run(args) -> None:
    rows = []
    for name in args.presets:
        config = preset_config(name)
        titans = TitansQwenConfig.for_config({}, config).to_section()
        rows += [row(name, config, titans, m * titans["window"], args.bits, args.tflops) for m in args.multiples]
    print(
        f"one adapter training step, batch 1, default titans section; {args.tflops} TFLOP/s effective "
        f"({'default: ' + TFLOPS_SOURCE if args.tflops == cost_model.M3_MAX['tflop_s'] else 'given by --tflops'})"
    )
    print(
        f"{'model':<14}{'sample':>8}{'x win':>6}{'weights':>9}{'caches':>8}{'activ.':>8}{'peak GB':>9}"
        f"{'GFLOP/tok':>11}{'s/sample':>10}{'h/M tok':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:<14}{r['sample_length']:>8}{r['window_multiple']:>6.0f}{r['weights_gb']:>9.2f}"
            f"{r['caches_gb']:>8.2f}{r['activations_gb']:>8.2f}{r['total_gb']:>9.2f}{r['gflop_per_token']:>11.2f}"
            f"{r['seconds_per_sample']:>10.1f}{r['hours_per_million_tokens']:>9.2f}"
        )
    result = {
        "command": command_line("benchmarks.adapt_cost"),
        "tflop_s": {
            "value": args.tflops,
            "estimate": True,
            "source": TFLOPS_SOURCE if args.tflops == cost_model.M3_MAX["tflop_s"] else "--tflops",
        },
        "rows": rows,
    }
    if args.check_against:
        result["check"] = check(Path(args.check_against))
        print(f"peak memory model vs measured ({result['check']['machine']}, {result['check']['model']}):")
        for r in result["check"]["rows"]:
            print(
                f"  {r['sample_length']:>6} tokens: predicted {r['predicted_peak_gb']:.4f} GB, measured "
                f"{r['measured_peak_gb']:.4f} GB, ratio {r['predicted_over_measured']:.2f}; "
                f"{r['effective_gflop_s']:.1f} GFLOP/s effective"
            )
    if args.out:
        write_json_atomic(Path(args.out), result)
        print(f"wrote {args.out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.adapt_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=["qwen2.5-0.5b", "qwen2.5-7b"])
    p.add_argument("--multiples", nargs="+", type=int, default=[4, 16, 32], help="sample lengths / the window")
    p.add_argument("--bits", type=int, default=4, help="the base's quantization (0: bfloat16)")
    p.add_argument(
        "--tflops",
        type=float,
        default=cost_model.M3_MAX["tflop_s"],
        help="effective TFLOP/s (default: an M3 Max estimate, see the output)",
    )
    p.add_argument("--check-against", help="an adapt_memory JSON: the model's peaks beside its measured ones")
    p.add_argument("--out", help="JSON file")
    args = p.parse_args(argv)
    if args.tflops <= 0 or min(args.multiples) < 1:
        p.error("--tflops and --multiples must be positive")
    return run_reporting_errors(lambda: run(args), (OSError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
