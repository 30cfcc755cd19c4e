"""Build a NeuralMemory from a titans-pytorch (0.5.5) `NeuralMemory` state_dict and its constructor kwargs.

The memory weights titans-pytorch also registers under `memory_model.*` are never used by it (they are always
replaced by `memory_model_parameters`), so they are skipped here.
"""

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

from .neural_memory import MemoryConfig, NeuralMemory

TORCH_RMSNORM_EPS = float(np.finfo(np.float32).eps)  # torch's nn.RMSNorm(eps=None) default for float32

SUPPORTED = {
    "dim", "heads", "dim_head", "chunk_size", "batch_size", "momentum", "momentum_order",
    "default_step_transform_max_lr", "qk_rmsnorm", "per_head_learned_parameters", "pre_rmsnorm",
    "post_rmsnorm", "mem_model_norm_add_residual", "default_model_kwargs",
    "init_adaptive_step_bias", "init_momentum_bias", "init_decay_bias",
}
# options whose default is the only value this port reproduces
DEFAULTS_ONLY = {
    "attn_pool_chunks": False, "learned_momentum_combine": False, "learned_combine_include_zeroth": False,
    "num_kv_per_token": 1, "qkv_receives_diff_views": False, "per_parameter_lr_modulation": False,
    "max_grad_norm": None, "use_accelerated_scan": False, "activation": None, "accept_weight_residual": False,
    "spectral_norm_surprises": False, "gated_transition": False, "store_with_lookahead_value": False,
    "model": None, "store_memory_loss_fn": None, "adaptive_step_transform": None,
    "max_mem_layer_modulation": 1.0,
}


def config_from_titans_pytorch(**kwargs) -> MemoryConfig:
    """The MemoryConfig equivalent to titans_pytorch.NeuralMemory(**kwargs)."""
    for key, value in kwargs.items():
        if key in DEFAULTS_ONLY and value != DEFAULTS_ONLY[key]:
            why = " (its soft clamp inflates small gradients and gives 0/0; use MemoryConfig.max_grad_norm)" \
                if key == "max_grad_norm" else ""
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
    mapping.update({
        "retrieve_norm.weight": "retrieve_norm.weight", "store_norm.weight": "store_norm.weight",
        "to_queries.weight": "to_queries.weight", "to_keys.weight": "to_keys.weight",
        "to_values.weight": "to_values.weight",
        "to_adaptive_step.0.weight": "to_lr.weight", "to_adaptive_step.0.bias": "to_lr.bias",
        "to_momentum.0.weight": "to_momentum.weight", "to_momentum.0.bias": "to_momentum.bias",
        "to_decay_factor.0.weight": "to_decay.weight", "to_decay_factor.0.bias": "to_decay.bias",
        "retrieve_gate.0.weight": "retrieve_gate.weight", "combine_heads.weight": "combine_heads.weight",
        "q_norm.gamma": "q_norm_gamma", "k_norm.gamma": "k_norm_gamma", "multihead_rmsnorm.gamma": "post_norm_gamma",
    })
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
