"""Saving and loading a NeuralMemory state (weights, momentum, unstored remainder, position) as safetensors.

The file carries the memory's config and its fingerprint; loading it into a memory of another config is refused
with the fields that differ.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .files import load_safetensors_checked, save_safetensors_atomic
from .neural_memory import MemoryConfig


def save_state(path, state: dict, config: MemoryConfig) -> None:
    """Write `state` to `path` atomically (a temporary file renamed into place)."""
    path = Path(path)
    arrays = {k: v for k, v in tree_flatten(state) if isinstance(v, mx.array)}
    metadata = {
        "format": "mlx-titans-memory-state/2",
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "fingerprint": config.fingerprint(),
        "position": str(state["position"]),
    }
    save_safetensors_atomic(path, arrays, metadata)


def load_state(path, config: MemoryConfig) -> dict:
    """Read a state written by `save_state`, refusing one saved from a memory with another config."""
    arrays, metadata = load_safetensors_checked(path, "mlx-titans-memory-state/2", "NeuralMemory state")
    if metadata.get("fingerprint") != config.fingerprint():
        saved = json.loads(metadata.get("config", "{}"))
        ours = config.to_dict()
        diff = {k: (saved.get(k), ours.get(k)) for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)}
        detail = ", ".join(f"{k}: saved {a!r}, this memory {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"memory state {path} was saved by a memory with another config ({detail})")
    state = tree_unflatten(list(arrays.items()))
    state["position"] = int(metadata["position"])
    return state
