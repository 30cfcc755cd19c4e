"""TitansQwen: mlx-lm's Qwen2 / Qwen2.5 / Qwen3 with bounded attention and Titans neural memory layers.

Built on mlx_lm.models.qwen2 / qwen3: the same modules and weight names (HF checkpoints load unchanged), the same
lm_head / tied-embedding, sanitize and inner model, plus a "titans" section in config.json:

    {"memory_layers": [3, 10, 17, 24], "window": 4096, "sink_tokens": 4, "segment_size": 2048,
     "memory": {MemoryConfig fields except dim, which is hidden_size}}

Attention sees the first `sink_tokens` tokens (StreamingLLM) and a window that slides once per segment: a token
of segment k = t // segment_size sees the `window` tokens before the segment's start and the segment up to itself
(between `window` and `window + segment_size` recent keys). So every call attends all the keys its cache holds under
a plain causal mask, mlx-lm's fused attention path, and no (queries x keys) mask is ever built. RoPE positions stay
bounded whatever the context length: in segment k a token at absolute index t sits at t - shift_k, with
shift_k = max(0, k * segment_size - window - sink_tokens), and the sinks at 0..s-1 (the cache rotates its window's
keys down once per segment). Distances inside the window are exact, no position exceeds
segment_size + window + sink_tokens, and since a query's keys and positions depend only on its own index, any split
of the input into calls gives the same outputs (calls are cut internally at segment boundaries). Until the first
eviction every shift is 0: the model is then exactly the base model.

Memory layers, after the attention residual:  h = h + memory_gate * NeuralMemory(post_attention_layernorm(h)).
memory_gate is per channel and starts at 0, so an untrained memory leaves the base model's outputs exactly unchanged.
Memory weights stay float32 and unquantized; converted models keep them in titans_memory.safetensors, beside
mlx-lm's model*.safetensors, which stock mlx-lm loads as the plain Qwen.
"""

import functools
import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import _BaseCache
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.utils import load_config, load_model, load_tokenizer

from .files import load_safetensors_checked, save_safetensors_atomic
from .neural_memory import MemoryConfig, NeuralMemory

QWEN_TYPES = ("qwen2", "qwen3")
MEMORY_WEIGHTS = "titans_memory.safetensors"
STATE_FORMAT = "mlx-titans-qwen-state/2"
DEFAULT_MEMORY = {"heads": 4, "dim_head": 128, "chunk_size": 64}


