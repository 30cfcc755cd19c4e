"""Train a TitansQwen's memory on a frozen base: memory adapters, in mlx-lm's adapter layout.

    python -m mlx_titans.adapt --model qwen-titans --data books/ --adapter-path adapters --sample-length 16384
    python -m mlx_titans.adapt --model qwen-titans --data books/ --adapter-path adapters --resume   # continue
    python -m mlx_titans.adapt --model qwen-titans --data data/ ...   # mlx-lm's train.jsonl, valid.jsonl {"text": ...}
    python -m mlx_titans.generate --model qwen-titans --adapter-path adapters --file book.txt -p "..."
    mlx.launch -n 2 python -m mlx_titans.adapt ...                                 # data parallel

What trains: every memory layer's NeuralMemory (projections, gates, learned initial memory weights) and its
per-channel read gate, and optionally LoRA on the base's linears (mlx-lm's tuner, --lora-layers). Every base weight
is frozen, a quantized base included.

A sample is several times longer than the attention window. It goes through the model's own bounded cache segment by
segment (the code that runs at inference), and gradients flow back through the cache across segments: through the
window's keys and values and through the memory state, so that what a segment stores is trained by the losses of
the segments that read it. The backward pass goes segment by segment, recomputing each one's activations: what is
kept per segment is the cache at its start, so activation memory is bounded by one segment whatever the sample's
length (--no-grad-checkpoint: one graph for the whole sample, faster, memory growing with it).

Objectives: next-token cross-entropy (--teacher none), or distillation (--teacher full): the KL divergence from the
same base with full attention over the whole sample, so that the windowed model with memory learns to predict what
the full-context model predicts. Needle rows (--needle-fraction; mlx_titans.text_needles) count their answer
sentence only, with cross-entropy, weighted so that a needle row weighs as much as a text row.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .data import random_windows, shard, split_files, token_stream, valid_windows
from .files import cache_root, command_name, run_reporting_errors, save_safetensors_atomic, write_json_atomic
from .qwen import load as load_titans_qwen
from .qwen import load_plain_qwen
from .qwen.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, adapter_weights, make_trainable
from .qwen.model import output_layer
from .text_needles import TASKS, make_haystack, training_row
from .train import (
    barrier,
    checkpoints,
    lr_schedule,
    ranks_in_sync,
    read_checkpoint,
    read_trainer_state,
    step_loop,
    write_checkpoint,
)

DEFAULTS = {
    "model": None,
    "data": None,
    "adapter_path": "adapters",
    "resume": False,
    "sample_length": None,
    "batch_size": 1,
    "iters": 1000,
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup": 50,
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "needle_fraction": 0.5,
    "needle_tasks": list(TASKS),
    "teacher": "none",
    "lora_layers": 0,
    "lora_rank": 8,
    "lora_scale": 20.0,
    "grad_checkpoint": True,
    "seed": 0,
    "steps_per_report": 10,
    "steps_per_eval": 100,
    "val_batches": 8,
    "save_every": 100,
    "keep_checkpoints": 2,
}
TEACHERS = ("none", "full")


# ---------------------------------------------------------------------------------------------------- the loss
def token_losses(logits, targets, answer_rows, teacher_logits=None):
    """Per token: cross-entropy, or with a teacher the KL divergence from it, except in answer (needle) rows, which
    always take the cross-entropy. logits (b, n, vocab) float32, answer_rows (b,) bool."""
    ce = nn.losses.cross_entropy(logits, targets)
    if teacher_logits is None:
        return ce
    student = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    teacher = teacher_logits - mx.logsumexp(teacher_logits, axis=-1, keepdims=True)
    kl = (mx.exp(teacher) * (teacher - student)).sum(-1)
    return mx.where(answer_rows[:, None], ce, kl)


ARRAY = object()  # marks where a cache state's arrays go in its layout


def split_states(states):
    """Caches' states -> (their arrays, the layout: the rest, with ARRAY where each array goes)."""
    flat = tree_flatten(states)
    return [v for _, v in flat if isinstance(v, mx.array)], [
        (k, ARRAY if isinstance(v, mx.array) else v) for k, v in flat
    ]


