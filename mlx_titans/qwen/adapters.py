"""Memory adapters in mlx-lm's adapter layout: what `mlx_titans.adapt` trains on a frozen TitansQwen base.

    ADAPTERS/adapter_config.json    mlx-lm's keys (fine_tune_type, num_layers, lora_parameters) plus "titans": the
                                    base it was trained on (its description and fingerprint) and the training settings
    ADAPTERS/adapters.safetensors   every memory layer's NeuralMemory weights and memory_gate, and the LoRA weights

`load(path, adapter_path=ADAPTERS)` runs a base with them; `fuse` writes a standalone TitansQwen folder. mlx-lm's own
loader cannot take these adapters (it accepts LoRA weights only), and stock mlx-lm never needs to: a fused folder
still loads in stock mlx-lm as the plain Qwen (with the LoRA merged, if any).
"""

from pathlib import Path
from typing import Optional

from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..files import fingerprint, read_json_object, read_safetensors
from .model import is_memory_weight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
FINE_TUNE_TYPE = "titans_memory"
LORA_KEYS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]  # the base's linears: never the memory's


def lora_parameters(rank: int, scale: float) -> dict:
    return {"rank": rank, "scale": scale, "dropout": 0.0, "keys": LORA_KEYS}


def make_trainable(model, lora_layers: int = 0, lora_rank: int = 8, lora_scale: float = 20.0) -> None:
    """Freeze every base weight; LoRA (mlx-lm's tuner) on the base's linears of the last `lora_layers` layers; the
    memory layers (NeuralMemory and memory_gate) trainable."""
    if not any("memory" in layer for layer in model.layers):
        raise ValueError("this TitansQwen has no memory layers to train")
    model.freeze()
    if lora_layers:
        linear_to_lora_layers(model, lora_layers, lora_parameters(lora_rank, lora_scale))
    for layer in model.layers:
        if "memory" in layer:
            layer.memory.unfreeze()
            layer.unfreeze(keys=["memory_gate"], recurse=False)


def adapter_weights(model) -> dict:
    """The trained weights: the memory layers' and LoRA's."""
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if is_memory_weight(k) or k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }


def adapter_config(model, lora_layers: int, lora_rank: int, lora_scale: float, settings: dict) -> dict:
    description = model.description()
    return {
        "fine_tune_type": FINE_TUNE_TYPE,
        "num_layers": lora_layers,
        "lora_parameters": lora_parameters(lora_rank, lora_scale),
        "titans": {"base_fingerprint": fingerprint(description), "base": description, "training": settings},
    }


def read_adapter_config(path) -> dict:
    """adapter_config.json of an adapters folder written by mlx_titans.adapt; one clear error otherwise."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not file.is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{path} is not an adapters folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = read_json_object(file)
    if config.get("fine_tune_type") != FINE_TUNE_TYPE:
        raise ValueError(
            f"{path} holds {config.get('fine_tune_type', 'lora')!r} adapters, not TitansQwen memory "
            "adapters (load those with mlx_lm)"
        )
    titans = config.get("titans")
    if (
        not isinstance(titans, dict)
        or not isinstance(titans.get("base_fingerprint"), str)
        or not isinstance(titans.get("base"), dict)
        or type(config.get("num_layers")) is not int
        or config["num_layers"] < 0
        or not isinstance(config.get("lora_parameters"), dict)
    ):
        raise ValueError(
            f"{file} is damaged (it needs titans.base_fingerprint, titans.base, num_layers, lora_parameters)"
        )
    return config


def load_adapters(model, path, titans_section: Optional[dict] = None) -> None:
    """Apply the adapters at `path` to `model` (LoRA layers, then the weights); refuses adapters trained on a base of
    another architecture or titans section (`titans_section`: the one to compare, default the model's own)."""
    config = read_adapter_config(path)
    ours = model.description()
    if titans_section is not None:
        ours["titans"] = titans_section
    if config["titans"]["base_fingerprint"] != fingerprint(ours):
        saved, mine = dict(tree_flatten(config["titans"]["base"])), dict(tree_flatten(ours))
        differ = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        raise ValueError(f"the adapters at {path} were trained for another model (differs in {', '.join(differ[:6])})")
    if config["num_layers"]:
        try:
            linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
        except (TypeError, KeyError, ValueError) as e:  # mlx-lm reads them unchecked
            raise ValueError(
                f"{path}/{ADAPTER_CONFIG}: lora_parameters are damaged ({type(e).__name__}: {e})"
            ) from None
    weights, _ = read_safetensors(Path(path) / ADAPTER_WEIGHTS, "adapter weights")
    expected = adapter_weights(model)
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{path}/{ADAPTER_WEIGHTS} does not fit this model's memory and LoRA layers")
    model.update(tree_unflatten(list(weights.items())))


def fuse_lora(model) -> None:
    """Merge LoRA layers into the base linears they wrap (as mlx_lm.fuse does)."""
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