def default_memory_layers(num_layers: int, count: int = 4) -> list:
    """`count` evenly spaced layers, one in the middle of each equal block of the stack (3, 10, 17, 24 of 28)."""
    step = max(1, num_layers // count)
    return list(range(step // 2, num_layers, step))[:count]


@dataclass(frozen=True)
class TitansConfig:
    memory_layers: tuple
    memory: MemoryConfig
    window: int = 4096
    sink_tokens: int = 4
    segment_size: int = 2048  # prompt tokens per call in `prefill` (a multiple of the memory chunk)

    @classmethod
    def from_section(cls, section: dict, num_layers: int, hidden_size: int) -> "TitansConfig":
        """Resolve a (possibly partial or empty) titans section against the defaults and check it."""
        def bad(msg):
            raise ValueError(f"titans config: {msg}")

        unknown = set(section) - {"memory_layers", "window", "sink_tokens", "segment_size", "memory"}
        if unknown:
            bad(f"unknown fields {sorted(unknown)}")
        memory = section.get("memory", {})
        if "dim" in memory:
            bad("memory.dim is the model's hidden_size; leave it out")
        layers = section.get("memory_layers")
        layers = tuple(sorted(set(default_memory_layers(num_layers) if layers is None else layers)))
        sizes = {k: section[k] for k in ("window", "sink_tokens", "segment_size") if k in section}
        cfg = cls(layers, MemoryConfig.from_dict({**DEFAULT_MEMORY, **memory, "dim": hidden_size}), **sizes)
        if any(not 0 <= i < num_layers for i in layers):
            bad(f"memory_layers {list(layers)} must lie in 0..{num_layers - 1}")
        if cfg.window < 1 or cfg.sink_tokens < 0:
            bad("window must be >= 1 and sink_tokens >= 0")
        if cfg.segment_size < 1 or cfg.segment_size % cfg.memory.chunk_size:
            bad(f"segment_size {cfg.segment_size} must be a multiple of the memory chunk_size {cfg.memory.chunk_size}")
        return cfg

    def to_section(self) -> dict:
        memory = self.memory.to_dict()
        del memory["dim"]
        return {"memory_layers": list(self.memory_layers), "window": self.window, "sink_tokens": self.sink_tokens,
                "segment_size": self.segment_size, "memory": memory}


def is_memory_weight(name: str) -> bool:
    """model.layers.N.memory.* and model.layers.N.memory_gate: float32, never quantized, in MEMORY_WEIGHTS."""
    return ".memory" in name


def memory_weights(model) -> dict:
    return {k: v for k, v in tree_flatten(model.parameters()) if is_memory_weight(k)}


# ---------------------------------------------------------------------------------------------------- attention
def composable(rope) -> bool:
    """Whether rope(rope(k, offset=a), offset=b) rotates k as rope(k, offset=a + b): angles linear in the position
    and no scaling of the input (mlx-lm's plain and Llama 3 RoPE; not YaRN, SuScaled or dynamic NTK)."""
    return type(rope) in (nn.RoPE, Llama3RoPE)


class TitansCache(_BaseCache):
    """One layer's context: the keys and values of the sinks, of the `window` tokens before the current segment and
    of the segment so far, and the layer's NeuralMemory state (None in layers without memory).

    Keys are kept rotated, at the positions of the current segment's RoPE shift (`shift`). Decoding writes each
    token into preallocated buffers in place, as stock mlx-lm's KVCache does; once per segment the buffers are
    compacted to sinks + last `window` and the window's keys rotated down by the shift's change. That takes a RoPE
    whose rotations compose (see `composable`); for any other the cache also keeps the keys before RoPE and rotates
    those, one more write per step. `offset` counts every token seen."""

    step = 256

    def __init__(self, sink_tokens: int, window: int, segment_size: int):
        self.sink_tokens, self.window, self.segment_size = sink_tokens, window, segment_size
        self._k = self._v = self._unrotated = self.memory = None
        self.size = 0  # keys held: the sinks, then a contiguous run of recent tokens
        self.offset = 0
        self.shift = 0  # the RoPE shift of the kept keys' positions

    @property
    def state(self):
        return self._k, self._v, self._unrotated, self.memory

    @property
    def keys(self):
        """The kept keys, rotated at their positions under `shift`."""
        return None if self._k is None else self._k[:, :, : self.size]

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, : self.size]

    @property
    def unrotated(self):
        """The kept keys before RoPE, kept only for a RoPE that does not compose."""
        return None if self._unrotated is None else self._unrotated[:, :, : self.size]

    def restore(self, keys, values, offset: int, shift: int, unrotated=None):
        """Set the kept keys/values, position and shift (from a saved state)."""
        self._k, self._v, self._unrotated = keys, values, unrotated
        self.size, self.offset, self.shift = (0 if keys is None else keys.shape[2]), offset, shift

    def position_shift(self) -> int:
        """How far below their absolute index the window keys and this call's tokens are rotated (see the module
        docstring); calls never cross a segment boundary, so one shift serves the whole call."""
        start = self.offset // self.segment_size * self.segment_size
        return max(0, start - self.window - self.sink_tokens)

    def make_mask(self, N: int, **_):
        """Every kept key is visible (see the module docstring): causal among the new tokens."""
        return "causal" if N > 1 else None

    def _write(self, buffer, new):
        """new into buffer at [size, size + L), growing it in steps; returns the buffer."""
        B, H, L, D = new.shape
        if buffer is None or self.size + L > buffer.shape[2]:
            grow = mx.zeros((B, H, (self.size + L + self.step - 1) // self.step * self.step, D), dtype=new.dtype)
            if buffer is not None:
                grow[:, :, : self.size] = buffer[:, :, : self.size]
            buffer = grow
        buffer[:, :, self.size : self.size + L] = new
        return buffer

    def _compact(self):
        """Drop the keys no query can see any more: keep the sinks and the last `window`."""
        s, n = self.sink_tokens, self.size
        if n <= s + self.window:
            return
        keep = lambda b: None if b is None else mx.concatenate([b[:, :, :s], b[:, :, n - self.window : n]], axis=2)
        self._k, self._v, self._unrotated = keep(self._k), keep(self._v), keep(self._unrotated)
        self.size = s + self.window

    def _rotate_window(self, rope, shift: int):
        """The window's keys (after the sinks) rotated at their positions under `shift`."""
        s = self.sink_tokens
        if self._unrotated is not None:
            first = self.offset - (self.size - s)  # absolute index of slot s
            return rope(self._unrotated[:, :, s : self.size], offset=first - shift)
        window = self._k[:, :, s : self.size]
        B, H, L, D = window.shape  # every key moves by the same angle: one position each, as one "token" per row
        return rope(window.reshape(B, H * L, 1, D), offset=self.shift - shift).reshape(B, H, L, D)

    def update_and_fetch(self, keys, values, rope):
        """Append this call's keys (before RoPE) and values; return the rotated keys and the values it attends."""
        shift = self.position_shift()
        if shift != self.shift and self.size > self.sink_tokens:  # a new segment: the window's positions move
            self._k[:, :, self.sink_tokens : self.size] = self._rotate_window(rope, shift)
        self.shift = shift
        if self._unrotated is not None or not composable(rope):
            self._unrotated = self._write(self._unrotated, keys)
        self._k, self._v = self._write(self._k, rope(keys, offset=self.offset - shift)), self._write(self._v, values)
        self.size += keys.shape[2]
        self.offset += keys.shape[2]
        out = self._k[:, :, : self.size], self._v[:, :, : self.size]
        if self.position_shift() != shift:  # the next call starts a new segment: drop what it cannot see
            self._compact()
        return out

    def empty(self):
        return self._k is None

    @property
    def nbytes(self):
        return sum(x.nbytes for _, x in tree_flatten(self.state) if isinstance(x, mx.array))


def window_attention(attn, x, mask, cache: TitansCache):
    """mlx-lm's Qwen2/Qwen3 attention over a TitansCache, with RoPE at the cache's bounded positions."""
    B, L, _ = x.shape
    queries = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)
    keys = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    values = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if "q_norm" in attn:  # Qwen3
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries = attn.rope(queries.transpose(0, 2, 1, 3), offset=cache.offset - cache.position_shift())
    keys, values = cache.update_and_fetch(keys.transpose(0, 2, 1, 3), values, attn.rope)
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


# ---------------------------------------------------------------------------------------------------- model
@mx.compile
def gated_residual(h, gate, read):
    """h + gate * read in h's dtype: one fused kernel where the op-by-op form launches three (decode is
    launch bound)."""
    return h + (gate * read).astype(h.dtype)


class MemoryBlock:
    """Mixed into mlx-lm's TransformerBlock: windowed attention, then (in memory layers) the gated memory read."""

    def __init__(self, args, memory: Optional[MemoryConfig]):
        super().__init__(args)
        if memory is not None:
            self.memory = NeuralMemory(memory)
            self.memory_gate = mx.zeros((args.hidden_size,))
            # the read's modules as implicit inputs (their weights as they are at each call), not the whole
            # block's: fewer arrays to flatten per call, and decode is host bound
            self._read_step = mx.compile(self._read_step_eager,
                                         inputs=[self.memory.state, self.post_attention_layernorm.state])

    def __call__(self, x, mask, cache: TitansCache):
        h = x + window_attention(self.self_attn, self.input_layernorm(x), mask, cache)
        if "memory" in self:
            h = self._memory_residual(h, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _memory_residual(self, h, cache: TitansCache):
        """h + memory_gate * memory(post_attention_layernorm(h)). A call that completes no memory chunk (63 decode
        steps in 64) runs as one compiled graph: decode is bound by kernel launches and Python calls per token."""
        state, n = cache.memory, h.shape[1]
        if state is None or self.memory.completes_chunk(state, n):
            read, cache.memory = self.memory(self.post_attention_layernorm(h), state)
            return gated_residual(h, self.memory_gate, read)
        h, remainder, conv = self._read_step(h, self.memory_gate, *self.memory.read_step_inputs(state))
        cache.memory = self.memory.state_after_read(state, remainder, conv, n)
        return h

    def _read_step_eager(self, h, gate, weights, remainder, conv):
        read, remainder, conv = self.memory.read_step(self.post_attention_layernorm(h), weights, remainder, conv)
        return gated_residual(h, gate, read), remainder, conv


class TitansQwen:
    """Mixed into mlx-lm's qwen2/qwen3 Model (see `get_model_classes`); `model.titans` is the resolved section."""

    block_class: type

    def __init__(self, args):
        super().__init__(args)
        self.titans = TitansConfig.from_section(args.titans, args.num_hidden_layers, args.hidden_size)
        self.model.layers = [
            self.block_class(args, self.titans.memory if i in self.titans.memory_layers else None)
            for i in range(args.num_hidden_layers)
        ]

    def __call__(self, inputs, cache=None, input_embeddings=None):
        """Logits (batch, tokens, vocab); without a cache the input starts a new context."""
        cache = self.make_cache() if cache is None else cache
        return self.head(self.hidden(inputs, cache, input_embeddings))

    def hidden(self, inputs, cache, input_embeddings=None):
        """The final hidden states, the input cut at segment boundaries (one RoPE shift per call)."""
        size, n = self.titans.segment_size, inputs.shape[1]
        pieces, start = [], 0
        while start < n:
            end = min(n, start + size - (cache[0].offset % size if start == 0 else 0))
            embeddings = None if input_embeddings is None else input_embeddings[:, start:end]
            pieces.append(self.model(inputs[:, start:end], cache, embeddings))
            start = end
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)

    def head(self, h):
        """mlx-lm's Qwen output layer: the tied embedding or lm_head."""
        return self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    def make_cache(self) -> list:
        return [TitansCache(self.titans.sink_tokens, self.titans.window, self.titans.segment_size)
                for _ in self.layers]

    def sanitize(self, weights):
        """mlx-lm's sanitize; memory weights the checkpoint lacks keep their initial values (gate closed)."""
        return {**memory_weights(self), **super().sanitize(weights)}

    def quant_predicate(self, path, module):
        return not is_memory_weight(path)

    def cast_predicate(self, name):
        return not is_memory_weight(name)


@functools.cache
def _classes(model_type: str):
    base = importlib.import_module(f"mlx_lm.models.{model_type}")

    @dataclass
    class ModelArgs(base.ModelArgs):
        titans: dict = field(default_factory=dict)

    class TransformerBlock(MemoryBlock, base.TransformerBlock):
        pass

    class Model(TitansQwen, base.Model):
        block_class = TransformerBlock

    return Model, ModelArgs


def get_model_classes(config: dict):
    """(Model, ModelArgs) for mlx_lm.utils.load_model: TitansQwen on mlx-lm's qwen2 or qwen3."""
    if config.get("model_type") not in QWEN_TYPES:
        raise ValueError(f"TitansQwen supports model_type qwen2 and qwen3, not {config.get('model_type')!r}")
    return _classes(config["model_type"])


# ---------------------------------------------------------------------------------------------------- loading
def read_qwen_config(path: Path) -> dict:
    """config.json (with generation_config's eos) of a Qwen2/Qwen2.5/Qwen3 directory; ValueError otherwise."""
    if not path.is_dir():
        raise ValueError(f"no model directory at {path}")
    try:
        config = load_config(path)
    except FileNotFoundError:
        raise ValueError(f"{path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}/config.json is not valid JSON ({e})") from None
    if config.get("model_type") not in QWEN_TYPES:
        raise ValueError(f"{path} holds a {config.get('model_type')!r} model, not Qwen2/Qwen2.5/Qwen3 "
                         "(model_type qwen2 or qwen3)")
    return config


def build_model(path: Path, titans: dict, lazy: bool = False):
    """mlx-lm's load_model with TitansQwen classes, then the memory weights from MEMORY_WEIGHTS when present.
    Returns (model, config) with the resolved titans section in config."""
    try:
        model, config = load_model(path, lazy=True, model_config={"titans": titans},
                                   get_model_classes=get_model_classes)
        if (path / MEMORY_WEIGHTS).exists():
            load_memory_weights(model, path / MEMORY_WEIGHTS)
        if not lazy:
            mx.eval(model.parameters())
    except (RuntimeError, FileNotFoundError) as e:  # mx.load on a corrupt file, no model*.safetensors
        raise ValueError(f"cannot read the weights in {path}: {str(e).strip().splitlines()[0]}") from None
    config["titans"] = model.titans.to_section()
    return model, config


def load_memory_weights(model, file: Path):
    weights = mx.load(str(file))
    expected = memory_weights(model)
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{file} does not fit the titans section of config.json (other memory layers or sizes)")
    model.load_weights(list(weights.items()), strict=False)


def load(path, *, window: Optional[int] = None):
    """(model, tokenizer, config) from a directory written by convert/qwen.py, or from a plain mlx-lm / HF Qwen
    directory (then with the default titans section: untrained memory, gate closed). `window` overrides the
    titans window."""
    path = Path(path)
    titans = dict(read_qwen_config(path).get("titans", {}))
    if window is not None:
        titans["window"] = window
    model, config = build_model(path, titans)
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id")), config


def prefill(model, tokens: mx.array, cache: list, segment_size: Optional[int] = None, progress=None):
    """Feed a prompt (batch, n) through the model `segment_size` tokens per call (default: the titans
    segment_size), evaluating the cache after each so that memory use does not grow with n.
    Returns the logits of the last position, (batch, vocab). progress(done, total) follows each segment."""
    size = segment_size or model.titans.segment_size
    total = tokens.shape[1]
    if total == 0:
        raise ValueError("prefill needs at least one token")
    for start in range(0, total, size):
        hidden = model.hidden(tokens[:, start : start + size], cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        if progress is not None:
            progress(min(start + size, total), total)
    return model.head(hidden[:, -1])


# ---------------------------------------------------------------------------------------------------- state files
def model_description(model) -> dict:
    """What a saved state depends on: the base model's config (shapes, RoPE) and the titans section."""
    base = {k: v for k, v in asdict(model.args).items() if k != "titans"}
    return {"base": base, "titans": model.titans.to_section()}


def _fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def save_memory_state(path, model, cache: list) -> None:
    """Write the window keys/values, offsets and memory states of `cache` to a safetensors file, atomically."""
    path = Path(path)
    flat = tree_flatten([{"keys": c.keys, "values": c.values, "unrotated": c.unrotated, "offset": c.offset,
                          "shift": c.shift, "memory": c.memory} for c in cache])
    description = model_description(model)
    metadata = {
        "format": STATE_FORMAT,
        "fingerprint": _fingerprint(description),
        "model": json.dumps(description, sort_keys=True),
        "integers": json.dumps({k: v for k, v in flat if isinstance(v, int)}),
    }
    save_safetensors_atomic(path, {k: v for k, v in flat if isinstance(v, mx.array)}, metadata)


def load_memory_state(path, model) -> list:
    """A cache continuing exactly where `save_memory_state` stopped; refuses a state saved for another model."""
    arrays, metadata = load_safetensors_checked(path, STATE_FORMAT, "TitansQwen memory state")
    ours = model_description(model)
    if metadata.get("fingerprint") != _fingerprint(ours):
        saved, ours = dict(tree_flatten(json.loads(metadata["model"]))), dict(tree_flatten(ours))
        differ = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise ValueError(f"memory state {path} was saved for another model (differs in {', '.join(differ[:6])})")
    layers = tree_unflatten([*arrays.items(), *json.loads(metadata["integers"]).items()])
    cache = model.make_cache()
    for c, saved in zip(cache, layers):
        c.restore(saved.get("keys"), saved.get("values"), saved["offset"], saved["shift"], saved.get("unrotated"))
        c.memory = saved.get("memory")
    return cache
