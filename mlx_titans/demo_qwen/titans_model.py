"""The model_file of a TitansQwen folder: the converter copies this file there as MODEL_FILE and names it in
config.json, so that stock mlx-lm run with --trust-remote-code (mlx_lm.load(..., trust_remote_code=True),
mlx_lm.generate, mlx_lm.server) builds the real TitansQwen, sinks, window and trained memory included, and without it
refuses the folder (saying it needs a custom module) instead of silently running the plain Qwen with a full cache.
mlx-lm reads Model and ModelArgs from the copy; they are built on first use from the config.json beside it, so that
importing this module from the package does nothing. Needs mlx-titans installed beside mlx-lm."""

import functools
import json
from pathlib import Path

import mlx.core as mx

FOLDER = Path(__file__).parent


@functools.cache
def model_classes():
    """(Model, ModelArgs) of the folder's model type: TitansQwen's, its memory weights read from the folder."""
    from mlx_titans.qwen.load import MEMORY_WEIGHTS
    from mlx_titans.qwen.model import get_model_classes

    base, model_args = get_model_classes(json.loads((FOLDER / "config.json").read_text()))

    class Model(base):
        def sanitize(self, weights):
            """The base's weights, then the memory's from MEMORY_WEIGHTS (mlx-lm reads model*.safetensors only)."""
            memory = FOLDER / MEMORY_WEIGHTS
            return {**super().sanitize(weights), **(mx.load(str(memory)) if memory.exists() else {})}

    return Model, model_args


def __getattr__(name):
    if name in ("Model", "ModelArgs"):
        return model_classes()[name == "ModelArgs"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
