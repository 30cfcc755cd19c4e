"""TitansQwen: mlx-lm's Qwen models (QWEN_TYPES) with bounded attention and Titans neural memory layers."""

from .cache import TitansCache
from .config import TitansQwenConfig, default_memory_layers
from .load import (
    MEMORY_WEIGHTS,
    MODEL_FILE,
    build_model,
    load,
    load_memory_weights,
    load_plain_qwen,
    qwen_tokenizer,
    read_qwen_config,
)
from .model import TitansQwen, get_model_classes, memory_weights
