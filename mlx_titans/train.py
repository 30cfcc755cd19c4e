"""Train a TitansLM on a folder of text or on a synthetic task.

    python -m mlx_titans.train --data DIR --vocab-size 8192 --out runs/books [--config run.json] [flags]
    python -m mlx_titans.train --resume runs/books                        # continue exactly where it stopped
    mlx.launch -n 2 --backend ring python -m mlx_titans.train ...          # data parallel

Settings: defaults < the resumed run's settings < the --config JSON file < flags.

Data parallel: --batch-size is the global batch. Every process draws the same global batch from the same seed and
trains on its own rows of it, and gradients are averaged, so N processes compute what one process computes on the
whole batch (up to summation order), and a run can resume on another number of processes.

Mixed precision (--dtype bfloat16): parameters and optimizer state stay float32; the loss casts the
parameters to the compute dtype, so the forward and backward run in it and the gradients come back in float32
through the cast. Logits, the loss and evaluation are float32.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .data import load_task_source, random_windows, shard, split_files, token_stream, valid_windows
from .files import (
    atomic_folder,
    command_name,
    read_json_object,
    read_safetensors,
    run_reporting_errors,
    write_json_atomic,
)
from .model import TitansLM, TitansLMConfig, save_model
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

MODEL_KEYS = ("variant", "dim", "layers", "heads", "mlp_dim", "window", "persistent_tokens", "memory", "memory_layers")
DEFAULTS = {
    "data": None,
    "tokenizer": None,
    "vocab_size": None,
    "cache_dir": None,
    "task": None,
    "task_source": "mlx_titans.tasks:make_batch",
    "task_kwargs": {},
    "steps": 1000,
    "batch_size": 8,
    "seq_len": 512,
    "lr": 4e-4,
    "min_lr_ratio": 0.1,
    "warmup": 100,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "dtype": "float32",
    "seed": 0,
    "out": None,
    "resume": None,
    "log_every": 10,
    "eval_every": 200,
    "eval_batches": 16,
    "checkpoint_every": 500,
    "keep_checkpoints": 2,
}
SETTING_TYPES = {  # None only where the default is None
    **{key: (int, float) if type(d) is float else type(d) for key, d in DEFAULTS.items()},
    **dict.fromkeys(("data", "tokenizer", "cache_dir", "task", "out", "resume"), (str, os.PathLike, type(None))),
    "vocab_size": (int, type(None)),
}
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
VALID_SEED = [0x7A11D, 0]  # synthetic tasks: one fixed validation set for every run and seed


def json_arg(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_name("mlx_titans.train"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )

    def add(flag, help, default=None, **kw):
        dest = flag[2:].replace("-", "_")
        default = default if default is not None else DEFAULTS.get(dest, getattr(TitansLMConfig, dest, None))
        parser.add_argument(flag, help=help if default is None else f"{help} (default: {default})", **kw)

    add("--config", "JSON file of settings, keys as the flags' names with underscores")
    add("--variant", "mac, mag, mal, lmm, swa or transformer")
    add("--dim", "model width", type=int)
    add("--layers", "number of blocks", type=int)
    add("--heads", "attention heads", type=int)
    add("--mlp-dim", "feed-forward width (default: 8/3 dim, rounded up to a multiple of 32)", type=int)
    add("--window", "sliding-window size (mag, mal, swa) or segment length (mac)", type=int)
    add("--persistent-tokens", "learned persistent memory tokens", type=int)
    add(
        "--memory",
        'MemoryConfig options as JSON, e.g. \'{"chunk_size": 16, "conv_size": 4}\'',
        default="{}",
        type=json_arg,
    )
    add("--memory-layers", "JSON list of the layers with a memory", default="all", type=json_arg)
    add("--data", "text folder: train/ and valid/ subfolders of .txt files, or .txt files split by file")
    add("--tokenizer", "tokenizer.json to use with --data")
    add(
        "--vocab-size",
        "with --data: train a byte-level BPE of this size into OUT/tokenizer.json; with --task: the task's vocabulary",
        type=int,
    )
    add("--cache-dir", "where the encoded token streams are cached as .npy", default="OUT")
    add("--task", "synthetic task instead of --data, e.g. passkey or mqar (a name for the task source)")
    add(
        "--task-source",
        "module:function(task, batch, length, rng, vocab, **task_kwargs) -> (inputs, targets, loss_mask)",
    )
    add("--task-kwargs", "JSON object of extra keyword arguments for the task source", type=json_arg)
    add("--steps", "total optimizer steps", type=int)
    add("--batch-size", "sequences per step, over all processes", type=int)
    add("--seq-len", "tokens per training sequence", type=int)
    add("--lr", "peak learning rate (AdamW)", type=float)
    add("--min-lr-ratio", "the cosine decays to lr x this", type=float)
    add("--warmup", "linear warm-up steps from 0 to lr", type=int)
    add("--betas", "AdamW betas", nargs=2, type=float)
    add("--weight-decay", "AdamW weight decay", type=float)
    add("--grad-clip", "clip the global gradient norm to this", type=float)
    add("--dtype", "compute dtype: float32, or bfloat16 as mixed precision")
    add("--seed", "seeds the initial weights and the data order", type=int)
    add(
        "--out",
        "run folder: checkpoints step-NNNNNNNN/, log.jsonl, tokenizer.json, summary.json (printed too, at "
        "the end); on --resume, the resumed run's",
    )
    add("--resume", "continue from a checkpoint folder or the newest checkpoint in a run folder")
    add("--log-every", "steps between progress updates (the only host syncs on the hot path)", type=int)
    add("--eval-every", "steps between held-out evaluations (and at the end)", type=int)
    add("--eval-batches", "held-out batches per evaluation", type=int)
    add("--checkpoint-every", "steps between checkpoints (and at the end)", type=int)
    add("--keep-checkpoints", "newest checkpoints kept", type=int)
    return parser


def read_settings(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    settings = read_json_object(path, "config file ")
    unknown = set(settings) - set(DEFAULTS) - set(MODEL_KEYS)
    if unknown:
        raise ValueError(f"config file {path} has unknown settings {sorted(unknown)}")
    return settings


def checkpoints(folder) -> list:
    return sorted(p.parent for p in Path(folder).glob("step-*/trainer_state.json"))


def find_checkpoint(path) -> Path:
    """A checkpoint folder, or the newest checkpoint in a run folder."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path} (neither trainer_state.json nor step-*/trainer_state.json)")
    return found[-1]


