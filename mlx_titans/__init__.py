"""mlx-titans: Titans neural long-term memory and its architectures in MLX."""

from .neural_memory import MemoryConfig, NeuralMemory
from .state import load_state, save_state

__all__ = ["MemoryConfig", "NeuralMemory", "load_state", "save_state"]
