"""Causal attention for the Titans architectures: full, sliding-window, or within segments (MAC).

Learnable persistent tokens (paper §3.3) are prepended as keys/values that every query sees. The cache keeps only
the keys a future query can still see (the last window-1 keys, the current segment, or everything for full
attention), so a sliding-window or segment model decodes in memory that does not grow with the context.
"""

import mlx.core as mx
import mlx.nn as nn

MODES = ("full", "window", "segment")


def first_visible(positions, mode: str, span: int):
    """Smallest key position a query at `positions` (an int or an array) may see."""
    if mode == "full":
        return positions * 0
    if mode == "window":
        return positions - span + 1
    return positions - positions % span


class AttentionCache:
    """Rotated keys/values still visible to later queries, with the absolute position of the first one; `extra`
    holds MAC's retrieved-memory keys/values for the current segment (same positions as its tokens)."""

    def __init__(self):
        self.keys = self.values = None
        self.extra_keys = self.extra_values = None
        self.start = 0


def _append(old, new):
    return new if old is None else mx.concatenate([old, new], axis=2)


class Attention(nn.Module):
    def __init__(
        self, dim: int, heads: int, mode: str, span: int = 0, persistent_tokens: int = 0, rope_theta: float = 10000.0
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
        if mode != "full" and span < 1:
            raise ValueError(f"{mode} attention needs a positive span, got {span}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.mode, self.span, self.heads, self.rope_theta = mode, span, heads, rope_theta
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        if persistent_tokens:
            self.persistent = 0.02 * mx.random.normal((persistent_tokens, dim))

    def _heads(self, t, offset=None):
        b, n, _ = t.shape
        t = t.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        if offset is None:
            return t
        return mx.fast.rope(t, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)

    def __call__(self, x, cache: AttentionCache, offset: int, extra=None):
        """Attend for tokens at absolute positions offset.. of x; `extra` (MAC's h) adds one key/value per token
        at the token's own position. Updates the cache."""
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), offset)
        k, v = self._heads(self.k_proj(x), offset), self._heads(self.v_proj(x))
        keys, values = _append(cache.keys, k), _append(cache.values, v)
        positions = mx.arange(cache.start, offset + n)
        query_positions = mx.arange(offset, offset + n)
        lo = first_visible(query_positions, self.mode, self.span)
        visible = (positions[None] <= query_positions[:, None]) & (positions[None] >= lo[:, None])
        parts_k, parts_v, parts_mask = [keys], [values], [visible]
        if extra is not None:
            ek, ev = self._heads(self.k_proj(extra), offset), self._heads(self.v_proj(extra))
            extra_keys, extra_values = _append(cache.extra_keys, ek), _append(cache.extra_values, ev)
            parts_k.insert(0, extra_keys)
            parts_v.insert(0, extra_values)
            parts_mask.insert(0, visible)
        if "persistent" in self:
            p = mx.broadcast_to(self.persistent[None], (b, *self.persistent.shape))
            parts_k.insert(0, self._heads(self.k_proj(p)))
            parts_v.insert(0, self._heads(self.v_proj(p)))
            parts_mask.insert(0, mx.ones((n, self.persistent.shape[0]), dtype=mx.bool_))
        out = mx.fast.scaled_dot_product_attention(
            q,
            mx.concatenate(parts_k, axis=2),
            mx.concatenate(parts_v, axis=2),
            scale=self.head_dim**-0.5,
            mask=mx.concatenate(parts_mask, axis=1),
        )
        end = offset + n
        drop = max(0, first_visible(end, self.mode, self.span) - cache.start)
        cache.keys, cache.values = keys[:, :, drop:], values[:, :, drop:]
        if extra is not None:
            cache.extra_keys, cache.extra_values = extra_keys[:, :, drop:], extra_values[:, :, drop:]
        cache.start += drop
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))
