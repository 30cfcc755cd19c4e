"""mlx-titans: Titans neural long-term memory and its architectures in MLX."""

import warnings

# `generate` below is a function, as in mlx_lm, and also the name of the generate command's module: importing that
# module here, before the function takes its name, keeps a later import of it from rebinding `mlx_titans.generate`.
# `python -m mlx_titans.generate` then runs the module a second time as __main__, which runpy warns of (as it does
# for mlx_lm.generate); the module keeps no state, so the warning is noise to its users.
warnings.filterwarnings("ignore", "'mlx_titans.generate' found in sys.modules", RuntimeWarning)

from .files import load_state, save_state
from .generate import generate, load, stream_generate
from .memory_config import MemoryConfig
from .model import TitansLM, TitansLMConfig, load_model, save_model
from .neural_memory import MemoryState, NeuralMemory
from .prefill import prefill
from .prompt_cache import load_cache_file, load_prompt_cache, save_cache_file

__all__ = [
    "MemoryConfig",
    "MemoryState",
    "NeuralMemory",
    "TitansLM",
    "TitansLMConfig",
    "generate",
    "load",
    "load_cache_file",
    "load_model",
    "load_prompt_cache",
    "load_state",
    "prefill",
    "save_cache_file",
    "save_model",
    "save_state",
    "stream_generate",
]
