"""titans-pytorch (0.5.5) NeuralMemory checkpoints in: the MLX memory built from a state_dict and its constructor
kwargs, and the converter's command line (convert/titans_pytorch.py, mlx-titans-convert-titans-pytorch):

    python convert/titans_pytorch.py --checkpoint mem.pt --out mem-mlx \\
        --kwargs '{"dim": 512, "heads": 4, "dim_head": 128, "chunk_size": 64}'

--kwargs are the titans_pytorch.NeuralMemory constructor arguments the checkpoint was trained with. OUTDIR gets
model.safetensors (the MLX parameters) and config.json ({"memory": MemoryConfig fields, "source",
"titans_pytorch_kwargs"}). To load it: `mem = NeuralMemory.from_pretrained("mem-mlx")`.

The memory weights titans-pytorch also registers under `memory_model.*` are never used by it (they are always
replaced by `memory_model_parameters`), so they are skipped here.
"""

import argparse
import json
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .files import atomic_folder, command_name, run_reporting_errors
from .neural_memory import MemoryConfig, NeuralMemory

SOURCE = "titans-pytorch 0.5.5"

TORCH_RMSNORM_EPS = float(np.finfo(np.float32).eps)  # torch's nn.RMSNorm(eps=None) default for float32

SUPPORTED = {
    "dim",
    "heads",
    "dim_head",
    "chunk_size",
    "batch_size",
    "momentum",
    "momentum_order",
    "default_step_transform_max_lr",
    "qk_rmsnorm",
    "per_head_learned_parameters",
    "pre_rmsnorm",
    "post_rmsnorm",
    "mem_model_norm_add_residual",
    "default_model_kwargs",
    "init_adaptive_step_bias",
    "init_momentum_bias",
    "init_decay_bias",
}
# options whose default is the only value this port reproduces
DEFAULTS_ONLY = {
    "attn_pool_chunks": False,
    "learned_momentum_combine": False,
    "learned_combine_include_zeroth": False,
    "num_kv_per_token": 1,
    "qkv_receives_diff_views": False,
    "per_parameter_lr_modulation": False,
    "max_grad_norm": None,
    "use_accelerated_scan": False,
    "activation": None,
    "accept_weight_residual": False,
    "spectral_norm_surprises": False,
    "gated_transition": False,
    "store_with_lookahead_value": False,
    "model": None,
    "store_memory_loss_fn": None,
    "adaptive_step_transform": None,
    "max_mem_layer_modulation": 1.0,
}


def config_from_titans_pytorch(**kwargs) -> MemoryConfig:
    """The MemoryConfig equivalent to titans_pytorch.NeuralMemory(**kwargs)."""
    for key, value in kwargs.items():
        if key in DEFAULTS_ONLY and value != DEFAULTS_ONLY[key]:
            why = (
                " (its soft clamp inflates small gradients and gives 0/0; use MemoryConfig.max_grad_norm)"
                if key == "max_grad_norm"
                else ""
            )
            raise ValueError(f"titans-pytorch option {key}={value!r} is not supported by the converter{why}")
        if key not in SUPPORTED and key not in DEFAULTS_ONLY:
            raise ValueError(f"unknown titans-pytorch NeuralMemory option {key!r}")
    if "dim" not in kwargs:
        raise ValueError("titans-pytorch kwargs must include dim")
    chunk = kwargs.get("chunk_size", 1)
    if not isinstance(chunk, int):
        raise ValueError(f"only an int chunk_size is supported, got {chunk!r}")
    model_kwargs = kwargs.get("default_model_kwargs", {"depth": 2, "expansion_factor": 4.0})
    if "depth" not in model_kwargs:
        raise ValueError("default_model_kwargs must give depth (titans-pytorch's MemoryMLP requires it)")
    dim = kwargs["dim"]
    return MemoryConfig(
        dim=dim,
        heads=kwargs.get("heads", 1),
        dim_head=kwargs.get("dim_head") or dim,
        chunk_size=chunk,
        batch_size=kwargs.get("batch_size") or 0,  # titans-pytorch's None: every gradient at the initial weights
        depth=model_kwargs.get("depth", 2),
        expansion=float(model_kwargs.get("expansion_factor", 2.0)),
        residual_norm=kwargs.get("mem_model_norm_add_residual", True),
        momentum=kwargs.get("momentum", True),
        momentum_order=kwargs.get("momentum_order", 1),
        max_lr=float(kwargs.get("default_step_transform_max_lr", 1.0)),
        per_head_init=kwargs.get("per_head_learned_parameters", True),
        pre_norm=kwargs.get("pre_rmsnorm", True),
        qk_rmsnorm=kwargs.get("qk_rmsnorm", False),
        post_rmsnorm=kwargs.get("post_rmsnorm", False),
        norm_eps=TORCH_RMSNORM_EPS,
    )


