"""The Titans blocks (paper §4) and the baselines, in a Llama-style macro-architecture (pre-RMSNorm, SwiGLU, RoPE).

    mac          attention over [persistent | h = M*(x) read before the segment | segment]; the memory stores the
                 attention output y and the block returns y * sigmoid(M(y))           (paper eqs. 21-25)
    mag          sliding-window attention and the memory side by side, combined by a normalised gate (26-28)
    mal          memory layer, then sliding-window attention                           (29-31)
    lmm          memory only
    swa          sliding-window attention only (baseline)
    transformer  full causal attention (Transformer++ baseline)

Every block takes (x, cache, offset) and updates its cache in place; the whole-sequence forward is the same code
with a fresh cache, so cached decoding equals the uncached forward by construction, and the tests check it.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import Attention, AttentionCache
from .memory_config import MemoryConfig
from .neural_memory import MemoryState, NeuralMemory

VARIANTS = ("mac", "mag", "mal", "lmm", "swa", "transformer")


class LayerCache(AttentionCache):
    """Attention cache plus the memory's state (MAC also keeps the state at the start of its segment and, with a
    convolution, the last inputs of its reads' query stream), and `offset`, the tokens seen.

    It honours mlx-lm's cache contract (state get and set, from_state, size, empty, nbytes, is_trimmable), so
    mlx_lm's save_prompt_cache writes it and mlx_titans.load_prompt_cache restores it."""

    ARRAYS = ("keys", "values", "extra_keys", "extra_values", "retrieve_conv")
    MEMORIES = ("memory", "memory_at_segment_start")

    def __init__(self):
        super().__init__()
        self.memory = None
        self.memory_at_segment_start = None
        self.retrieve_conv = None
        self.offset = 0

    @property
    def state(self):
        memories = {
            name: None if getattr(self, name) is None else getattr(self, name).to_tree() for name in self.MEMORIES
        }
        return {
            **{name: getattr(self, name) for name in self.ARRAYS},
            **memories,
            "start": self.start,
            "offset": self.offset,
        }

    @state.setter
    def state(self, v):
        for name in self.ARRAYS:
            setattr(self, name, v[name])
        for name in self.MEMORIES:
            setattr(self, name, None if v[name] is None else MemoryState.from_tree(v[name]))
        self.start, self.offset = v["start"], v["offset"]

    @classmethod
    def from_state(cls, state) -> "LayerCache":
        cache = cls()
        cache.state = state
        return cache

    def size(self) -> int:
        """The keys attention holds."""
        return 0 if self.keys is None else self.keys.shape[2]

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for _, x in tree_flatten(self.state) if isinstance(x, mx.array))

    def is_trimmable(self) -> bool:
        return False


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(
        self,
        variant: str,
        dim: int,
        heads: int,
        mlp_dim: int,
        window: int,
        persistent_tokens: int,
        memory: MemoryConfig = None,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.window = variant, window
        if variant != "lmm":
            mode = {"mac": "segment", "transformer": "full"}.get(variant, "window")
            self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
            self.attn = Attention(dim, heads, mode, window, persistent_tokens, rope_theta)
        if memory is not None:
            self.memory_norm = nn.RMSNorm(dim, eps=norm_eps)
            self.memory = NeuralMemory(memory)
            if variant == "mag":
                self.gate_norm_attn = nn.RMSNorm(dim, eps=norm_eps)
                self.gate_norm_memory = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_dim)

    def __call__(self, x, cache: LayerCache, offset: int):
        if self.variant == "mac":
            return self._mac(x, cache, offset)
        has_memory = "memory" in self
        if has_memory and self.variant in ("mal", "lmm"):
            read, cache.memory = self.memory(self.memory_norm(x), cache.memory)
            x = x + read
        if self.variant == "mag":
            h = self.attn_norm(x)
            y = self.attn(h, cache, offset)
            if has_memory:
                read, cache.memory = self.memory(self.memory_norm(x), cache.memory)
                y = self.gate_norm_attn(y) * mx.sigmoid(self.gate_norm_memory(read))
            x = x + y
        elif "attn" in self:
            x = x + self.attn(self.attn_norm(x), cache, offset)
        return x + self.mlp(self.mlp_norm(x))

    def _mac(self, x, cache: LayerCache, offset: int):
        """Segment by segment: the read h uses the memory as it was when the segment began."""
        outs, start, n = [], 0, x.shape[1]
        while start < n:
            end = min(n, start + self.window - (offset + start) % self.window)
            outs.append(self._mac_segment(x[:, start:end], cache, offset + start))
            start = end
        return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]

    def _mac_segment(self, x, cache: LayerCache, offset: int):
        h = self.attn_norm(x)
        if "memory" not in self:
            y = self.attn(h, cache, offset)
        else:
            if cache.memory_at_segment_start is None:
                cache.memory = cache.memory_at_segment_start = self.memory.initial_state(x.shape[0])
            read_before, cache.retrieve_conv = self.memory.retrieve(
                self.memory_norm(x), cache.memory_at_segment_start, cache.retrieve_conv
            )
            y = self.attn(h, cache, offset, extra=read_before)
            read_after, cache.memory = self.memory(y, cache.memory)
            y = y * mx.sigmoid(read_after)
            if (offset + x.shape[1]) % self.window == 0:
                cache.memory_at_segment_start = cache.memory
        x = x + y
        return x + self.mlp(self.mlp_norm(x))
