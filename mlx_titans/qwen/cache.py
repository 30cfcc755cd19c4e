"""TitansCache: one TitansQwen layer's bounded context (see mlx_titans/qwen/model.py for the attention it serves)."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.rope_utils import Llama3RoPE

from ..neural_memory import MemoryState


def composable(rope) -> bool:
    """Whether rope(rope(k, offset=a), offset=b) rotates k as rope(k, offset=a + b): angles linear in the position
    and no scaling of the input (mlx-lm's plain and Llama 3 RoPE; not YaRN, SuScaled or dynamic NTK)."""
    return type(rope) in (nn.RoPE, Llama3RoPE)


class TitansCache:
    """One layer's context: the keys and values of the sinks, of the `window` tokens before the current segment and
    of the segment so far, and the layer's NeuralMemory state (None in layers without memory).

    Keys are kept rotated, at the positions of the current segment's RoPE shift (`shift`). Decoding writes each
    token into preallocated buffers in place, as stock mlx-lm's KVCache does; once per segment the buffers are
    compacted to sinks + last `window` and the window's keys rotated down by the shift's change. That takes a RoPE
    whose rotations compose (see `composable`); for any other the cache also keeps the keys before RoPE and rotates
    those, one more write per step. `offset` counts every token seen.

    It honours mlx-lm's cache contract: `state` (get and set) is a dict tree of the kept keys and values, the ints
    and the memory's state, so mlx_lm's save_prompt_cache writes it and mlx_titans.load_prompt_cache restores it."""

    step = 256

    def __init__(self, sink_tokens: int, window: int, segment_size: int):
        self.sink_tokens, self.window, self.segment_size = sink_tokens, window, segment_size
        self._k = self._v = self._unrotated = self.memory = None
        self._size = 0  # keys held: the sinks, then a contiguous run of recent tokens
        self.offset = 0
        self.shift = 0  # the RoPE shift of the kept keys' positions

    @property
    def state(self):
        return {
            "keys": self.keys,
            "values": self.values,
            "unrotated": self.unrotated,
            "offset": self.offset,
            "shift": self.shift,
            "sink_tokens": self.sink_tokens,
            "window": self.window,
            "segment_size": self.segment_size,
            "memory": None if self.memory is None else self.memory.to_tree(),
        }

    @state.setter
    def state(self, v):
        self.sink_tokens, self.window, self.segment_size = v["sink_tokens"], v["window"], v["segment_size"]
        self._k, self._v, self._unrotated = v["keys"], v["values"], v["unrotated"]
        self._size = 0 if self._k is None else self._k.shape[2]
        self.offset, self.shift = v["offset"], v["shift"]
        self.memory = None if v["memory"] is None else MemoryState.from_tree(v["memory"])

    @classmethod
    def from_state(cls, state) -> "TitansCache":
        """A cache holding `state` (mlx-lm's loader calls this)."""
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    def is_trimmable(self) -> bool:
        return False

    def size(self) -> int:
        """The keys held: the sinks, then a contiguous run of recent tokens."""
        return self._size

    @property
    def keys(self):
        """The kept keys, rotated at their positions under `shift`."""
        return None if self._k is None else self._k[:, :, : self._size]

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, : self._size]

    @property
    def unrotated(self):
        """The kept keys before RoPE, kept only for a RoPE that does not compose."""
        return None if self._unrotated is None else self._unrotated[:, :, : self._size]

    def position_shift(self) -> int:
        """How far below their absolute index the window keys and this call's tokens are rotated (see qwen/model.py's
        docstring); calls never cross a segment boundary, so one shift serves the whole call."""
        start = self.offset // self.segment_size * self.segment_size
        return max(0, start - self.window - self.sink_tokens)

    def make_mask(self, N: int, **_):
        """Every kept key is visible (see qwen/model.py's docstring): causal among the new tokens."""
        return "causal" if N > 1 else None

    def _write(self, buffer, new):
        """new into buffer at [size, size + L), growing it in steps; returns the buffer."""
        B, H, L, D = new.shape
        if buffer is None or self._size + L > buffer.shape[2]:
            grow = mx.zeros((B, H, (self._size + L + self.step - 1) // self.step * self.step, D), dtype=new.dtype)
            if buffer is not None:
                grow[:, :, : self._size] = buffer[:, :, : self._size]
            buffer = grow
        buffer[:, :, self._size : self._size + L] = new
        return buffer

    def _compact(self):
        """Drop the keys no query can see any more: keep the sinks and the last `window`."""
        s, n = self.sink_tokens, self._size
        if n <= s + self.window:
            return
        keep = lambda b: None if b is None else mx.concatenate([b[:, :, :s], b[:, :, n - self.window : n]], axis=2)
        self._k, self._v, self._unrotated = keep(self._k), keep(self._v), keep(self._unrotated)
        self._size = s + self.window

    def _rotate_window(self, rope, shift: int):
        """The window's keys (after the sinks) rotated at their positions under `shift`."""
        s = self.sink_tokens
        if self._unrotated is not None:
            first = self.offset - (self._size - s)  # absolute index of slot s
            return rope(self._unrotated[:, :, s : self._size], offset=first - shift)
        window = self._k[:, :, s : self._size]
        B, H, L, D = window.shape  # every key moves by the same angle: one position each, as one "token" per row
        return rope(window.reshape(B, H * L, 1, D), offset=self.shift - shift).reshape(B, H, L, D)

    def update_and_fetch(self, keys, values, rope):
        """Append this call's keys (before RoPE) and values; return the rotated keys and the values it attends."""
        shift = self.position_shift()
        if shift != self.shift and self._size > self.sink_tokens:  # a new segment: the window's positions move
            self._k[:, :, self.sink_tokens : self._size] = self._rotate_window(rope, shift)
        self.shift = shift
        if self._unrotated is not None or not composable(rope):
            self._unrotated = self._write(self._unrotated, keys)
        self._k, self._v = self._write(self._k, rope(keys, offset=self.offset - shift)), self._write(self._v, values)
        self._size += keys.shape[2]
        self.offset += keys.shape[2]
        out = self._k[:, :, : self._size], self._v[:, :, : self._size]
        if self.position_shift() != shift:  # the next call starts a new segment: drop what it cannot see
            self._compact()
        return out

    def empty(self):
        return self._k is None

    @property
    def nbytes(self):
        return sum(x.nbytes for _, x in tree_flatten(self.state) if isinstance(x, mx.array))


class LinearCache(ArraysCache):
    """A linear-attention (Gated DeltaNet) memory layer's context: mlx-lm's ArraysCache (the convolution's last
    inputs and the recurrent state, both of fixed size) and the layer's NeuralMemory state."""

    memory = None

    @property
    def state(self):
        return (*ArraysCache.state.fget(self), None if self.memory is None else self.memory.to_tree())

    @state.setter
    def state(self, v):
        *arrays, memory = v
        ArraysCache.state.fset(self, arrays)
        self.memory = None if memory is None else MemoryState.from_tree(memory)

    @property
    def nbytes(self):
        return sum(x.nbytes for _, x in tree_flatten(self.state) if isinstance(x, mx.array))
