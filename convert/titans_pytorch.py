"""Convert a titans-pytorch (0.5.5) NeuralMemory checkpoint into an MLX model directory.

    python convert/titans_pytorch.py --checkpoint mem.pt --out mem-mlx \\
        --kwargs '{"dim": 512, "heads": 4, "dim_head": 128, "chunk_size": 64}'

--kwargs are the titans_pytorch.NeuralMemory constructor arguments the checkpoint was trained with. OUTDIR gets
model.safetensors (the MLX parameters) and config.json ({"memory": MemoryConfig fields, "source",
"titans_pytorch_kwargs"}). To load it: `mem = NeuralMemory.from_pretrained("mem-mlx")`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # run as a script: import from the repo root, not from convert/ (where this file would shadow titans_pytorch)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_titans.files import run_reporting_errors
from mlx_titans.interop import from_titans_pytorch

SOURCE = "titans-pytorch 0.5.5"


def load_state_dict(path, prefix=None):
    """The tensors of a titans-pytorch NeuralMemory from a torch checkpoint, keys relative to `prefix`."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not a checkpoint can fail anywhere in the unpickler
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
        raise ValueError(f"{path} is not a weights-only torch checkpoint ({detail or type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state_dict")
    for entry in ("state_dict", "model"):
        if isinstance(ckpt.get(entry), dict):
            ckpt = ckpt[entry]
            break
    if prefix:
        ckpt = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
        if not ckpt:
            raise ValueError(f"no key of {path} starts with {prefix!r}")
    not_tensors = sorted(k for k, v in ckpt.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {not_tensors[:5]} (wrong --prefix?)")
    return ckpt


def common_prefix(keys):
    """The first dotted component shared by every key ("mem." for a memory saved inside a model), or None."""
    heads = {k.split(".", 1)[0] for k in keys}
    return f"{heads.pop()}." if len(heads) == 1 and all("." in k for k in keys) else None


def read_kwargs(args):
    text = Path(args.kwargs_file).read_text() if args.kwargs_file else args.kwargs
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"titans-pytorch kwargs are not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("titans-pytorch kwargs must be a JSON object")
    return kwargs


def write_atomic(out, files, force=False):
    """Write {name: writer(path)} into a fresh directory next to `out`, then rename it into place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty (use --force to replace it)")
    made = next((p for p in reversed([out.parent, *out.parent.parents]) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        for name, write in files.items():
            write(str(tmp / name))
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if (old / out.name).exists():
                os.rename(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert(checkpoint, kwargs, out, prefix=None, force=False):
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint file at {checkpoint}")
    state_dict = load_state_dict(checkpoint, prefix)
    try:
        mem = from_titans_pytorch(state_dict, **kwargs)
    except ValueError as e:
        guess = None if prefix else common_prefix(state_dict)
        if guess and "does not know" in str(e):
            raise ValueError(f"every key of {checkpoint} starts with {guess!r}: try --prefix {guess}") from None
        raise
    weights = dict(tree_flatten(mem.parameters()))
    config = {"memory": mem.config.to_dict(), "source": SOURCE, "titans_pytorch_kwargs": kwargs}
    write_atomic(out, {
        "model.safetensors": lambda p: mx.save_safetensors(p, weights, metadata={"format": "mlx"}),
        "config.json": lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"),
    }, force=force)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a titans-pytorch NeuralMemory checkpoint to MLX.")
    parser.add_argument("--checkpoint", required=True, help="torch file: a NeuralMemory state_dict, or a dict "
                        "with a 'state_dict' or 'model' entry holding one")
    kw = parser.add_mutually_exclusive_group(required=True)
    kw.add_argument("--kwargs", help="titans_pytorch.NeuralMemory constructor kwargs, as JSON")
    kw.add_argument("--kwargs-file", help="the same, from a JSON file")
    parser.add_argument("--prefix", help="keep only keys starting with this (e.g. 'mem.') and strip it")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    code = run_reporting_errors(lambda: convert(args.checkpoint, read_kwargs(args), args.out, args.prefix,
                                                args.force), errors=(OSError, ValueError, TypeError, RuntimeError))
    if code == 0:
        print(f"wrote {args.out}/model.safetensors and {args.out}/config.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