def join_states(layout, arrays):
    arrays = iter(arrays)
    return tree_unflatten([(k, next(arrays) if v is ARRAY else v) for k, v in layout])


def segment_function(model, layout, next_layout: list, inputs, targets, weights, answer_rows, teacher_logits):
    """f(arrays) -> (weighted loss sum, the caches' next arrays) of one segment, fed through caches restored from
    `layout` and `arrays`; it writes the next layout into `next_layout`. Everything but the cache's arrays is a
    constant of the function, so that mx.vjp differentiates with respect to them alone (not the token ids)."""

    def run(arrays):
        cache = model.make_cache()  # fresh copies of the arrays: caches write into their buffers in place
        for c, state in zip(cache, join_states(layout, [a + 0 for a in arrays]) if layout else []):
            c.state = state
        logits = model(inputs, cache).astype(mx.float32)
        loss = (token_losses(logits, targets, answer_rows, teacher_logits) * weights).sum()
        arrays, next_layout[:] = split_states([c.state for c in cache])
        return loss, arrays

    return run


def segments(model, inputs, targets, weights, answer_rows, teacher_hidden, teacher_head):
    """The samples (b, n) cut at the titans segments: (inputs, targets, weights, teacher logits or None) each."""
    size = model.titans.segment_size
    for start in range(0, inputs.shape[1], size):
        piece = slice(start, start + size)
        teacher_logits = None if teacher_hidden is None else teacher_head(teacher_hidden[:, piece]).astype(mx.float32)
        yield inputs[:, piece], targets[:, piece], weights[:, piece], teacher_logits


def sample_loss(model, inputs, targets, weights, answer_rows, teacher_hidden=None, teacher_head=None, scale=1.0):
    """scale x the weighted token losses of samples (b, n) fed through a fresh cache one titans segment at a time,
    as one graph: its gradient keeps every segment's activations (memory grows with n; see `value_and_grad`)."""
    layout, arrays, total = [], [], mx.array(0.0)
    for piece in segments(model, inputs, targets, weights, answer_rows, teacher_hidden, teacher_head):
        next_layout = []
        loss, arrays = segment_function(model, layout, next_layout, *piece[:3], answer_rows, piece[3])(arrays)
        layout, total = next_layout, total + loss
    return total * scale


def value_and_grad(model, inputs, targets, weights, answer_rows, teacher_hidden=None, teacher_head=None, scale=1.0):
    """sample_loss and its gradient with respect to the model's trainable parameters, with memory bounded by one
    segment: a forward pass keeps only the cache at each segment's start, then the backward pass goes from the last
    segment to the first, recomputing each one's activations (mx.vjp) and handing the gradient with respect to its
    starting cache to the segment before it. Exactly the gradient of the whole graph, for one more forward pass."""
    names, values = zip(*tree_flatten(model.trainable_parameters()))
    runs, starts, total = [], [([], [])], mx.array(0.0)  # starts: (layout, arrays) of the cache at each segment
    for piece in segments(model, inputs, targets, weights, answer_rows, teacher_hidden, teacher_head):
        next_layout = []
        runs.append(segment_function(model, starts[-1][0], next_layout, *piece[:3], answer_rows, piece[3]))
        loss, arrays = runs[-1](starts[-1][1])
        mx.eval(loss, arrays)
        starts.append((next_layout, arrays))
        total = total + loss
    grads, cotangents = [mx.zeros_like(v) for v in values], [mx.zeros_like(a) for a in starts[-1][1]]
    for run, (_, arrays) in zip(reversed(runs), reversed(starts[:-1])):

        def segment(*primals, run=run):
            model.update(tree_unflatten(list(zip(names, primals[: len(names)]))))
            loss, next_arrays = run(list(primals[len(names) :]))
            return [loss, *next_arrays]

        _, vjps = mx.vjp(segment, [*values, *arrays], [mx.array(scale, dtype=mx.float32), *cotangents])
        grads = [g + d for g, d in zip(grads, vjps[: len(names)])]
        cotangents = vjps[len(names) :]
        mx.eval(grads, cotangents)
    model.update(tree_unflatten(list(zip(names, values))))
    return total * scale, tree_unflatten(list(zip(names, grads)))


