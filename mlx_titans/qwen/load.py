"""Loading TitansQwen: a converted folder (mlx-lm's weights + titans_memory.safetensors) or a plain Qwen one."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
from huggingface_hub.errors import StrictDataclassError
from mlx_lm.utils import load_config, load_model, load_tokenizer

from ..files import read_safetensors
from ..model import read_config
from .adapters import load_adapters
from .config import TitansQwenConfig, check_model_type, rope_settings, text_config
from .model import get_model_classes, memory_weights

MEMORY_WEIGHTS = "titans_memory.safetensors"
MODEL_FILE = "titans_model.py"  # mlx-lm's model_file in config.json: stock mlx-lm builds TitansQwen (model_file.py)
# what mlx-lm (its asserts included) and transformers (for the tokenizer) raise on a config.json field they cannot use
CONFIG_ERRORS = (TypeError, KeyError, AttributeError, IndexError, ArithmeticError, AssertionError, StrictDataclassError)


def read_qwen_config(path: Path) -> dict:
    """config.json (with generation_config's eos) of a directory holding a Qwen of a type TitansQwen supports;
    ValueError otherwise."""
    if not path.is_dir():
        raise ValueError(f"no model directory at {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json")
    read_config(path)  # a JSON object, or one clear error
    config = load_config(path)  # as mlx-lm reads it: generation_config.json's eos too
    check_model_type(config, str(path))
    check_sizes(path, {**config, **text_config(config)})  # a vision-language config's sizes are in text_config
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


def check_sizes(path: Path, config: dict) -> None:
    """The sizes and numbers mlx-lm builds the model from: it reads them unchecked, and a bool, a 0, or a quantization
    group size that does not divide a linear's input kills the process inside mlx instead of raising."""
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if type(config.get(key)) is not int or config[key] < 1:
            raise ValueError(f"{path}/config.json: {key} must be a positive integer, got {config.get(key)!r}")
    widths = [config["hidden_size"]]
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in config:
            if type(config[key]) is not int or config[key] < 1:
                raise ValueError(f"{path}/config.json: {key} must be a positive integer, got {config[key]!r}")
            widths.append(config[key])
    for key in ("rope_theta", "rms_norm_eps"):
        if key in config and (type(config[key]) not in (int, float) or not config[key] > 0):
            raise ValueError(f"{path}/config.json: {key} must be a positive number, got {config[key]!r}")
    for key in ("quantization", "quantization_config"):
        quant = config.get(key)
        size = quant.get("group_size", 64) if isinstance(quant, dict) else None
        if quant is not None and (type(size) is not int or size < 1 or any(w % size for w in widths)):
            raise ValueError(
                f"{path}/config.json: {key} needs a group_size dividing the linears' widths, got {quant!r}"
            )


def build_model(path: Path, titans: dict, lazy: bool = False):
    """mlx-lm's load_model with TitansQwen classes, then the memory weights from MEMORY_WEIGHTS when present.
    Returns (model, config) with the resolved titans section in config, and the RoPE settings of rope_parameters
    under the keys mlx-lm reads (so that a converted folder keeps them for stock mlx-lm too)."""
    check_weights(path)
    rope = rope_settings(read_qwen_config(path))
    try:
        model, config = load_model(
            path,
            lazy=True,
            model_config={"titans": titans, **rope, "model_file": None},
            get_model_classes=get_model_classes,
        )
        if (path / MEMORY_WEIGHTS).exists():
            load_memory_weights(model, path / MEMORY_WEIGHTS)
        if not lazy:
            mx.eval(model.parameters())
    except (RuntimeError, FileNotFoundError) as e:  # mx.load on a corrupt file, no model*.safetensors
        raise ValueError(f"cannot read the weights in {path}: {str(e).strip().splitlines()[0]}") from None
    except CONFIG_ERRORS as e:
        raise damaged_config(path, e) from None
    config["titans"] = model.titans.to_section()
    config.pop("model_file")
    return model, config


def load_plain_qwen(path, lazy: bool = False):
    """(model, config): mlx-lm's plain Qwen of a TitansQwen folder, its base weights only (the memory left out), as
    stock mlx-lm would load it were config.json's model_file not there."""
    return load_model(Path(path), lazy=lazy, model_config={"model_file": None})


def qwen_tokenizer(path: Path, config: dict):
    """mlx-lm's tokenizer of a Qwen folder (it reads config.json again, as mlx-lm reads it)."""
    try:
        return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except CONFIG_ERRORS as e:
        raise damaged_config(path, e) from None


def damaged_config(path: Path, error: Exception) -> ValueError:
    """mlx-lm reads config.json's fields unchecked: a field of the wrong type fails anywhere inside it."""
    return ValueError(f"mlx-lm cannot load {path}: config.json has a damaged field ({type(error).__name__}: {error})")


def load_memory_weights(model, file: Path):
    weights, _ = read_safetensors(file, "memory weights")
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
    section = config.get("titans", {})
    trained = TitansQwenConfig.for_config(section, config).to_section()
    titans = dict(section)
    if window is not None:
        titans["window"] = window
    if memory:
        titans["memory"] = {**titans.get("memory", {}), **memory}
    model, config = build_model(path, titans, lazy=adapter_path is not None)
    if adapter_path is not None:
        load_adapters(model, adapter_path, trained)
        mx.eval(model.parameters())
    return model, qwen_tokenizer(path, config), config
