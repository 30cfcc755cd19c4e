"""Convert a Hugging Face Qwen checkpoint (a type of QWEN_TYPES) into a TitansQwen MLX directory: convert(), and main(),
the command line of convert/qwen.py and mlx-titans-convert-qwen.

    python convert/qwen.py --hf-path Qwen/Qwen2.5-0.5B-Instruct --mlx-path qwen-titans -q
    python convert/qwen.py --hf-path ./local-hf-dir --mlx-path out --memory-layers 3 10 17 24 --window 4096

mlx-lm's flags (-q/--quantize, --q-bits, --q-group-size, --dtype) plus the titans section's fields. OUT holds what
mlx_lm.convert writes (config.json, model.safetensors, tokenizer files), a "titans" section in config.json, and
titans_memory.safetensors: the NeuralMemory weights and gates, float32, never quantized (untrained: gates closed).
Load it with `mlx_titans.qwen.load(OUT)`.

config.json names titans_model.py (a copy of mlx_titans/qwen/model_file.py) as mlx-lm's model_file: stock mlx-lm with
--trust-remote-code builds the real TitansQwen from it (window, sinks, memory), and without it refuses OUT, rather
than silently running the plain Qwen with a full cache and no memory.

OUT is built in a temporary directory beside it and renamed into place at the end: on any error or Ctrl-C nothing is
left behind. An existing OUT is refused.
"""

import argparse
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map_with_path
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, quantize_model, save
from tqdm import tqdm

from ..files import atomic_folder, command_name, run_reporting_errors
from ..train import json_arg
from . import MEMORY_WEIGHTS, MODEL_FILE, build_model, memory_weights, qwen_tokenizer, read_qwen_config

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DTYPES = ("float16", "bfloat16", "float32")


def fetch(hf_path: str) -> Path:
    """A local directory as is; a Hub id ("org/name") through huggingface_hub.snapshot_download."""
    path = Path(hf_path).expanduser()
    if path.exists():
        return path
    if not HUB_ID.fullmatch(hf_path):
        raise ValueError(f"{hf_path} does not exist")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(hf_path, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, network: all end the conversion the same way
        reason = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else type(e).__name__
        raise ValueError(
            f"{hf_path} is not a local directory and the Hugging Face Hub cannot provide it ({reason})"
        ) from None


def cast(model, dtype: str):
    """mlx_lm.convert's dtype cast, skipping what model.cast_predicate excludes (the memory)."""
    predicate = getattr(model, "cast_predicate", lambda name: True)  # stock mlx-lm models may lack one

    def to_dtype(name, w):
        keep = not predicate(name) or not mx.issubdtype(w.dtype, mx.floating)
        return w if keep else w.astype(getattr(mx, dtype))

    model.update(tree_map_with_path(to_dtype, model.parameters()))


def pop_memory(model) -> dict:
    """Take the memory modules and gates out of the model (so that mlx-lm saves a plain Qwen); return their weights."""
    weights = memory_weights(model)
    for layer in model.layers:
        layer.pop("memory", None)
        layer.pop("memory_gate", None)
    return weights


def convert(hf_path, mlx_path, quantize=False, q_bits=4, q_group_size=64, dtype=None, titans=None):
    """Write the TitansQwen directory `mlx_path` for `hf_path`; `titans`: the config's titans section (the rest
    takes TitansQwenConfig's defaults)."""
    out = Path(mlx_path)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new --mlx-path")
    with tqdm(total=4, unit="step", leave=False, disable=None) as bar:  # shown on a terminal only
        bar.set_description("fetch")
        src = fetch(hf_path)
        read_qwen_config(src)
        bar.update()
        bar.set_description("load")
        model, config = build_model(src, titans or {}, lazy=True)
        tokenizer = qwen_tokenizer(src, config)
        dtype = dtype or config.get("torch_dtype") or config.get("dtype")  # transformers 5 writes "dtype"
        if dtype in DTYPES:
            cast(model, dtype)
        bar.update()
        bar.set_description("quantize")
        if quantize:
            model, config = quantize_model(model, config, q_group_size, q_bits)
        bar.update()
        bar.set_description("save")
        save_folder(out, src, model, tokenizer, config)
        bar.update()


def save_folder(out: Path, src: Path, model, tokenizer, config: dict) -> None:
    """Write a TitansQwen folder, whole or not at all: mlx-lm's files of the base, MEMORY_WEIGHTS, and MODEL_FILE
    named in config.json so that stock mlx-lm builds TitansQwen (with --trust-remote-code) or refuses the folder."""
    with atomic_folder(out) as tmp:
        memory = pop_memory(model)
        save(tmp, src, model, tokenizer, {**config, "model_file": MODEL_FILE})
        mx.save_safetensors(str(tmp / MEMORY_WEIGHTS), memory, metadata={"format": "mlx"})
        shutil.copy(Path(__file__).with_name("model_file.py"), tmp / MODEL_FILE)


def titans_section(args) -> dict:
    """The titans options given on the command line (the rest take TitansQwenConfig's defaults)."""
    top = {
        "memory_layers": args.memory_layers,
        "window": args.window,
        "sink_tokens": args.sink_tokens,
        "segment_size": args.segment_size,
    }
    memory = {
        "chunk_size": args.chunk_size,
        "heads": args.memory_heads,
        "dim_head": args.memory_dim_head,
        "depth": args.memory_depth,
    }
    section = {k: v for k, v in top.items() if v is not None}
    memory = {**args.memory, **{k: v for k, v in memory.items() if v is not None}}
    return {**section, "memory": memory} if memory else section


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=command_name("mlx_titans.qwen.convert"),
        description="Convert a Hugging Face Qwen (qwen2, qwen3, their MoEs, qwen3_next, qwen3_5) to TitansQwen (MLX).",
    )
    parser.add_argument("--hf-path", "--model", required=True, help="local HF directory or Hugging Face Hub id")
    parser.add_argument(
        "--mlx-path", default="mlx_model", help="output directory, must not exist (default: %(default)s)"
    )
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the base model (not the memory)")
    parser.add_argument("--q-bits", type=int, default=4, help="bits per weight (default: %(default)s)")
    parser.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="base weights dtype (default: config's torch_dtype)")
    titans = parser.add_argument_group("titans (defaults: mlx_titans.qwen.TitansQwenConfig)")
    titans.add_argument("--memory-layers", type=int, nargs="+", help="layer indices with a NeuralMemory")
    titans.add_argument("--window", type=int, help="attention window, tokens")
    titans.add_argument("--sink-tokens", type=int, help="first tokens every query attends to")
    titans.add_argument("--segment-size", type=int, help="prompt tokens per prefill call (a multiple of --chunk-size)")
    titans.add_argument("--chunk-size", type=int, help="memory chunk size")
    titans.add_argument("--memory-heads", type=int, help="memory heads")
    titans.add_argument("--memory-dim-head", type=int, help="memory head size")
    titans.add_argument("--memory-depth", type=int, help="memory MLP depth (1: linear memory)")
    titans.add_argument(
        "--memory",
        type=json_arg,
        default={},
        help='other MemoryConfig fields as JSON, e.g. \'{"max_decay": 0.1, "init_decay_bias": -4}\'',
    )
    args = parser.parse_args(argv)
    code = run_reporting_errors(
        lambda: convert(
            args.hf_path, args.mlx_path, args.quantize, args.q_bits, args.q_group_size, args.dtype, titans_section(args)
        )
    )
    if code == 0:
        print(f"wrote {args.mlx_path}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
