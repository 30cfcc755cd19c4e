"""Needle-in-a-haystack and MQAR accuracy of a TitansLM (the tasks of tasks.py), and its plot against context length.

A sample is read in blocks of `block` tokens through the model's cache (memory stays bounded for the windowed
variants), and counts as answered when every answer token is the argmax.
"""

import mlx.core as mx
import numpy as np

from .tasks import TASKS, answered, make_batch


def logits_in_blocks(model, inputs, block: int):
    cache, outs = model.make_cache(), []
    for start in range(0, inputs.shape[1], block):
        out = model(inputs[:, start : start + block], cache)
        mx.eval(out, [c.state for c in cache])
        outs.append(out)
    return mx.concatenate(outs, axis=1)


def accuracy(model, task, length, samples, batch, seed, block, haystack=None) -> float:
    """The share of `samples` samples of `task` at `length` tokens (drawn from `seed`, `batch` at a time, hidden in
    `haystack`: a token array, or noise when None) that the model answers, reading `block` tokens per call."""
    rng = np.random.default_rng(seed)
    hits = []
    for start in range(0, samples, batch):
        inputs, targets, mask = make_batch(task, min(batch, samples - start), length, rng,
                                           model.config.vocab_size, haystack)
        logits = logits_in_blocks(model, mx.array(inputs), block)
        hits.extend(answered(logits, targets, mask))
    return float(np.mean(hits))


def plot(rows, path):
    """Accuracy (%) against context length, a panel per task and a line per model, into the image file `path`;
    rows: {"model", "task", "length", "accuracy"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}, key=TASKS.index)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks) + 1.6, 3.4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for model, colour in zip(models, colours):
            pts = sorted((r["length"], 100 * r["accuracy"]) for r in rows if r["task"] == task and r["model"] == model)
            ax.plot(*zip(*pts), marker="o", label=model, color=colour)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