def read_trainer_state(checkpoint: Path) -> dict:
    """trainer_state.json of a checkpoint (mlx_titans.train's or mlx_titans.adapt's); one clear error if damaged."""
    file = Path(checkpoint) / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if (
        not isinstance(state, dict)
        or not {"step", "data_rng", "config"} <= set(state)
        or not isinstance(state["config"], dict)
    ):
        raise ValueError(f"{file} is not a trainer state (needs step, data_rng and config)")
    if type(state["step"]) is not int or state["step"] < 0:
        raise ValueError(f"{file}: step must be a count of steps, got {state['step']!r}")
    return state


def parse_settings(argv=None) -> dict:
    """A command line's settings: the --config file's, and the flags over them."""
    flags = vars(build_parser().parse_args(argv))
    from_file = read_settings(flags.pop("config")) if "config" in flags else {}
    return {**from_file, **flags}


def resolve_config(settings: dict) -> dict:
    """A run's whole config: the defaults < the resumed run's settings (settings["resume"]: a checkpoint, or a run
    folder for its newest) < `settings`."""
    resume = settings.get("resume")
    saved = {}
    if resume:
        checkpoint = find_checkpoint(resume)
        saved = read_trainer_state(checkpoint)["config"]
        saved["resume"] = str(checkpoint)
        if (checkpoint / "tokenizer.json").is_file():
            saved["tokenizer"] = str(checkpoint / "tokenizer.json")
    config = {**DEFAULTS, **saved, **settings}
    if resume:
        config["resume"] = saved["resume"]
    return config