# ---------------------------------------------------------------------------------------------------- data
def text_streams(data, tokenizer, cache_dir) -> dict:
    """{"train", "valid"}: token streams of a folder of .txt documents (train/ and valid/ subfolders, else every
    10th document is held out) or of mlx-lm's train.jsonl / valid.jsonl {"text": ...} rows."""
    return {
        split: token_stream(files, tokenizer.backend_tokenizer, cache_dir, split)
        for split, files in split_files(data).items()
    }


def draw_batch(c: dict, stream, haystack, tokenizer, rng):
    """A global batch (inputs, targets, weights, answer_rows) of one of the sample lengths, drawn at random: each row
    a needle row with probability needle_fraction (its answer tokens weighing length / answer tokens each), else a
    random window of the text."""
    lengths, rows = c["sample_length"], []
    # a single length draws nothing from rng, so that runs from before several lengths resume exactly
    L = lengths[rng.integers(len(lengths))] if len(lengths) > 1 else lengths[0]
    for _ in range(c["batch_size"]):
        if rng.uniform() < c["needle_fraction"]:
            task = c["needle_tasks"][rng.integers(len(c["needle_tasks"]))]
            inputs, targets, mask = training_row(task, tokenizer, haystack, L, rng)
            rows.append((inputs, targets, mask * (L / mask.sum()), True))
        else:
            inputs, targets, weights = random_windows(stream, 1, L, rng)
            rows.append((inputs[0], targets[0], weights[0], False))
    inputs, targets, weights, answer_rows = zip(*rows)
    return np.stack(inputs), np.stack(targets), np.stack(weights).astype(np.float32), np.array(answer_rows)


def validation_batches(c: dict, stream, haystack, tokenizer) -> list:
    """The same held-out batches at every evaluation, at the longest sample length: windows of the valid text, and
    as many needle rows in it."""
    L, B = max(c["sample_length"]), c["batch_size"]
    text = [(*batch, np.zeros(B, bool)) for batch in valid_windows(stream, B, L, c["val_batches"])]
    rng = np.random.default_rng([0x7A11D, 1])
    needles = []
    for _ in text:
        rows = [
            training_row(c["needle_tasks"][i % len(c["needle_tasks"])], tokenizer, haystack, L, rng) for i in range(B)
        ]
        inputs, targets, masks = (np.stack(a) for a in zip(*rows))
        needles.append((inputs, targets, masks.astype(np.float32), np.ones(B, bool)))
    return text + needles


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate(model, batches, group) -> dict:
    """Held-out mean losses: text tokens, text tokens beyond the window, needle answers (each process its rows)."""
    sums = {"text": mx.array(0.0), "beyond_window": mx.array(0.0), "answer": mx.array(0.0)}
    counts = {k: mx.array(0.0) for k in sums}
    blind = model.titans.first_beyond_window
    for batch in batches:
        inputs, targets, weights, answer_rows = (mx.array(a) for a in shard(batch, group.rank(), group.size()))
        cache, size = model.make_cache(), model.titans.segment_size
        for start in range(0, inputs.shape[1], size):
            piece = slice(start, start + size)
            logits = model(inputs[:, piece], cache).astype(mx.float32)
            ce = nn.losses.cross_entropy(logits, targets[:, piece]) * weights[:, piece]
            position = mx.arange(start, start + ce.shape[1])[None]
            parts = {
                "answer": answer_rows[:, None],
                "text": ~answer_rows[:, None],
                "beyond_window": (~answer_rows[:, None]) & (position >= blind),
            }
            for name, keep in parts.items():
                keep = mx.broadcast_to(keep, ce.shape)
                sums[name] = sums[name] + mx.where(keep, ce, 0).sum()
                counts[name] = counts[name] + mx.where(keep, weights[:, piece], 0).sum()
            mx.eval(sums, counts, [c.state for c in cache])
    result = {}
    for name in sums:
        total = mx.distributed.all_sum(sums[name], group=group).item()
        count = mx.distributed.all_sum(counts[name], group=group).item()
        result[f"{name}_loss"] = total / count if count else None
    return result


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class Run:
    config: dict
    group: mx.distributed.Group
    model: nn.Module
    tokenizer: object
    teacher: Optional[nn.Module]
    optimizer: optim.Optimizer
    streams: dict
    haystack: object
    valid: list
    rng: np.random.Generator
    step: int


