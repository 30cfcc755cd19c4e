"""Loading TitansQwen: a converted folder (mlx-lm's weights + titans_memory.safetensors) or a plain Qwen one."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.utils import load_config, load_model, load_tokenizer

from .adapters import load_adapters
from .config import TitansQwenConfig, check_model_type, rope_settings
from .model import get_model_classes, memory_weights

MEMORY_WEIGHTS = "titans_memory.safetensors"


def read_qwen_config(path: Path) -> dict:
    """config.json (with generation_config's eos) of a directory holding a Qwen of a type TitansQwen supports;
    ValueError otherwise."""
    if not path.is_dir():
        raise ValueError(f"no model directory at {path}")
    try:
        config = load_config(path)
    except FileNotFoundError:
        raise ValueError(f"{path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}/config.json is not valid JSON ({e})") from None
    check_model_type(config, str(path))
    return config


def check_weights(path: Path) -> None:
    """mlx-lm reads model*.safetensors only: say what to do with a PyTorch checkpoint instead of failing on none."""
    if not any(path.glob("model*.safetensors")):
        bins = sorted(p.name for p in path.glob("*.bin"))
        found = f"holds PyTorch weights ({bins[0]}) but" if bins else "has"
        raise ValueError(
            f"{path} {found} no model*.safetensors, the only weights mlx-lm reads: convert the checkpoint to "
            "safetensors first (with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR))"
        )


def build_model(path: Path, titans: dict, lazy: bool = False):
    """mlx-lm's load_model with TitansQwen classes, then the memory weights from MEMORY_WEIGHTS when present.
    Returns (model, config) with the resolved titans section in config, and the RoPE settings of rope_parameters
    under the keys mlx-lm reads (so that a converted folder keeps them for stock mlx-lm too)."""
    check_weights(path)
    rope = rope_settings(read_qwen_config(path))
    try:
        model, config = load_model(
            path, lazy=True, model_config={"titans": titans, **rope}, get_model_classes=get_model_classes
        )
        if (path / MEMORY_WEIGHTS).exists():
            load_memory_weights(model, path / MEMORY_WEIGHTS)
        if not lazy:
            mx.eval(model.parameters())
    except (RuntimeError, FileNotFoundError) as e:  # mx.load on a corrupt file, no model*.safetensors
        raise ValueError(f"cannot read the weights in {path}: {str(e).strip().splitlines()[0]}") from None
    config["titans"] = model.titans.to_section()
    return model, config


def load_memory_weights(model, file: Path):
    weights = mx.load(str(file))
    expected = memory_weights(model)
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{file} does not fit the titans section of config.json (other memory layers or sizes)")
    model.load_weights(list(weights.items()), strict=False)


def load(path, *, window: Optional[int] = None, memory: Optional[dict] = None, adapter_path=None):
    """(model, tokenizer, config) from a directory written by convert/qwen.py, or from a plain mlx-lm / HF Qwen
    directory (then with the default titans section: untrained memory, gate closed).

    `adapter_path`: memory adapters trained by mlx_titans.adapt on this base. `window` overrides the titans window
    and `memory` MemoryConfig fields, e.g. {"max_lr": 0, "max_decay": 0}: the memory frozen at its learned initial
    weights, the ablation that switches its test-time updates off. Adapters are checked against the folder's own
    titans section, so they load with either override."""
    path = Path(path)
    config = read_qwen_config(path)
    titans = dict(config.get("titans", {}))
    trained = TitansQwenConfig.for_config(titans, config).to_section()
    if window is not None:
        titans["window"] = window
    if memory:
        titans["memory"] = {**titans.get("memory", {}), **memory}
    model, config = build_model(path, titans, lazy=adapter_path is not None)
    if adapter_path is not None:
        load_adapters(model, adapter_path, trained)
        mx.eval(model.parameters())
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id")), config
