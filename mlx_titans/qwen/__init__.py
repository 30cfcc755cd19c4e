"""TitansQwen: mlx-lm's Qwen2 / Qwen2.5 / Qwen3 with bounded attention and Titans neural memory layers."""

from .cache import TitansCache
from .config import TitansQwenConfig, default_memory_layers
from .load import MEMORY_WEIGHTS, build_model, load, load_memory_weights, qwen_tokenizer, read_qwen_config
from .model import TitansQwen, get_model_classes, memory_weights