def load_teacher(path, model):
    """The base with full attention (stock mlx-lm), sharing the student's base weights (no second copy)."""
    teacher, _ = load_plain_qwen(path, lazy=True)
    base = [(k, v) for k, v in tree_flatten(model.parameters()) if ".memory" not in k]
    teacher.update(tree_unflatten(base))
    return teacher


def check_config(c: dict, world_size: int) -> None:
    """Every setting that can be wrong, before anything is loaded or written."""
    for key in ("model", "data"):
        if not c[key]:
            raise ValueError(f"--{key} is required")
    if c["teacher"] not in TEACHERS:
        raise ValueError(f"--teacher must be one of {', '.join(TEACHERS)}, got {c['teacher']!r}")
    unknown = set(c["needle_tasks"]) - set(TASKS)
    if unknown or not c["needle_tasks"]:
        raise ValueError(f"--needle-tasks: unknown {sorted(unknown)}; choose from {', '.join(TASKS)}")
    if not 0 <= c["needle_fraction"] <= 1:
        raise ValueError(f"--needle-fraction must be in [0, 1], got {c['needle_fraction']}")
    for key in (
        "batch_size",
        "iters",
        "steps_per_report",
        "steps_per_eval",
        "val_batches",
        "save_every",
        "keep_checkpoints",
        "lora_rank",
    ):
        if c[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {c[key]}")
    if c["lora_layers"] < 0:
        raise ValueError(f"--lora-layers must be >= 0, got {c['lora_layers']}")
    if c["batch_size"] % world_size:
        raise ValueError(f"--batch-size {c['batch_size']} is not divisible by the {world_size} processes")
    found = checkpoints(c["adapter_path"])
    if c["resume"] and not found:
        raise ValueError(f"--resume: no checkpoint in {c['adapter_path']}")
    if not c["resume"] and (found or (Path(c["adapter_path"]) / ADAPTER_WEIGHTS).exists()):
        raise ValueError(
            f"{c['adapter_path']} already holds adapters: --resume continues, or pick another --adapter-path"
        )


def open_base(path):
    """The TitansQwen at `path`: one clear error for anything else."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no model folder at {path} (no config.json)")
    if "titans" not in json.loads(config_file.read_text()):
        raise ValueError(
            f"{path} is not a TitansQwen folder (config.json has no titans section): convert it with "
            "mlx-titans-convert-qwen first"
        )
    model, tokenizer, _ = load_titans_qwen(path)
    return model, tokenizer


def setup(c: dict) -> Run:
    """Everything that can fail on bad settings or inputs, before the first step."""
    group = mx.distributed.init()
    check_config(c, group.size())
    model, tokenizer = open_base(c["model"])
    titans = model.titans
    lengths = c["sample_length"] or [4 * titans.window, 8 * titans.window, 16 * titans.window]
    c["sample_length"] = [lengths] if isinstance(lengths, int) else lengths  # an int: a run from before lists
    if min(c["sample_length"]) <= titans.window + titans.sink_tokens:
        raise ValueError(
            f"--sample-length {min(c['sample_length'])} is not longer than the window ({titans.window} "
            f"tokens and {titans.sink_tokens} sinks): the memory would have nothing to carry"
        )
    if c["lora_layers"] > len(model.layers):
        raise ValueError(f"--lora-layers {c['lora_layers']} is more than the model's {len(model.layers)} layers")
    out, cache_dir = Path(c["adapter_path"]), cache_root() / "tokens"
    if group.rank() == 0:  # rank 0 fills the token cache, then the others read it
        streams = text_streams(c["data"], tokenizer, cache_dir)
    barrier(group)
    if group.rank() != 0:
        streams = text_streams(c["data"], tokenizer, cache_dir)
    for split, stream in streams.items():
        if len(stream) <= max(c["sample_length"]) + 1:
            raise ValueError(
                f"the {split} documents hold {len(stream)} tokens, too few for one sample of {max(c['sample_length'])}"
            )
    teacher = load_teacher(c["model"], model) if c["teacher"] == "full" else None
    mx.random.seed(c["seed"])  # LoRA's random initialization: the same on every process, and in every run
    make_trainable(model, c["lora_layers"], c["lora_rank"], c["lora_scale"])
    haystacks = {split: make_haystack(stream, tokenizer) for split, stream in streams.items()}
    valid = validation_batches(c, streams["valid"], haystacks["valid"], tokenizer)
    rng = np.random.default_rng(c["seed"])
    optimizer = optim.AdamW(
        lr_schedule({**c, "steps": c["iters"]}), betas=c["betas"], weight_decay=c["weight_decay"], bias_correction=True
    )
    step = 0
    if c["resume"]:
        checkpoint = checkpoints(out)[-1]
        model.load_weights(str(checkpoint / ADAPTER_WEIGHTS), strict=False)
        step = read_checkpoint(checkpoint, optimizer, model.trainable_parameters(), rng)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    out.mkdir(parents=True, exist_ok=True)
    return Run(c, group, model, tokenizer, teacher, optimizer, streams, haystacks["train"], valid, rng, step)


def train_step(run: Run, batch) -> tuple:
    """One optimizer step on this process's rows of a global batch: (loss, gradient norm). Each process divides its
    loss by the global batch's weight, so that averaging over processes gives the whole batch's gradient."""
    c, model, group = run.config, run.model, run.group
    global_weight = float(batch[2].sum())
    inputs, targets, weights, answer_rows = (mx.array(a) for a in shard(batch, group.rank(), group.size()))
    teacher_hidden = None if run.teacher is None else mx.stop_gradient(run.teacher.model(inputs))
    head = None if run.teacher is None else output_layer(run.teacher)

    args = (inputs, targets, weights, answer_rows, teacher_hidden, head, group.size() / global_weight)
    if c["grad_checkpoint"]:
        loss, grads = value_and_grad(model, *args)
    else:
        loss, grads = nn.value_and_grad(model, lambda model: sample_loss(model, *args))(model)
    grads = nn.average_gradients(grads, group)
    grads, grad_norm = optim.clip_grad_norm(grads, c["grad_clip"])
    run.optimizer.update(model, grads)
    return mx.distributed.all_sum(loss, group=group) / group.size(), grad_norm


def save_checkpoint(run: Run, step: int) -> Path:
    """ADAPTERS/step-NNNNNNNN/: the adapters and the trainer's state (mlx_titans.train's checkpoint layout)."""
    return write_checkpoint(
        Path(run.config["adapter_path"]),
        step,
        lambda folder: write_adapters(folder, run),
        run.optimizer,
        run.rng,
        run.config,
    )


def write_adapters(folder: Path, run: Run) -> None:
    """adapters.safetensors and adapter_config.json, each written whole or not at all."""
    c = run.config
    save_safetensors_atomic(folder / ADAPTER_WEIGHTS, adapter_weights(run.model), {"format": "mlx"})
    write_json_atomic(
        folder / ADAPTER_CONFIG, adapter_config(run.model, c["lora_layers"], c["lora_rank"], c["lora_scale"], c)
    )


def adapt(config: dict) -> dict:
    """Train memory adapters: `config` is DEFAULTS updated with settings; the summary comes back (and goes to
    ADAPTERS/summary.json). Bad settings or inputs raise ValueError before the first step."""
    run = setup(config)
    c, model, group = run.config, run.model, run.group

    def one_step():
        batch = draw_batch(c, run.streams["train"], run.haystack, run.tokenizer, run.rng)
        return (*train_step(run, batch), batch[0].size)

    mx.reset_peak_memory()
    done = step_loop(
        run.step,
        c["iters"],
        one_step,
        lambda: evaluate(model, run.valid, group),
        lambda step: save_checkpoint(run, step),
        (c["steps_per_report"], c["steps_per_eval"], c["save_every"]),
        [model.state, run.optimizer.state],
        run.optimizer,
        group.rank(),
        Path(c["adapter_path"]) / "log.jsonl",
    )
    step = max(run.step, c["iters"])
    summary = {
        "step": step,
        "train_loss": done["train_loss"],
        **done["valid"],
        "run_tokens": done["tokens"],  # this run's steps (sample lengths may vary, and differ from a resumed run's)
        "tokens_per_s": done["tokens_per_s"],
        "train_seconds": done["train_seconds"],
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "trainable_parameters": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
        "processes": group.size(),
        "ranks_in_sync": ranks_in_sync(model, group),
    }
    if group.rank() == 0:
        write_adapters(Path(c["adapter_path"]), run)
        write_json_atomic(Path(c["adapter_path"]) / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("mlx_titans.adapt"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    D = DEFAULTS

    def add(flag, help, **kw):  # every default is None, so that a resumed run's settings hold unless a flag is given
        default = D[kw.get("dest", flag[2:].replace("-", "_"))]
        p.add_argument(flag, default=None, help=help if "action" in kw else f"{help} (default: {default})", **kw)

    add("--model", "a TitansQwen folder (mlx-titans-convert-qwen's output), a 4-bit base included")
    add(
        "--data",
        "a folder of .txt documents (train/ and valid/ subfolders, else every 10th is held out), or of "
        'mlx-lm\'s train.jsonl and valid.jsonl, each {"text": ...} row a document',
    )
    add("--adapter-path", "output folder: adapters.safetensors, adapter_config.json, step-N/ checkpoints, log.jsonl")
    add("--resume", "continue from the newest checkpoint in --adapter-path", action="store_true")
    add(
        "--sample-length",
        "tokens per training sample; several lengths: each step draws one of them, so that the memory learns to "
        "recall from every distance in between (validation at the longest; default: 4, 8 and 16 x the window)",
        type=int,
        nargs="+",
    )
    add("--batch-size", "samples per step (global)", type=int)
    add("--iters", "optimizer steps", type=int)
    add("--learning-rate", "peak learning rate (warm-up, then cosine to min-lr-ratio x it)", type=float, dest="lr")
    add("--warmup", "warm-up steps", type=int)
    add("--min-lr-ratio", "final learning rate / peak", type=float)
    add("--weight-decay", "AdamW weight decay", type=float)
    add("--grad-clip", "clip the global gradient norm to this", type=float)
    add("--needle-fraction", "share of samples that are text needle rows", type=float)
    add("--needle-tasks", "text needle tasks mixed in (a task named twice is drawn twice as often)", nargs="+")
    add("--teacher", "none: next-token loss; full: KL to the base with full attention over the whole sample")
    add("--lora-layers", "LoRA on the base's linears of the last N layers (0: none)", type=int)
    add("--lora-rank", "LoRA rank", type=int)
    add("--lora-scale", "LoRA scale", type=float)
    p.add_argument(
        "--no-grad-checkpoint",
        dest="grad_checkpoint",
        action="store_false",
        default=None,
        help="keep every segment's activations for the backward pass (more memory, less compute)",
    )
    add("--seed", "seeds the data order and LoRA's initialization", type=int)
    add("--steps-per-report", "steps between progress updates", type=int)
    add("--steps-per-eval", "steps between held-out evaluations (and at the end)", type=int)
    add("--val-batches", "held-out text batches per evaluation (and as many of needles)", type=int)
    add("--save-every", "steps between checkpoints (and at the end)", type=int)
    add("--keep-checkpoints", "newest checkpoints kept", type=int)
    return p


def resolve_config(flags: dict) -> dict:
    """DEFAULTS < a resumed run's settings < the flags given."""
    given = {k: v for k, v in flags.items() if v is not None}
    saved = {}
    if given.get("resume"):
        found = checkpoints(given.get("adapter_path", DEFAULTS["adapter_path"]))
        if found:
            saved = read_trainer_state(found[-1])["config"]
    return {**DEFAULTS, **saved, **given}


def main(argv=None) -> int:
    flags = vars(build_parser().parse_args(argv))
    summary = {}
    code = run_reporting_errors(
        lambda: summary.update(adapt(resolve_config(flags))),
        (OSError, ValueError, RuntimeError, FloatingPointError),
        "the checkpoints written so far are kept (--resume continues)",
    )
    if code == 0 and mx.distributed.init().rank() == 0:
        print(json.dumps(summary), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