def _to_numpy(t):
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, dtype=np.float32)


def from_titans_pytorch(state_dict: dict, **kwargs) -> NeuralMemory:
    """A NeuralMemory with the weights of a titans-pytorch NeuralMemory built with `kwargs`."""
    cfg = config_from_titans_pytorch(**kwargs)
    mem = NeuralMemory(cfg)
    sd = {k: _to_numpy(v) for k, v in state_dict.items() if not k.startswith("memory_model.")}
    names = (["gamma"] if cfg.residual_norm else []) + [f"w{i}" for i in range(cfg.depth)]
    mapping = {f"memory_model_parameters.{i}": f"initial_weights.{n}" for i, n in enumerate(names)}
    mapping.update(
        {
            "retrieve_norm.weight": "retrieve_norm.weight",
            "store_norm.weight": "store_norm.weight",
            "to_queries.weight": "to_queries.weight",
            "to_keys.weight": "to_keys.weight",
            "to_values.weight": "to_values.weight",
            "to_adaptive_step.0.weight": "to_lr.weight",
            "to_adaptive_step.0.bias": "to_lr.bias",
            "to_momentum.0.weight": "to_momentum.weight",
            "to_momentum.0.bias": "to_momentum.bias",
            "to_decay_factor.0.weight": "to_decay.weight",
            "to_decay_factor.0.bias": "to_decay.bias",
            "retrieve_gate.0.weight": "retrieve_gate.weight",
            "combine_heads.weight": "combine_heads.weight",
            "q_norm.gamma": "q_norm_gamma",
            "k_norm.gamma": "k_norm_gamma",
            "multihead_rmsnorm.gamma": "post_norm_gamma",
        }
    )
    unknown = sorted(set(sd) - set(mapping))
    if unknown:
        raise ValueError(f"state_dict has keys this converter does not know: {unknown}")
    ours = dict(tree_flatten(mem.parameters()))
    weights = []
    for key, value in sd.items():
        target = mapping[key]
        if target not in ours:
            raise ValueError(f"state_dict key {key!r} has no place in a memory built with {kwargs}")
        if tuple(ours[target].shape) != value.shape:
            raise ValueError(f"{key}: shape {value.shape} does not match {tuple(ours[target].shape)} ({kwargs})")
        weights.append((target, mx.array(value)))
    missing = sorted(set(ours) - {t for t, _ in weights})
    if missing:
        raise ValueError(f"state_dict lacks weights for {missing}")
    mem.load_weights(weights)
    return mem


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
        ckpt = {k[len(prefix) :]: v for k, v in ckpt.items() if k.startswith(prefix)}
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


def convert(checkpoint, kwargs, out, prefix=None, force=False):
    """Write the MLX directory `out` for the titans-pytorch checkpoint file built with `kwargs`."""
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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty (use --force to replace it)")
    config = {"memory": mem.config.to_dict(), "source": SOURCE, "titans_pytorch_kwargs": kwargs}
    with atomic_folder(out) as tmp:
        mx.save_safetensors(
            str(tmp / "model.safetensors"), dict(tree_flatten(mem.parameters())), metadata={"format": "mlx"}
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=command_name("mlx_titans.interop"), description="Convert a titans-pytorch NeuralMemory checkpoint to MLX."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="torch file: a NeuralMemory state_dict, or a dict with a 'state_dict' or 'model' entry holding one",
    )
    kw = parser.add_mutually_exclusive_group(required=True)
    kw.add_argument("--kwargs", help="titans_pytorch.NeuralMemory constructor kwargs, as JSON")
    kw.add_argument("--kwargs-file", help="the same, from a JSON file")
    parser.add_argument("--prefix", help="keep only keys starting with this (e.g. 'mem.') and strip it")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    code = run_reporting_errors(
        lambda: convert(args.checkpoint, read_kwargs(args), args.out, args.prefix, args.force),
        errors=(OSError, ValueError, TypeError, RuntimeError),
    )
    if code == 0:
        print(f"wrote {args.out}/model.safetensors and {args.out}/config.json")
    return code
