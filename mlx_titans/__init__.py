"""mlx-titans: Titans neural long-term memory and its architectures in MLX."""

from .files import load_state, save_state
from .memory_config import MemoryConfig
from .neural_memory import MemoryState, NeuralMemory

__all__ = ["MemoryConfig", "MemoryState", "NeuralMemory", "load_state", "save_state"]
