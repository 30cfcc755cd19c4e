"""TitansLM: a decoder-only language model of Titans blocks (or the baselines), with a JSON config and save/load.

model = TitansLM(TitansLMConfig(variant="mac", vocab_size=4096, dim=256, layers=4, heads=4, window=256))
logits = model(tokens)                              # (batch, n) -> (batch, n, vocab)
cache = model.make_cache(); logits = model(tokens, cache)   # streaming / cached decoding
"""

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .blocks import VARIANTS, Block, LayerCache
from .files import atomic_folder, check_field_types, read_json_object, read_safetensors
from .memory_config import MemoryConfig


@dataclass
class TitansLMConfig:
    variant: str = "mac"
    vocab_size: int = 4096
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_dim: Optional[int] = None  # default: 8/3 dim, rounded up to a multiple of 32
    window: int = 256  # sliding window (mag, mal, swa) or segment length (mac)
    persistent_tokens: int = 4
    memory: dict = field(default_factory=dict)  # MemoryConfig fields except dim
    memory_layers: Optional[list] = None  # layer indices with a memory (mac/mag/mal/lmm); default all
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        check_field_types(self)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mlp_dim is None:
            self.mlp_dim = -(-8 * self.dim // 3 // 32) * 32
        if self.memory_layers is None:
            self.memory_layers = list(range(self.layers)) if self.variant in ("mac", "mag", "mal", "lmm") else []
        if min(self.vocab_size, self.dim, self.layers, self.heads, self.mlp_dim, self.window) < 1:
            raise ValueError("vocab_size, dim, layers, heads, mlp_dim and window must be >= 1")
        if self.persistent_tokens < 0 or not all(type(i) is int and 0 <= i < self.layers for i in self.memory_layers):
            raise ValueError(
                f"persistent_tokens must be >= 0 and memory_layers {self.memory_layers} in 0..{self.layers - 1}"
            )
        if self.variant == "lmm" and sorted(self.memory_layers) != list(range(self.layers)):
            raise ValueError("lmm has no attention: every layer needs a memory")
        if self.variant in ("swa", "transformer") and self.memory_layers:
            raise ValueError(f"{self.variant} is a baseline without memory; memory_layers must be empty")
        MemoryConfig.from_dict({"dim": self.dim, **self.memory})  # validate early

    @classmethod
    def from_dict(cls, d: dict) -> "TitansLMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class TitansLM(nn.Module):
    def __init__(self, config: TitansLMConfig):
        super().__init__()
        self.config = c = config
        memory = MemoryConfig.from_dict({"dim": c.dim, **c.memory})
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = [
            Block(
                c.variant,
                c.dim,
                c.heads,
                c.mlp_dim,
                c.window,
                c.persistent_tokens,
                memory if i in c.memory_layers else None,
                c.rope_theta,
                c.norm_eps,
            )
            for i in range(c.layers)
        ]
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)

    def make_cache(self) -> list:
        return [LayerCache() for _ in self.layers]

    def __call__(self, tokens, cache: Optional[list] = None):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, n), got shape {tuple(tokens.shape)}")
        cache = cache if cache is not None else self.make_cache()
        offset = cache[0].offset
        x = self.embed_tokens(tokens)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache, offset)
            layer_cache.offset = offset + tokens.shape[1]
        x = self.norm(x)
        return self.embed_tokens.as_linear(x) if self.config.tie_embeddings else self.lm_head(x)

    def description(self) -> dict:
        """What a saved cache depends on (see prompt_cache.save_cache_file)."""
        return {"model": "TitansLM", "config": asdict(self.config)}

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))


def save_model(path, model: TitansLM, tokenizer_file=None, dtype=None) -> None:
    """config.json + model.safetensors (+ tokenizer.json), written to a temporary folder renamed into place;
    `dtype` (e.g. mx.bfloat16) stores the weights in that type, halving the file."""
    with atomic_folder(path) as tmp:
        config = {"model_type": "titans", **asdict(model.config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weights = dict(tree_flatten(model.parameters()))
        if dtype is not None:
            weights = {k: v.astype(dtype) for k, v in weights.items()}
        mx.save_safetensors(str(tmp / "model.safetensors"), weights)
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, tmp / "tokenizer.json")


def checkpoint_folder(path) -> Path:
    """`path` if it holds a checkpoint (config.json), else the newest checkpoint of the training run folder `path`
    (mlx_titans.train's --out, its checkpoints in step-NNNNNNNN/): either runs wherever a model is asked for."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    steps = sorted(path.glob("step-*/config.json"))
    if not steps:
        raise FileNotFoundError(f"no TitansLM checkpoint at {path} (no config.json, nor a training run's step-*/)")
    return steps[-1].parent


def read_config(folder) -> dict:
    """config.json of a model folder as a dict; one clear error if it is not a JSON object."""
    return read_json_object(Path(folder) / "config.json")


def load_model(path, memory: Optional[dict] = None) -> TitansLM:
    """A TitansLM checkpoint folder, or a training run folder's newest checkpoint. `memory`: MemoryConfig fields that
    replace the saved ones, e.g. {"max_decay": 0.1} runs the trained weights with a forget gate ten times slower."""
    path = checkpoint_folder(path)
    config = read_config(path)
    if config.get("model_type") != "titans":
        raise ValueError(f"{path} is not a TitansLM checkpoint (model_type {config.get('model_type')!r})")
    saved_memory = config.get("memory", {})
    if not isinstance(saved_memory, dict):
        raise ValueError(f"{path}/config.json: memory must be an object of MemoryConfig fields, got {saved_memory!r}")
    try:
        model = TitansLM(TitansLMConfig.from_dict({**config, "memory": {**saved_memory, **(memory or {})}}))
    except ValueError as e:
        raise ValueError(f"{path}/config.json: {e}") from None
    weights, _ = read_safetensors(path / "model.safetensors", "TitansLM weights")
    try:
        model.load_weights(list(weights.items()))
    except ValueError as e:  # weights missing or of other shapes
        raise ValueError(f"{path}/model.safetensors does not fit its config.json ({str(e).splitlines()[0]})") from None
    model.set_dtype(mx.float32)  # weights may be stored in half precision; the memory's updates run in float32
    mx.eval(model.parameters())
    return model