def check_config(c: dict, world_size: int) -> None:
    unknown = set(c) - set(DEFAULTS) - set(MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    for key, kind in SETTING_TYPES.items():  # a --config file or a resumed run's JSON may hold anything
        if not isinstance(c[key], kind) or type(c[key]) is bool:
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"setting {key} must be of type {names}, got {c[key]!r}")
    if not c["out"]:
        raise ValueError("--out DIR is required")
    if (c["data"] is None) == (c["task"] is None):
        raise ValueError("give --data DIR (text) or --task NAME (synthetic), not both or neither")
    if c["data"] is not None and (c["tokenizer"] is None) == (c["vocab_size"] is None):
        raise ValueError("with --data, give --tokenizer FILE or --vocab-size N (to train one), not both or neither")
    if c["task"] is not None and not c["vocab_size"]:
        raise ValueError("with --task, give --vocab-size N")
    model_config(c, vocab_size=1)  # fails early on a bad variant or memory option
    if c["dtype"] not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {c['dtype']!r}")
    for key in (
        "steps",
        "batch_size",
        "seq_len",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        if c[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {c[key]}")
    for key in ("lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip"):
        if not c[key] >= 0:  # NaN too
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {c[key]}")
    if len(c["betas"]) != 2 or not all(type(b) in (int, float) and 0 <= b < 1 for b in c["betas"]):
        raise ValueError(f"--betas must be two numbers in [0, 1), got {c['betas']}")
    if c["batch_size"] % world_size:
        raise ValueError(f"--batch-size {c['batch_size']} is not divisible by the {world_size} processes")
    if not c["resume"] and checkpoints(c["out"]):
        raise ValueError(f"{c['out']} already holds checkpoints: --resume {c['out']} continues, or pick another --out")


def model_config(c: dict, vocab_size: int) -> TitansLMConfig:
    return TitansLMConfig(vocab_size=vocab_size, **{k: c[k] for k in MODEL_KEYS if k in c})


def barrier(group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))


def prepare_text(c: dict, out: Path, group):
    """Rank 0 trains or copies the tokenizer into OUT and fills the token cache; then the other processes read them."""
    splits = split_files(c["data"])
    tokenizer_file = out / "tokenizer.json"

    def load():
        tokenizer = load_tokenizer(tokenizer_file)
        return tokenizer, {s: token_stream(f, tokenizer, c["cache_dir"] or out, s) for s, f in splits.items()}

    if group.rank() == 0:
        if c["vocab_size"]:
            save_tokenizer(train_tokenizer(splits["train"], c["vocab_size"]), tokenizer_file)
        else:
            save_tokenizer(load_tokenizer(c["tokenizer"]), tokenizer_file)
        loaded = load()
    barrier(group)
    c.update(tokenizer=str(tokenizer_file), vocab_size=None)
    return loaded if group.rank() == 0 else load()


@dataclass
class Run:
    config: dict
    group: mx.distributed.Group
    model: TitansLM
    optimizer: optim.Optimizer
    sample_batch: Callable  # () -> a global training batch, drawn from rng
    rng: np.random.Generator
    valid_batches: list
    tokenizer_file: Optional[Path]
    step: int


def lr_schedule(c: dict):
    cosine = optim.cosine_decay(c["lr"], max(c["steps"] - c["warmup"], 1), c["lr"] * c["min_lr_ratio"])
    if not c["warmup"]:
        return cosine
    return optim.join_schedules([optim.linear_schedule(0.0, c["lr"], c["warmup"]), cosine], [c["warmup"]])


def setup(c: dict) -> Run:
    """Everything that can fail on bad settings or inputs, before the first step."""
    group = mx.distributed.init()
    check_config(c, group.size())
    rng = np.random.default_rng(c["seed"])
    B, L = c["batch_size"], c["seq_len"]
    if c["task"] is not None:
        make_batch, vocab, tokenizer_file = load_task_source(c["task_source"]), c["vocab_size"], None
        valid_rng = np.random.default_rng(VALID_SEED)
        valid = [make_batch(c["task"], B, L, valid_rng, vocab, **c["task_kwargs"]) for _ in range(c["eval_batches"])]
        sample_batch = partial(make_batch, c["task"], B, L, rng, vocab, **c["task_kwargs"])
    else:
        tokenizer, streams = prepare_text(c, Path(c["out"]), group)
        vocab, tokenizer_file = tokenizer.get_vocab_size(), Path(c["tokenizer"])
        if len(streams["train"]) < L + 1:
            raise ValueError(f"the training split has {len(streams['train'])} tokens, fewer than seq-len + 1")
        valid = valid_windows(streams["valid"], B, L, c["eval_batches"])
        sample_batch = partial(random_windows, streams["train"], B, L, rng)

    mx.random.seed(c["seed"])
    model = TitansLM(model_config(c, vocab))
    optimizer = optim.AdamW(lr_schedule(c), betas=c["betas"], weight_decay=c["weight_decay"], bias_correction=True)
    step = 0
    if c["resume"]:
        checkpoint = Path(c["resume"])
        model.load_weights(str(checkpoint / "model.safetensors"))
        step = read_checkpoint(checkpoint, optimizer, model.trainable_parameters(), rng)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    Path(c["out"]).mkdir(parents=True, exist_ok=True)
    return Run(c, group, model, optimizer, sample_batch, rng, valid, tokenizer_file, step)


def token_loss(model, inputs, targets, mask):
    """Summed cross-entropy over the tokens the mask keeps, and their number."""
    ce = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets) * mask
    return ce.sum(), mask.sum()


