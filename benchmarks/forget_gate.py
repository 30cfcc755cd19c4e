"""What a trained memory's forget gate does beyond the training length, and what retrieval does when it forgets less.

For runs of benchmarks.reproduce (WORK/NAME, trained and evaluated there):
  1. per memory layer and head, the keep rate 1 - alpha of every chunk along pass-key samples at the longest test
     length, and how much of the needle's chunk is left when the question comes: the product of the keeps of the
     chunks stored in between (momentum aside);
  2. needle accuracy at every test length with the same weights and alpha scaled at inference (max_decay = s:
     alpha = s * sigmoid(.)), s = 1 being the model as trained and evaluated by reproduce.

    python -m benchmarks.forget_gate --runs mac mag mal --scales 1 0.3 0.1 0.03 0     # WORK: runs/reproduce

The needle samples, their haystack (the books' valid split), lengths and sample counts are reproduce's, read from
each run's result.json, so s = 1 repeats its accuracy. JSON + PNG (accuracy against length, a line per s).
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from benchmarks.machine import command_line, device_name
from benchmarks.reproduce import NIAH_BLOCK, token_files
from mlx_titans.data import load_tokens
from mlx_titans.files import write_json_atomic
from mlx_titans.model import load_model
from mlx_titans.niah import accuracy
from mlx_titans.prefill import prefill
from mlx_titans.tasks import NEEDLE, QUERY, make_batch
from mlx_titans.train import find_checkpoint


def keep_rates(model, inputs) -> dict:
    """{layer: keep rates (batch, heads, chunks)} of every memory layer with a forget gate over `inputs` (batch, n),
    read as reproduce reads a needle sample, from the memories' gate logs."""
    memories = {
        i: layer.memory
        for i, layer in enumerate(model.layers)
        if "memory" in layer and layer.memory.config.weight_decay
    }
    for mem in memories.values():
        mem.gate_log = []
    try:
        prefill(model, inputs, model.make_cache(), NIAH_BLOCK)
        logs = {i: [gates["keep"] for gates in mem.gate_log] for i, mem in memories.items()}
    finally:
        for mem in memories.values():
            mem.gate_log = None
    rates = {}
    for i, log in logs.items():
        keep = mx.concatenate(log, axis=1)
        keep = keep.mean(-1) if keep.ndim == 3 else keep
        rates[i] = np.array(keep.reshape(inputs.shape[0], model.layers[i].memory.config.heads, -1))
    return rates


