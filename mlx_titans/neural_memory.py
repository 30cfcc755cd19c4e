"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni, arXiv 2501.00663, section 3).

A memory MLP M_W is trained online, chunk by chunk, on the associative loss lr_t * ||M_W(k_t) - v_t||^2:

    S_j = eta_j * S_{j-1} - grad_j          (momentum: past + momentary surprise)
    W_j = (1 - alpha_j) * W_{j-1} + S_j     (forgetting)
    y_t = M_{W_{(t+1)//c}}(q_t)             (retrieval: token t reads every chunk completed up to and with it)

lr (theta) is per token and sits inside the loss; eta and alpha are per chunk, from the chunk's mean input.
Every gradient of a chunk is taken at the weights at the start of its mini-batch: by default the chunk itself
(the paper's mini-batch gradient descent); `batch_size` sets a longer mini-batch, and `batch_size=0` keeps
titans-pytorch's default of taking every gradient at the initial weights (the maths: memory_update.py).

The call is `y, state = mem(x, state)` with a MemoryState. Any split of a stream gives the outputs and final state
of one call.

Axes of the dense shapes here and in memory_update.py:
    b    batch                       n    tokens of a call            dim  model width (x's last axis)
    h    heads                       B    b * heads (heads split into the batch)
    d    dim_head                    inner  heads * dim_head
    c    chunk_size                  m    chunks a call completes     r    remainder: tokens not stored yet
    o    momentum_order              K    conv_size
"""

import json
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .memory_config import MemoryConfig
from .memory_model import init_memory_weights, memory_forward
from .memory_update import PARALLEL_BLOCK, SEQUENTIAL_BLOCK, parallel_step, sequential_step


@dataclass(frozen=True)
class MemoryState:
    """A memory's stream state after `position` tokens.

    weights: {name: (B, ...)} the memory MLP's weights; remainder: the tokens not stored yet, {"inputs": (b, r, dim)}
    and, once a call has had a store mask, {"store": (b, r)} their flags; momentum: {name: (o, B, ...)} (with
    momentum); reference: the weights every gradient of the current mini-batch is taken at (batch_size other than
    one chunk); conv: the convolution's caches (conv_size > 0), {"read": (b, K - 1, inner)} the queries' inputs
    after the last token and {"store": (b, K - 1, 2 * inner)} the keys' and values' after the last stored one."""

    weights: dict
    remainder: dict
    position: int
    momentum: Optional[dict] = None
    reference: Optional[dict] = None
    conv: Optional[dict] = None

    def to_tree(self) -> dict:
        """A dict tree of the arrays and the int position, without the fields that are None (a cache's `state`)."""
        tree = {"weights": self.weights, "remainder": self.remainder, "position": self.position}
        for name in ("momentum", "reference", "conv"):
            if getattr(self, name) is not None:
                tree[name] = getattr(self, name)
        return tree

    @classmethod
    def from_tree(cls, tree: dict) -> "MemoryState":
        return cls(**tree)

    def arrays(self) -> dict:
        """The arrays only, as a dict tree: for mx.eval and saving."""
        return {k: v for k, v in self.to_tree().items() if k != "position"}

    def replace(self, **changes) -> "MemoryState":
        return replace(self, **changes)


def _split_heads(t, b: int, n: int, heads: int, per_head=(-1,)):
    """(b, n, heads * e), or its rows (b * n, heads * e) -> (b * heads, n, *per_head). A single token needs no
    transpose: on decode steps this is one reshape node where the general case takes three."""
    if n == 1:
        return t.reshape(b * heads, 1, *per_head)
    return t.reshape(b, n, heads, -1).swapaxes(1, 2).reshape(b * heads, n, *per_head)


def _merge_heads(t, b: int):
    """(b * heads, n, e) -> rows (b * n, heads * e), the inverse of _split_heads."""
    B, n, e = t.shape
    if n == 1:
        return t.reshape(b, B // b * e)
    return t.reshape(b, B // b, n, e).swapaxes(1, 2).reshape(b * n, -1)


def _append(remainder, x, store_mask):
    """The remainder (inputs (b, r, dim) of the tokens not stored yet, and their store flags (b, r) once a stream has
    had a store mask: a flag costs two kernels per decode step) with x's tokens."""
    dt, (b, n, _) = remainder["inputs"].dtype, x.shape
    out = {"inputs": mx.concatenate([remainder["inputs"], x.astype(dt)], axis=1)}
    if store_mask is not None or "store" in remainder:
        flags = remainder.get("store", mx.ones(remainder["inputs"].shape[:2], dt))
        new = mx.ones((b, n), dt) if store_mask is None else store_mask.astype(dt)
        out["store"] = mx.concatenate([flags, new], axis=1)
    return out


def _causal_conv(t, cache, weight):
    """Depthwise causal convolution over tokens: t (b, n, c), cache (b, K - 1, c) the inputs just before t, weight
    (K, c). Returns the output and the cache for the tokens after t."""
    K, n = weight.shape[0], t.shape[1]
    padded = mx.concatenate([cache, t], axis=1)
    return sum(padded[:, i : i + n] * weight[i] for i in range(K)), padded[:, padded.shape[1] - (K - 1) :]


class NeuralMemory(nn.Module):
    """Neural long-term memory. `y, state = mem(x, state=None, store_mask=None)`, x: (batch, tokens, dim).

    `gate_log`: None, or a list to which every call that stores appends the gates it computed, per chunk:
    {"lr": (B, m, c), "eta": (o, B, m), "keep": (B, m), or (B, m, d) with channelwise_decay}, keep = 1 - alpha."""

    def __init__(self, config: MemoryConfig = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else MemoryConfig(**kwargs)
        self.config = cfg
        dim, inner, h = cfg.dim, cfg.inner_dim, cfg.heads
        if cfg.pre_norm:
            self.retrieve_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
            self.store_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.to_queries = nn.Linear(dim, inner, bias=False)
        self.to_keys = nn.Linear(dim, inner, bias=False)
        self.to_values = nn.Linear(dim, inner, bias=False)
        if cfg.conv_size:
            self.conv_weight = mx.random.uniform(-1, 1, (cfg.conv_size, 3 * inner)) / math.sqrt(cfg.conv_size)
        if cfg.qk_rmsnorm:
            self.q_norm_gamma = mx.zeros((h, 1, cfg.dim_head))
            self.k_norm_gamma = mx.zeros((h, 1, cfg.dim_head))
        if cfg.post_rmsnorm:
            self.post_norm_gamma = mx.zeros((h, 1, cfg.dim_head))
        self.to_lr = nn.Linear(dim, h)
        if cfg.momentum:
            self.to_momentum = nn.Linear(dim, h * cfg.momentum_order)
        if cfg.weight_decay:
            self.to_decay = nn.Linear(dim, h * (cfg.dim_head if cfg.channelwise_decay else 1))
        for layer, bias in (
            ("to_lr", cfg.init_lr_bias),
            ("to_momentum", cfg.init_momentum_bias),
            ("to_decay", cfg.init_decay_bias),
        ):
            if bias is not None and layer in self:
                self[layer].weight = mx.zeros_like(self[layer].weight)
                self[layer].bias = mx.full(self[layer].bias.shape, bias)
        if h > 1:
            self.retrieve_gate = nn.Linear(dim, h, bias=False)
        if h > 1 or inner != dim:
            self.combine_heads = nn.Linear(inner, dim, bias=False)
        w0 = init_memory_weights(cfg.dim_head, cfg.depth, cfg.expansion, cfg.residual_norm)
        self.initial_weights = (
            {n: mx.broadcast_to(w, (h, *w.shape)) * 1 for n, w in w0.items()} if cfg.per_head_init else w0
        )
        hp = {"huber_delta": mx.array(cfg.huber_delta), "max_grad_norm": mx.array(cfg.max_grad_norm or 1.0)}
        self._hyper = hp
        self._parallel = mx.compile(partial(parallel_step, cfg))
        self._sequential = mx.compile(partial(sequential_step, cfg))
        self._read_step = mx.compile(self.read_step, inputs=self.state)
        self._prepare = mx.compile(self._prepare_eager, inputs=self.state)
        self._finish = mx.compile(self._finish_eager, inputs=self.state)
        self.gate_log = None

    def __setattr__(self, key, value):
        if key == "gate_log":  # a plain attribute: a list of arrays here would join the module's parameters
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    @classmethod
    def from_pretrained(cls, path) -> "NeuralMemory":
        """Load a directory holding config.json ({"memory": {...}}) and model.safetensors."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        mem = cls(MemoryConfig.from_dict(config["memory"]))
        mem.load_weights(str(path / "model.safetensors"))
        return mem

    # ------------------------------------------------------------------ state
    def initial_state(self, batch: int) -> MemoryState:
        cfg = self.config
        B = batch * cfg.heads
        dt = self.to_keys.weight.dtype
        zeros = partial(mx.zeros, dtype=dt)
        weights = {}
        for name, w in self.initial_weights.items():
            shape = w.shape[1:] if cfg.per_head_init else w.shape
            w = w if cfg.per_head_init else mx.broadcast_to(w, (cfg.heads, *shape))
            weights[name] = mx.broadcast_to(w[None], (batch, cfg.heads, *shape)).reshape(B, *shape)
        return MemoryState(
            weights,
            {"inputs": zeros((batch, 0, cfg.dim))},
            0,
            momentum={n: zeros((cfg.momentum_order, *w.shape)) for n, w in weights.items()} if cfg.momentum else None,
            reference=dict(weights) if cfg.refresh_chunks != 1 else None,
            conv={
                "read": zeros((batch, cfg.conv_size - 1, cfg.inner_dim)),
                "store": zeros((batch, cfg.conv_size - 1, 2 * cfg.inner_dim)),
            }
            if cfg.conv_size
            else None,
        )

    def _check_input(self, x, state, store_mask):
        cfg = self.config
        if not isinstance(x, mx.array):
            raise TypeError(f"NeuralMemory expects an mx.array, got {type(x).__name__}")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise TypeError(f"NeuralMemory expects a floating-point input, got {x.dtype}")
        if x.ndim != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"NeuralMemory expects input of shape (batch, tokens, {cfg.dim}), got {tuple(x.shape)}")
        if store_mask is not None and tuple(store_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"store_mask must have shape {tuple(x.shape[:2])}, got {tuple(store_mask.shape)}")
        if state is not None:
            self._check_state(state, x.shape[0] * cfg.heads)

    def _check_state(self, state, B):
        """Shapes and fields only (no arrays built): this runs on every call, decode steps included."""
        cfg = self.config
        if not isinstance(state, MemoryState):
            raise TypeError(f"memory state must be a MemoryState, got {type(state).__name__}")
        fields = (
            {"weights", "remainder", "position"}
            | ({"momentum"} if cfg.momentum else set())
            | ({"reference"} if cfg.refresh_chunks != 1 else set())
            | ({"conv"} if cfg.conv_size else set())
        )
        if set(state.to_tree()) != fields:
            raise ValueError(f"memory state has fields {sorted(state.to_tree())}, expected {sorted(fields)}")
        for name, w in self.initial_weights.items():
            expected = (B, *(w.shape[1:] if cfg.per_head_init else w.shape))
            got = state.weights.get(name)
            if got is None or tuple(got.shape) != expected:
                raise ValueError(
                    f"memory state does not fit this NeuralMemory (weights[{name!r}] has shape "
                    f"{None if got is None else tuple(got.shape)}, expected {expected}: another config or batch size?)"
                )

    def check_finite(self, x):
        """Raise on NaN/Inf input. A host sync: call it at API boundaries, not inside decode loops."""
        if not mx.isfinite(x).all().item():
            raise ValueError("NeuralMemory input contains NaN or Inf")

    # ------------------------------------------------------------------ features
    def _read_features(self, x, conv_cache):
        """Queries (b * heads, n, d) and retrieve gate logits of x (b, n, dim), in the weights' dtype. With a
        convolution, the queries convolve over the stream whose last inputs `conv_cache` holds. Returns (queries, gate
        logits, the cache after x). Rows (b * n, dim) go through the projections: a 2-D matmul is one graph node, a
        batched one three."""
        cfg = self.config
        b, n, dim = x.shape
        rows = x.reshape(b * n, dim)
        xr = self.retrieve_norm(rows) if cfg.pre_norm else rows
        queries, new_conv = self.to_queries(xr), None
        if cfg.conv_size:
            queries, new_conv = _causal_conv(
                queries.reshape(b, n, -1), conv_cache, self.conv_weight[:, : cfg.inner_dim]
            )
            queries = queries.reshape(b * n, -1)
        if cfg.qkv_silu:
            queries = nn.silu(queries)
        gate = self.retrieve_gate(xr) if cfg.heads > 1 else None
        return self._query_key_heads(queries, b, n, "q_norm_gamma"), gate, new_conv

    def _store_features(self, x, store, conv_cache):
        """Keys, values, learning rates (0 where `store`, if given, is 0) and gate logits of the tokens x (b, m, dim)
        that complete chunks, heads split into the batch; with a convolution, over the stream whose last inputs
        `conv_cache` holds. Returns (features, the cache after x)."""
        cfg = self.config
        b, n, dim = x.shape
        h, zeros = cfg.heads, partial(mx.zeros, dtype=x.dtype)
        rows = x.reshape(b * n, dim)
        xs = self.store_norm(rows) if cfg.pre_norm else rows
        keys, values, new_conv = self.to_keys(xs), self.to_values(xs), None
        if cfg.conv_size:
            kv, new_conv = _causal_conv(
                mx.concatenate([keys, values], axis=-1).reshape(b, n, -1),
                conv_cache,
                self.conv_weight[:, cfg.inner_dim :],
            )
            keys, values = mx.split(kv.reshape(b * n, -1), 2, axis=-1)
        if cfg.qkv_silu:
            keys, values = nn.silu(keys), nn.silu(values)
        lr = mx.sigmoid(self.to_lr(xs)) * cfg.max_lr
        if store is not None:
            lr = lr * store.reshape(b * n, 1)
        alpha_shape = (cfg.dim_head,) if cfg.channelwise_decay else ()
        feats = {
            "keys": self._query_key_heads(keys, b, n, "k_norm_gamma"),
            "values": _split_heads(values, b, n, h),
            "lr": _split_heads(lr, b, n, h, ()),
            "eta": _split_heads(self.to_momentum(xs), b, n, h)
            if cfg.momentum
            else zeros((b * h, n, cfg.momentum_order)),
            "alpha": _split_heads(self.to_decay(xs), b, n, h, alpha_shape)
            if cfg.weight_decay
            else zeros((b * h, n, *alpha_shape)),
        }
        return feats, new_conv

    def read_step(self, x, weights, remainder, conv_cache=None, store_mask=None):
        """A call that completes no chunk (decode steps; see `completes_chunk`), as arrays in, arrays out:
        every token reads `weights` as they are and joins the remainder as it came (what it stores is computed
        when its chunk completes, for the whole chunk at once). Returns (reads, remainder, the queries' conv
        cache), for `state_after_read`. Uncompiled, so that a caller can compile it into its own graph with the
        module's parameters as implicit inputs (as `__call__` does alone)."""
        y, new_conv = self._read(x, weights, conv_cache)
        return y, _append(remainder, x, store_mask), new_conv

    def read_step_inputs(self, state: MemoryState) -> tuple:
        """The arrays of `state` that `read_step` takes: (weights, remainder, the queries' conv cache or None)."""
        return state.weights, state.remainder, None if state.conv is None else state.conv["read"]

    def completes_chunk(self, state: MemoryState, n: int) -> bool:
        """Whether a call of n more tokens on `state` completes a chunk (and so stores)."""
        return state.remainder["inputs"].shape[1] + n >= self.config.chunk_size

    def state_after_read(self, state: MemoryState, remainder, read_conv, n: int) -> MemoryState:
        """The state after a `read_step` of n tokens that returned `remainder` and `read_conv`."""
        conv = None if state.conv is None else {**state.conv, "read": read_conv}
        return state.replace(remainder=remainder, position=state.position + n, conv=conv)

    def _prepare_eager(self, x, remainder, read_conv, store_conv, store_mask):
        """A call that completes chunks, before the stores: the queries and retrieve gate logits of x, the store
        features of the remainder and x up to the last completed chunk, as chunks (eta and keep = 1 - alpha per
        chunk), and the new remainder. What it computes depends on shapes alone, so it is one compiled graph."""
        cfg = self.config
        c, d, B = cfg.chunk_size, cfg.dim_head, x.shape[0] * cfg.heads
        queries, gate, read_conv = self._read_features(x.astype(remainder["inputs"].dtype), read_conv)
        unstored = _append(remainder, x, store_mask)
        m = unstored["inputs"].shape[1] // c
        store = unstored["store"][:, : m * c] if "store" in unstored else None
        feats, store_conv = self._store_features(unstored["inputs"][:, : m * c], store, store_conv)
        if cfg.channelwise_decay:
            alpha_logit = feats["alpha"].reshape(B, m, c, d).mean(2)
        else:
            alpha_logit = feats["alpha"].reshape(B, m, c).mean(-1)
        chunks = {
            "keys": feats["keys"].reshape(B, m, c, d),
            "values": feats["values"].reshape(B, m, c, d),
            "lr": feats["lr"].reshape(B, m, c),
            "eta": mx.sigmoid(feats["eta"].reshape(B, m, c, -1).mean(2)).transpose(2, 0, 1),
            "keep": 1 - cfg.max_decay * mx.sigmoid(alpha_logit),
        }
        remainder = {name: t[:, m * c :] for name, t in unstored.items()}
        return queries, gate, chunks, remainder, read_conv, store_conv

    def _finish_eager(self, start_weights, end_weights, queries, reads, gate, first: int, b: int):
        """A call's reads (b, n, dim) in the weights' dtype: its first `first` tokens read `start_weights`, the
        blocks' `reads` follow, the rest read `end_weights`. One compiled graph."""
        n = queries.shape[1]
        pieces = [memory_forward(start_weights, queries[:, :first])] if first > 0 else []
        pieces += [y.reshape(y.shape[0], -1, y.shape[-1]) for y in reads]
        done = sum(p.shape[1] for p in pieces)
        pieces.append(memory_forward(end_weights, queries[:, done:]))
        return self._output(mx.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0], gate, b, n)

    def _query_key_heads(self, t, b: int, n: int, gamma_name: str):
        """Query or key rows (b * n, heads * d) -> (b * heads, n, d), with the optional l2 / RMS normalisations."""
        cfg = self.config
        if cfg.qk_l2norm or cfg.qk_rmsnorm:
            t = t.reshape(b * n, cfg.heads, -1)
            if cfg.qk_l2norm:
                t = t * mx.rsqrt((t * t).sum(-1, keepdims=True) + 1e-12)
            if cfg.qk_rmsnorm:
                t = mx.fast.rms_norm(t, None, cfg.norm_eps) * (1 + self[gamma_name][:, 0])
        return _split_heads(t, b, n, cfg.heads)

    # ------------------------------------------------------------------ forward
    def __call__(self, x, state: Optional[MemoryState] = None, store_mask=None):
        """The reads (b, n, dim) of x, and the state after it (see MemoryState); state None starts a stream."""
        self._check_input(x, state, store_mask)
        cfg = self.config
        b, n, _ = x.shape
        c, d, h = cfg.chunk_size, cfg.dim_head, cfg.heads
        if state is None:
            state = self.initial_state(b)
        rem, conv = state.remainder, state.conv or {}
        r = rem["inputs"].shape[1]
        weights = state.weights
        if not self.completes_chunk(state, n):  # every token reads the weights as they are
            y, remainder, read_conv = self._read_step(x, *self.read_step_inputs(state), store_mask)
            return y, self.state_after_read(state, remainder, read_conv, n)
        queries, gate, chunks, remainder, read_conv, store_conv = self._prepare(
            x, rem, conv.get("read"), conv.get("store"), store_mask
        )
        if self.gate_log is not None:
            self.gate_log.append({name: chunks[name] for name in ("lr", "eta", "keep")})
        n_chunks = chunks["keep"].shape[1]
        chunks_before = (state.position - r) // c
        momentum = state.momentum or {}
        reference = state.reference
        # retrieval groups: token i reads the weights after (r + i + 1) // c of this call's chunks
        first = min(n, c - r - 1)
        middle = queries[:, first : first + (n_chunks - 1) * c].reshape(b * h, n_chunks - 1, c, d)
        start_weights, reads = weights, []
        for start, end in self._blocks(chunks_before, n_chunks):
            absolute = chunks_before + start
            args = (
                *(chunks[k][:, start:end] for k in ("keys", "values", "lr")),
                chunks["eta"][:, :, start:end],
                chunks["keep"][:, start:end],
                middle[:, start : min(end, n_chunks - 1)],
                self._hyper,
            )
            if cfg.refresh_chunks == 1:
                weights, momentum, y = self._sequential(weights, momentum, *args)
            else:
                if cfg.refresh_chunks and absolute % cfg.refresh_chunks == 0:
                    reference = weights
                weights, momentum, y = self._parallel(weights, momentum, reference, *args)
            if y.shape[1]:
                reads.append(y)
        y = self._finish(start_weights, weights, queries, reads, gate, first, b)

        conv = {"read": read_conv, "store": store_conv} if cfg.conv_size else None
        return y.astype(x.dtype), MemoryState(
            weights, remainder, state.position + n, momentum if cfg.momentum else None, reference, conv
        )

    def retrieve(self, x, state: MemoryState, conv_cache=None):
        """Read the memory as it stands in `state` for every token of x, storing nothing (MAC's h = M*(q)).
        Returns (reads, conv cache). With a convolution the queries are convolved as a call's are, over the
        stream of x: `conv_cache` holds that stream's last inputs (None at its start), which may differ from the
        stream the memory stores (MAC reads with the block's input and stores the attention output)."""
        cfg = self.config
        if cfg.conv_size and conv_cache is None:
            conv_cache = mx.zeros((x.shape[0], cfg.conv_size - 1, cfg.inner_dim), dtype=self.to_keys.weight.dtype)
        return self._read(x, state.weights, conv_cache)

    def _read(self, x, weights, conv_cache):
        """Every token of x reads `weights`: (reads (b, n, dim) in x's dtype, the queries' conv cache after x)."""
        b, n, _ = x.shape
        queries, gate, new_conv = self._read_features(x.astype(self.to_keys.weight.dtype), conv_cache)
        return self._output(memory_forward(weights, queries), gate, b, n).astype(x.dtype), new_conv

    def _blocks(self, chunks_before: int, n_chunks: int):
        """Split this call's chunks into blocks that never straddle a mini-batch boundary."""
        refresh = self.config.refresh_chunks
        size = SEQUENTIAL_BLOCK if refresh == 1 else PARALLEL_BLOCK
        start = 0
        while start < n_chunks:
            end = min(n_chunks, start + size)
            if refresh > 1:
                boundary = (chunks_before + start) // refresh * refresh + refresh - chunks_before
                end = min(end, boundary)
            yield start, end
            start = end

    def _output(self, y, gate, b, n):
        """Per-head reads (b * heads, n, d) -> (b, n, dim): post-norm, retrieve gate from its logits (b, n, heads) or
        their rows (the sigmoid after the reshape fuses with the multiply), heads merged and combined."""
        cfg = self.config
        if cfg.post_rmsnorm:
            y = y.reshape(b, cfg.heads, n, cfg.dim_head)
            y = (mx.fast.rms_norm(y, None, cfg.norm_eps) * (1 + self.post_norm_gamma)).reshape(b * cfg.heads, n, -1)
        if gate is not None:
            y = y * mx.sigmoid(_split_heads(gate, b, n, cfg.heads))
        y = _merge_heads(y, b)
        return (self.combine_heads(y) if "combine_heads" in self else y).reshape(b, n, -1)