def make_train_step(model, optimizer, compute_dtype, grad_clip: float, group):
    def loss_fn(params, inputs, targets, mask):
        model.update(tree_map(lambda p: p.astype(compute_dtype), params))
        total, count = token_loss(model, inputs, targets, mask)
        return total / count

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        params = model.trainable_parameters()
        loss, grads = mx.value_and_grad(loss_fn)(params, inputs, targets, mask)
        model.update(params)  # back to the float32 parameters, which the optimizer updates
        grads = nn.average_gradients(grads, group)
        grads, grad_norm = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return mx.distributed.all_sum(loss, group=group) / group.size(), grad_norm

    return step


def to_device(batch):
    inputs, targets, mask = batch
    return mx.array(inputs, dtype=mx.int32), mx.array(targets, dtype=mx.int32), mx.array(mask, dtype=mx.float32)


def evaluate(model, batches, group) -> float:
    """Mean held-out loss per token; each process evaluates its rows of every batch."""
    total = count = mx.array(0.0)
    for batch in batches:
        t, n = token_loss(model, *to_device(shard(batch, group.rank(), group.size())))
        total, count = total + t, count + n
        mx.eval(total, count)
    return (mx.distributed.all_sum(total, group=group) / mx.distributed.all_sum(count, group=group)).item()


def ranks_in_sync(model, group) -> bool:
    if group.size() == 1:
        return True
    flat = mx.concatenate([p.reshape(-1) for _, p in tree_flatten(model.parameters())])
    return mx.array_equal(mx.distributed.all_max(flat, group=group), mx.distributed.all_min(flat, group=group)).item()


def write_checkpoint(folder: Path, step: int, write_weights, optimizer, rng, config: dict) -> Path:
    """folder/step-NNNNNNNN/: what write_weights(path) writes, the optimizer state and trainer_state.json (the step,
    the data order's RNG state, the config), written to a hidden folder renamed into place; checkpoints beyond
    config["keep_checkpoints"] are pruned. mlx_titans.train and mlx_titans.adapt write theirs with it."""
    path = folder / f"step-{step:08d}"
    with atomic_folder(path) as tmp:
        write_weights(tmp)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        trainer_state = {"step": step, "data_rng": rng.bit_generator.state, "config": config}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    for old in checkpoints(folder)[: -config["keep_checkpoints"]]:
        shutil.rmtree(old)
    return path


def read_checkpoint(checkpoint: Path, optimizer, parameters, rng) -> int:
    """The optimizer state (of `parameters`, the model's trainable ones) and the data order's RNG state back from a
    checkpoint; returns its step."""
    arrays, _ = read_safetensors(checkpoint / "optimizer.safetensors", "optimizer")
    optimizer.init(parameters)  # a fresh state: the saved one must match it, key for key
    fresh = dict(tree_flatten(optimizer.state))
    if set(arrays) != set(fresh) or any(
        (arrays[k].shape, arrays[k].dtype) != (v.shape, v.dtype) for k, v in fresh.items()
    ):
        raise ValueError(f"{checkpoint}/optimizer.safetensors does not fit the model's trainable parameters")
    optimizer.state = tree_unflatten(list(arrays.items()))
    trainer_state = read_trainer_state(checkpoint)
    try:
        rng.bit_generator.state = trainer_state["data_rng"]
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f"{checkpoint}/trainer_state.json: data_rng is not a generator state ({e})") from None
    return trainer_state["step"]


def save_checkpoint(run: Run, step: int) -> Path:
    """out/step-NNNNNNNN/: the model folder (config.json, model.safetensors, tokenizer.json) and the trainer's state."""
    return write_checkpoint(
        Path(run.config["out"]),
        step,
        lambda folder: save_model(folder, run.model, run.tokenizer_file),
        run.optimizer,
        run.rng,
        run.config,
    )


