"""A slow, obvious NeuralMemory: one memory at a time, one chunk at a time, gradients by mx.grad.

It shares only the module's projections and output merge with the real thing; the update rule, the
gradient reference, pooling and the retrieval index are written out again from the paper / spec.
"""

import mlx.core as mx

from mlx_titans.memory_model import memory_forward, memory_loss


def oracle_forward(mem, x, store_mask=None):
    cfg = mem.config
    b, n, _ = x.shape
    h, d, c, order = cfg.heads, cfg.dim_head, cfg.chunk_size, cfg.momentum_order
    xs = mem.store_norm(x) if cfg.pre_norm else x
    xr = mem.retrieve_norm(x) if cfg.pre_norm else x
    split = lambda t: t.reshape(b, n, h, d)
    q, k, v = split(mem.to_queries(xr)), split(mem.to_keys(xs)), split(mem.to_values(xs))
    lr = mx.sigmoid(mem.to_lr(xs)) * cfg.max_lr
    if store_mask is not None:
        lr = lr * store_mask[..., None]
    refresh = cfg.refresh_chunks
    out = mx.zeros((b, h, n, d), dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            W = {name: (w[hi] if cfg.per_head_init else w) for name, w in mem.initial_weights.items()}
            ref = W
            S = [{name: mx.zeros_like(w) for name, w in W.items()} for _ in range(order)]
            history = [W]
            for j in range(n // c):
                sl = slice(j * c, (j + 1) * c)
                pooled = xs[bi, sl].mean(0)
                grad_at = W if refresh == 1 else ref
                g = mx.grad(memory_loss)(
                    grad_at, k[bi, sl, hi], v[bi, sl, hi], lr[bi, sl, hi], cfg.loss, cfg.huber_delta
                )
                if cfg.max_grad_norm is not None:
                    g = {
                        name: t * min(1.0, cfg.max_grad_norm / max(mx.sqrt((t * t).sum()).item(), 1e-30))
                        for name, t in g.items()
                    }
                u = {name: -t for name, t in g.items()}
                if cfg.momentum:
                    eta = mx.sigmoid(mem.to_momentum(pooled)).reshape(h, order)[hi]
                    for o in range(order):
                        S[o] = {name: eta[o] * S[o][name] + u[name] for name in u}
                        u = S[o]
                if cfg.weight_decay:
                    alpha = cfg.max_decay * mx.sigmoid(mem.to_decay(pooled)).reshape(h, -1)[hi]
                    keep = {name: _channel_gate(name, 1 - alpha, cfg.depth) for name in W}
                else:
                    keep = {name: 1.0 for name in W}
                W = {name: keep[name] * W[name] + u[name] for name in W}
                if refresh and (j + 1) % refresh == 0:
                    ref = W
                history.append(W)
            for t in range(n):
                out[bi, hi, t] = memory_forward(history[(t + 1) // c], q[bi, t : t + 1, hi])[0]
    gate = mem.retrieve_gate(xr) if h > 1 else None
    return mem._output(out.reshape(b * h, n, d), gate, b, n)


def _channel_gate(name, keep, depth):
    if keep.size == 1:
        return keep[0]
    if name == "gamma":
        return keep
    if name == "w0":
        return keep[:, None]
    if name == f"w{depth - 1}":
        return keep[None, :]
    return keep.mean()
