"""Cache files in mlx-lm's prompt-cache layout, for mlx-lm's cache classes and ours.

mlx_lm.models.cache.save_prompt_cache writes a TitansQwen (TitansCache) or TitansLM (LayerCache) cache as it writes
its own; its load_prompt_cache rebuilds only mlx-lm's classes, so `load_prompt_cache` here reads the same files
knowing ours too. `save_cache_file` / `load_cache_file` keep a model's cache (attention windows and memory states)
in that layout with the model's description and fingerprint in the metadata, and refuse a file saved for another
model: what generate's --memory-state-out / --memory-state-in write and read.
"""

import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .blocks import LayerCache
from .files import atomic_safetensors, fingerprint, read_metadata_checked

CACHE_FORMAT = "mlx-titans-cache/3"


def cache_classes() -> dict:
    """The cache classes by name: mlx-lm's and ours. Imported on use: the mlx_lm package takes seconds to import."""
    from mlx_lm.models import cache

    from .qwen.cache import TitansCache

    ours = {"TitansCache": TitansCache, "LayerCache": LayerCache}
    return {**{name: c for name, c in vars(cache).items() if hasattr(c, "from_state")}, **ours}


def caches_from(arrays: dict, metadata: dict):
    """(the caches, the user metadata) of a save_prompt_cache file's arrays and metadata."""
    user, classes, scalars = tree_unflatten(list(metadata.items()))
    decode = {"scalar": lambda a: a.item(), "string": lambda a: "".join(map(chr, a.tolist())), "none": lambda a: None}
    for key, kind in scalars[1:]:
        arrays[key] = decode[kind](arrays[key])
    known = cache_classes()
    if unknown := set(classes) - set(known):
        raise ValueError(f"unknown cache classes {sorted(unknown)}")
    states = tree_unflatten(list(arrays.items()))
    return [known[name].from_state(state) for name, state in zip(classes, states)], user


def load_prompt_cache(file, return_metadata: bool = False):
    """mlx_lm.models.cache.load_prompt_cache for files of mlx-lm's caches and ours (TitansCache, LayerCache)."""
    arrays, metadata = mx.load(str(file), format="safetensors", return_metadata=True)
    cache, user = caches_from(arrays, metadata)
    return (cache, user) if return_metadata else cache


def save_cache_file(path, model, cache: list) -> None:
    """`cache` of `model` (a TitansLM or TitansQwen) through save_prompt_cache, with the model's description and
    fingerprint in the metadata, atomically."""
    from mlx_lm.models.cache import save_prompt_cache

    description = model.description()
    metadata = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint(description),
        "model": json.dumps(description, sort_keys=True),
    }
    with atomic_safetensors(path) as tmp:
        save_prompt_cache(tmp, cache, metadata)


def load_cache_file(path, model) -> list:
    """The cache `save_cache_file` wrote, continuing exactly where it stopped (refused as `check_cache_file` says)."""
    metadata = check_cache_file(path, model)
    return caches_from(mx.load(str(path), format="safetensors"), metadata)[0]


def check_cache_file(path, model) -> dict:
    """The metadata of a file `save_cache_file` wrote for `model`, read from its header alone; refuses one saved for
    another model, saying which of the models' settings differ."""
    ours = model.description()
    metadata = read_metadata_checked(path, CACHE_FORMAT, f"{ours['model']} memory state", "0.format")
    if metadata["0.fingerprint"] != fingerprint(ours):
        saved, ours = dict(tree_flatten(json.loads(metadata["0.model"]))), dict(tree_flatten(ours))
        differ = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise ValueError(
            f"memory state {path} was saved for another model (another config: differs in {', '.join(differ[:6])})"
        )
    return metadata