def step_loop(
    start: int,
    steps: int,
    one_step,
    evaluate,
    save,
    every: tuple,
    state,
    optimizer,
    rank: int,
    log_path,
) -> dict:
    """The loop mlx_titans.train and mlx_titans.adapt share: one_step() -> (loss, grad norm, tokens) of an optimizer
    step (two arrays and its token count), evaluated with `state` (the model's and optimizer's); every = (report,
    evaluate, save) periods in steps, the last step doing all three. Reports go to a progress bar (loss, tok/s) and,
    on rank 0, to log.jsonl; evaluate() gives a dict of held-out metrics; save(step) writes a checkpoint (rank 0) and
    returns its path. Returns the last train loss and metrics, the training time (evaluations and checkpoints
    excluded), the tokens this run's steps took and the last checkpoint."""
    report_every, eval_every, save_every = every
    step, losses, window_steps, window_time, train_time = start, mx.array(0.0), 0, 0.0, 0.0
    window_tokens = run_tokens = 0
    train_loss, valid, checkpoint = None, {}, None
    # closed on an error too, so that the error's message starts a line of its own
    with tqdm(total=steps, initial=start, disable=rank != 0, unit="step", dynamic_ncols=True) as bar:
        while step < steps:
            tic = time.perf_counter()
            loss, grad_norm, tokens = one_step()
            losses, window_tokens = losses + loss, window_tokens + tokens
            mx.eval(state, losses, grad_norm)
            window_time += time.perf_counter() - tic
            step, window_steps, last = step + 1, window_steps + 1, step + 1 == steps
            records = []
            if step % report_every == 0 or last:
                train_loss = losses.item() / window_steps
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"the training loss is {train_loss} at step {step}")
                tokens_per_s = window_tokens / window_time
                records.append(
                    {
                        "step": step,
                        "loss": train_loss,
                        "grad_norm": grad_norm.item(),
                        "lr": optimizer.learning_rate.item(),
                        "tokens_per_s": tokens_per_s,
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    }
                )
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                train_time, run_tokens = train_time + window_time, run_tokens + window_tokens
                losses, window_steps, window_time, window_tokens = mx.array(0.0), 0, 0.0, 0
            if step % eval_every == 0 or last:
                valid = evaluate()
                records.append({"step": step, **valid})
                if rank == 0:
                    bar.write(
                        f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items() if v is not None),
                        file=sys.stderr,
                    )
            if rank == 0:
                if step % save_every == 0 or last:
                    checkpoint = str(save(step))
                with open(log_path, "a") as log:
                    log.writelines(json.dumps(r) + "\n" for r in records)
            bar.update()
    return {
        "train_loss": train_loss,
        "valid": valid,
        "train_seconds": train_time,
        "checkpoint": checkpoint,
        "tokens": run_tokens,
        "tokens_per_s": run_tokens / train_time if train_time else None,
    }


def train_steps(run: Run) -> dict:
    """Train from run.step to the config's steps; the summary."""
    c, model, optimizer, group = run.config, run.model, run.optimizer, run.group
    rank, size = group.rank(), group.size()
    step_fn = make_train_step(model, optimizer, DTYPES[c["dtype"]], c["grad_clip"], group)

    def held_out() -> dict:
        loss = evaluate(model, run.valid_batches, group)
        return {"valid_loss": loss, "valid_ppl": math.exp(loss)}

    tokens_per_step = c["batch_size"] * c["seq_len"]
    done = step_loop(
        run.step,
        c["steps"],
        lambda: (*step_fn(*to_device(shard(run.sample_batch(), rank, size))), tokens_per_step),
        held_out,
        lambda step: save_checkpoint(run, step),
        (c["log_every"], c["eval_every"], c["checkpoint_every"]),
        [model.state, optimizer.state],
        optimizer,
        rank,
        Path(c["out"]) / "log.jsonl",
    )
    step = max(run.step, c["steps"])
    return {
        "step": step,
        "train_loss": done["train_loss"],
        "valid_loss": done["valid"].get("valid_loss"),
        "valid_ppl": done["valid"].get("valid_ppl"),
        "tokens": step * tokens_per_step,
        "tokens_per_s": done["tokens_per_s"],
        "train_seconds": done["train_seconds"],
        "parameters": model.num_parameters(),
        "processes": size,
        "ranks_in_sync": ranks_in_sync(model, group),
        "checkpoint": done["checkpoint"] or c["resume"],
    }


def train(config: dict) -> dict:
    """Train a TitansLM: `config` is resolve_config's (settings over the defaults), the summary comes back and goes
    to OUT/summary.json. Bad settings or inputs raise ValueError or FileNotFoundError before the first step."""
    run = setup(config)
    summary = train_steps(run)
    if run.group.rank() == 0:
        write_json_atomic(Path(config["out"]) / "summary.json", summary)
    return summary


def main(argv=None) -> dict:
    """The command line: the summary, or SystemExit with the status of every mlx-titans command (1: bad settings or
    inputs, one `error:` line; 130: Ctrl-C, the checkpoints already written kept)."""
    summary = {}
    code = run_reporting_errors(
        lambda: summary.update(train(resolve_config(parse_settings(argv)))),
        (OSError, ValueError, RuntimeError, FloatingPointError),
        "the checkpoints written so far are kept (--resume continues)",
    )
    if code:
        sys.exit(code)
    if mx.distributed.init().rank() == 0:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
