"""Needle-in-a-haystack and MQAR accuracy of a TitansLM (the tasks of tasks.py), and its plot against context length.

A sample is read through the model's cache in blocks of `block` tokens up to its answer (memory stays bounded for
the windowed variants), and counts as answered when every answer token is the argmax.
"""

import mlx.core as mx
import numpy as np

from .prefill import prefill
from .tasks import answered, make_batch


def answer_logits(model, inputs, first: int, block: int):
    """The logits of positions first.. of `inputs` (batch, n): what comes before them is fed through a new cache
    `block` tokens per call (memory stays bounded for the windowed variants), the rest in one call."""
    cache = model.make_cache()
    prefill(model, inputs[:, :first], cache, block)
    return model(inputs[:, first:], cache=cache)


def accuracy(model, task, length, samples, batch, seed, block, haystack=None) -> float:
    """The share of `samples` samples of `task` at `length` tokens (drawn from `seed`, `batch` at a time, hidden in
    `haystack`: a token array, or noise when None) that the model answers, reading `block` tokens per call."""
    rng = np.random.default_rng(seed)
    hits = []
    for start in range(0, samples, batch):
        inputs, targets, mask = make_batch(
            task, min(batch, samples - start), length, rng, model.config.vocab_size, haystack
        )
        first = int(mask.any(0).argmax())  # the first answer position of any sample
        logits = answer_logits(model, mx.array(inputs), first, block)
        hits.extend(answered(logits, targets[:, first:], mask[:, first:]))
    return float(np.mean(hits))


def plot(rows, path, line="model", window=None, value="accuracy"):
    """Accuracy (%) against context length, a panel per task and a line per `line` (rows' key naming the model),
    into the image file `path`; rows: {line, "task", "length", "accuracy"}. `window`: an attention window to mark.
    value="answer_loss": the rows' answer loss (nats per answer token) instead of the accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r[line] for r in rows))
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks) + 1.6, 3.4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for model, colour in zip(models, colours):
            scale = 100 if value == "accuracy" else 1
            pts = sorted((r["length"], scale * r[value]) for r in rows if r["task"] == task and r[line] == model)
            ax.plot(*zip(*pts), marker="o", label=model, color=colour)
        if window is not None:
            ax.axvline(window, color="grey", linestyle="--", label=f"attention window ({window})")
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)" if value == "accuracy" else "answer loss (nats per token)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
