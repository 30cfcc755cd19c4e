"""mlx-titans: Titans neural long-term memory and its architectures in MLX."""

from .files import load_state, save_state
from .memory_config import MemoryConfig
from .model import TitansLM, TitansLMConfig, load_model, save_model
from .neural_memory import MemoryState, NeuralMemory
from .prefill import prefill
from .prompt_cache import load_prompt_cache

__all__ = [
    "MemoryConfig",
    "MemoryState",
    "NeuralMemory",
    "TitansLM",
    "TitansLMConfig",
    "load_model",
    "save_model",
    "load_state",
    "save_state",
    "load_prompt_cache",
    "prefill",
]
