"""The chunk update maths of NeuralMemory: store chunks of keys/values into the memory weights (gradient step,
momentum, forgetting) and read the weights after each chunk. Plain functions of arrays, compiled by NeuralMemory.

Shapes follow neural_memory.py's axis legend: B = batch * heads, m chunks, c chunk_size, d dim_head,
o momentum_order.
"""

import mlx.core as mx

from .memory_model import memory_forward, memory_grads
from .scan import momentum_decay_matrix, scan

# chunks solved at once when they share a gradient reference: it bounds the weights kept. On an H100 (dim 512, 4
# heads, chunk 64) 32 ran forward as fast as 64, forward+backward 5% slower, and peaked 14% lower there; 16 ran
# forward 27% slower (docs/memory.md)
PARALLEL_BLOCK = 32
SEQUENTIAL_BLOCK = 8  # chunks unrolled into one compiled step when each chunk moves the reference


def clamp_norm(g, max_norm):
    """g * M / max(|g|, M) per (batch, chunk): shrinks large gradients, leaves small ones, never divides by 0."""
    squared = (g * g).sum(axis=tuple(range(2, g.ndim)), keepdims=True)
    return g * (max_norm * mx.rsqrt(mx.maximum(squared, max_norm * max_norm)))  # no sqrt(0): its grad is inf


def decay_gate(name, keep, shape, depth):
    """Broadcast the forget gate (B, m) or channel-wise (B, m, d) to a weight tensor of per-chunk shape."""
    if keep.ndim == 2:
        return keep.reshape(*keep.shape, *([1] * len(shape)))
    if name == "gamma":
        return keep
    if name == "w0":
        return keep[..., :, None]
    if name == f"w{depth - 1}":
        return keep[..., None, :]
    return keep.mean(-1)[..., None, None]


def store_chunks(cfg, weights, momentum, reference, keys, values, lr, eta, keep, hp):
    """Store m chunks whose gradients are all taken at `reference`.

    weights, reference: {name: (B, ...)}; momentum: {name: (o, B, ...)}; keys, values: (B, m, c, d);
    lr: (B, m, c); eta: (o, B, m); keep = 1 - alpha: (B, m) or (B, m, d).
    Returns (weights, momentum, the weights after each chunk {name: (B, m, ...)}).
    """
    grads = memory_grads(reference, keys, values, lr, cfg.loss, hp["huber_delta"])
    return apply_grads(cfg, weights, momentum, grads, eta, keep, hp)


def apply_grads(cfg, weights, momentum, grads, eta, keep, hp):
    """store_chunks given the chunks' gradients {name: (B, m, ...)}: clipping, momentum and forgetting."""
    if cfg.max_grad_norm is not None:
        grads = {name: clamp_norm(g, hp["max_grad_norm"]) for name, g in grads.items()}
    if not cfg.momentum:
        eta = eta[:0]
    if not cfg.weight_decay:
        keep = mx.ones_like(keep)
    if not cfg.channelwise_decay:
        return fused_update(weights, momentum, grads, eta, keep)
    new_momentum, after_each = {}, {}
    for name, g in grads.items():
        update = -g
        if cfg.momentum:
            carried = []
            for order in range(cfg.momentum_order):
                update = scan(eta[order, ...], update, momentum[name][order, ...])
                carried.append(update[:, -1])
            new_momentum[name] = mx.stack(carried)
        after_each[name] = scan(decay_gate(name, keep, g.shape[2:], cfg.depth), update, weights[name])
    return {name: w[:, -1] for name, w in after_each.items()}, new_momentum, after_each


def fused_update(weights, momentum, grads, eta, keep):
    """Momentum and forgetting for scalar gates: one matmul per weight tensor (see momentum_decay_matrix), the
    gradients' minus sign in the matrix (negating them would hold another copy of every chunk's weights)."""
    o, (B, m) = eta.shape[0], keep.shape
    if m == 1:  # one chunk (the paper's sequential rule): plain elementwise updates beat a tiny matmul
        return single_chunk_update(weights, momentum, grads, eta, keep)
    sign = mx.concatenate([mx.full((m,), -1.0, keep.dtype), mx.ones((o + 1,), keep.dtype)])
    transition = momentum_decay_matrix(eta, keep) * sign
    new_momentum, after_each = {}, {}
    for name, g in grads.items():
        shape = g.shape[2:]
        inputs = [g.reshape(B, m, -1)]
        if o:
            inputs.append(momentum[name].reshape(o, B, -1).transpose(1, 0, 2))
        inputs.append(weights[name].reshape(B, 1, -1))
        out = transition @ mx.concatenate(inputs, axis=1)
        after_each[name] = out[:, :m].reshape(B, m, *shape)
        if o:
            new_momentum[name] = out[:, m:].transpose(1, 0, 2).reshape(o, B, *shape)
    return {name: w[:, -1] for name, w in after_each.items()}, new_momentum, after_each


def single_chunk_update(weights, momentum, grads, eta, keep):
    new_weights, new_momentum = {}, {}
    for name, g in grads.items():
        expand = lambda gate: gate.reshape(-1, *([1] * (g.ndim - 2)))
        update, carried = -g[:, 0], []
        for order in range(eta.shape[0]):
            update = expand(eta[order, :, 0]) * momentum[name][order, ...] + update  # [order] alone gathers (copies)
            carried.append(update)
        if carried:
            new_momentum[name] = mx.stack(carried)
        new_weights[name] = expand(keep[:, 0]) * weights[name] + update
    return new_weights, new_momentum, {name: w[:, None] for name, w in new_weights.items()}


def parallel_step(cfg, weights, momentum, reference, keys, values, lr, eta, keep, queries, hp):
    """Store a block of chunks at a shared reference; query group i (B, g, c, d) reads the weights after chunk i."""
    weights, momentum, after_each = store_chunks(cfg, weights, momentum, reference, keys, values, lr, eta, keep, hp)
    g = queries.shape[1]
    if g == 0:  # empty arrays crash some backends: pass the empty query block through
        return weights, momentum, queries
    return weights, momentum, memory_forward({n: w[:, :g] for n, w in after_each.items()}, queries)


def sequential_step(cfg, weights, momentum, keys, values, lr, eta, keep, queries, hp):
    """Chunk after chunk, each gradient at the weights left by the chunk before (the paper's default). Query group
    t reads the weights chunk t left, which chunk t + 1's gradient takes: its rows ride in that forward."""
    out, m, g = [], keys.shape[1], queries.shape[1]
    for t in range(m):
        sl = slice(t, t + 1)
        reading = 0 < t <= g  # query group t - 1 reads the weights this chunk's gradient is taken at
        query_rows = queries[:, t - 1] if reading else None
        grads = memory_grads(weights, keys[:, sl], values[:, sl], lr[:, sl], cfg.loss, hp["huber_delta"], query_rows)
        if reading:
            grads, read = grads
            out.append(read)
        weights, momentum, _ = apply_grads(cfg, weights, momentum, grads, eta[:, :, sl], keep[:, sl], hp)
    if g == m:
        out.append(memory_forward(weights, queries[:, m - 1]))
    return weights, momentum, mx.stack(out, axis=1) if out else queries