def gate_summary(model, length, samples, batch, seed, haystack) -> list:
    """Per memory layer and head: the mean keep rate, the mean keep of the needle's own chunk, and the median share of
    the needle's chunk left at the question, over `samples` pass-key samples of `length` tokens."""
    rng = np.random.default_rng(seed)
    keeps, left, at_needle = {}, {}, {}
    for start in range(0, samples, batch):
        inputs, _, _ = make_batch(
            "passkey", min(batch, samples - start), length, rng, model.config.vocab_size, haystack
        )
        for layer, rate in keep_rates(model, mx.array(inputs)).items():
            chunk = model.layers[layer].memory.config.chunk_size
            needle_chunk = (inputs == NEEDLE).argmax(1) // chunk
            question_chunk = (inputs == QUERY).argmax(1) // chunk
            between = np.arange(rate.shape[-1])[None, :]
            between = (between > needle_chunk[:, None]) & (between < question_chunk[:, None])
            keeps.setdefault(layer, []).append(rate.mean(-1))
            left.setdefault(layer, []).append(np.exp((np.log(rate) * between[:, None]).sum(-1)))
            at_needle.setdefault(layer, []).append(np.take_along_axis(rate, needle_chunk[:, None, None], -1)[..., 0])
    return [
        {
            "layer": layer,
            "head": head,
            "mean_keep": float(np.concatenate(keeps[layer])[:, head].mean()),
            "keep_at_needle": float(np.concatenate(at_needle[layer])[:, head].mean()),
            "needle_left_median": float(np.median(np.concatenate(left[layer])[:, head])),
        }
        for layer in keeps
        for head in range(keeps[layer][0].shape[1])
    ]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    scales = sorted({r["max_decay"] for r in rows}, reverse=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(scales)))
    fig, axes = plt.subplots(
        len(runs), len(tasks), figsize=(4 * len(tasks) + 1.8, 3 * len(runs)), squeeze=False, sharex=True, sharey=True
    )
    for r, run in enumerate(runs):
        for t, task in enumerate(tasks):
            ax = axes[r][t]
            for scale, colour in zip(scales, colours):
                pts = sorted(
                    (x["length"], 100 * x["accuracy"])
                    for x in rows
                    if x["run"] == run and x["task"] == task and x["max_decay"] == scale
                )
                ax.plot(*zip(*pts), marker="o", color=colour, label=f"max_decay {scale:g}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{run}: {task}")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel("accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("context length (tokens)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.forget_gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--work", default="runs/reproduce", help="benchmarks.reproduce's --work folder (default: its own)")
    p.add_argument("--runs", nargs="+", required=True, help="runs in WORK with a forget gate, trained and evaluated")
    p.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=[1, 0.3, 0.1, 0.03, 0],
        help="max_decay values to run the trained weights with (1: as trained)",
    )
    p.add_argument(
        "--out",
        default="benchmarks/results/niah_forget_gate.json",
        help="JSON results; the plot goes beside it as .png",
    )
    args = p.parse_args(argv)
    work = Path(args.work)
    results = {}
    for name in args.runs:
        result = work / name / "result.json"
        if not result.is_file():
            sys.exit(f"error: {result} not found: train and evaluate {name} with benchmarks.reproduce first")
        results[name] = json.loads(result.read_text())
        memory = results[name]["memory"] or {}
        if memory.get("weight_decay", True) is False or not memory:
            sys.exit(f"error: {name} has no forget gate")
        if memory.get("max_decay", 1) != 1:
            sys.exit(f"error: {name} was trained with max_decay {memory['max_decay']}; the scales assume 1")
    if any(not 0 <= s <= 1 for s in args.scales):
        sys.exit("error: --scales must lie in [0, 1]")
    valid = load_tokens(str(token_files(work)["valid"]))

    gates, rows, checkpoints = [], [], {}
    for name, result in results.items():
        s = result["settings"]
        checkpoint = checkpoints[name] = find_checkpoint(work / name / "train")
        model = load_model(checkpoint)
        for g in gate_summary(model, max(s["lengths"]), s["samples"], s["batch_size"], s["seed"], valid):
            gates.append({"run": name, **g})
            print(
                f"{name} layer {g['layer']} head {g['head']}: mean keep {g['mean_keep']:.4f}, at the needle "
                f"{g['keep_at_needle']:.4f}, needle left at the question (median) {g['needle_left_median']:.3g}",
                flush=True,
            )
        work_items = [(scale, task, length) for scale in args.scales for task in s["tasks"] for length in s["lengths"]]
        models = {}
        for scale, task, length in tqdm(work_items, desc=name):
            if scale not in models:
                models[scale] = load_model(checkpoint, memory={"max_decay": scale})
            acc = accuracy(models[scale], task, length, s["samples"], s["batch_size"], s["seed"], NIAH_BLOCK, valid)
            rows.append(
                {
                    "run": name,
                    "max_decay": scale,
                    "task": task,
                    "length": length,
                    "accuracy": acc,
                    "samples": s["samples"],
                }
            )
            tqdm.write(f"{name} max_decay {scale:g}: {task} at {length}: {100 * acc:.0f}%")
        reproduced = {(r["task"], r["length"]): r["accuracy"] for r in result["rows"]}
        same = [r for r in rows if r["run"] == name and r["max_decay"] == 1]
        if same:
            print(
                f"{name}: at max_decay 1 reproduce measured "
                + ", ".join(
                    f"{r['task']} {r['length']} {100 * reproduced[r['task'], r['length']]:.0f}% (here "
                    f"{100 * r['accuracy']:.0f}%)"
                    for r in same
                ),
                flush=True,
            )
    out = Path(args.out)
    write_json_atomic(
        out,
        {
            "device": device_name(),
            "command": command_line("benchmarks.forget_gate", argv),
            "settings": {name: r["settings"] for name, r in results.items()},
            "checkpoints": {name: path.name for name, path in checkpoints.items()},
            "gates": gates,
            "rows": rows,
        },
    )
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
