"""Cache files in mlx-lm's prompt-cache layout, for mlx-lm's cache classes and ours.

mlx_lm.models.cache.save_prompt_cache writes a TitansQwen (TitansCache, LinearCache) or TitansLM (LayerCache) cache
as it writes its own; its load_prompt_cache rebuilds only mlx-lm's classes, so `load_prompt_cache` here reads the
same files knowing ours too. `save_cache_file` / `load_cache_file` keep a model's cache (attention windows, linear
attention states and memory states) in that layout with the model's description and fingerprint in the metadata, and
refuse a file saved for another model: what generate's --memory-state-out / --memory-state-in write and read.
"""

import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .blocks import LayerCache
from .files import atomic_safetensors, fingerprint, load_safetensors_checked, read_metadata_checked

CACHE_FORMAT = "mlx-titans-cache/3"


def cache_classes() -> dict:
    """The cache classes by name: mlx-lm's and ours. Imported on use: the mlx_lm package takes seconds to import."""
    from mlx_lm.models import cache

    from .qwen.cache import LinearCache, TitansCache

    ours = {"TitansCache": TitansCache, "LinearCache": LinearCache, "LayerCache": LayerCache}
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
    """mlx_lm.models.cache.load_prompt_cache for files of mlx-lm's caches and ours (TitansCache, LinearCache,
    LayerCache)."""
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
    ours = model.description()
    arrays, metadata = load_safetensors_checked(path, CACHE_FORMAT, f"{ours['model']} memory state", "0.format")
    check_model(path, ours, metadata)
    try:
        return caches_from(arrays, metadata)[0]
    except (KeyError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as e:  # our format, damaged
        raise ValueError(f"memory state {path} is damaged ({type(e).__name__}: {e})") from None


def check_cache_file(path, model) -> dict:
    """The metadata of a file `save_cache_file` wrote for `model`, read from its header alone (no MLX: the server
    checks files in its HTTP threads); refuses one saved for another model, saying which settings differ."""
    ours = model.description()
    metadata = read_metadata_checked(path, CACHE_FORMAT, f"{ours['model']} memory state", "0.format")
    check_model(path, ours, metadata)
    return metadata


def check_model(path, ours: dict, metadata: dict) -> None:
    """ValueError unless the file's metadata names the model described by `ours` (its fingerprint)."""
    try:
        if metadata["0.fingerprint"] != fingerprint(ours):
            saved, ours = dict(tree_flatten(json.loads(metadata["0.model"]))), dict(tree_flatten(ours))
            differ = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
            raise ValueError(
                f"memory state {path} was saved for another model (another config: differs in {', '.join(differ[:6])})"
            )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:  # our format, damaged
        raise ValueError(f"memory state {path} is damaged ({type(e).__name__}: {e})") from None
