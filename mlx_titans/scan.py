"""Gated linear recurrences along the chunk axis: h_t = a_t * h_{t-1} + x_t, h_0 = prev.

Momentum (a = eta) and forgetting (a = 1 - alpha) are both of this form. With one gate per (batch, chunk) the
whole block is solved at once as a lower-triangular (m x m) matmul built in log space (a stable segment sum);
gates that vary across channels fall back to a short loop.
"""

import mlx.core as mx


def segment_sum(log_a):
    """(..., m) -> (..., m, m) with out[t, i] = sum_{i < l <= t} log_a[l] for i <= t, -inf above the diagonal."""
    m = log_a.shape[-1]
    rows = mx.arange(m)[:, None]
    cols = mx.arange(m)[None, :]
    x = mx.where(rows > cols, log_a[..., :, None], 0.0)
    x = mx.cumsum(x, axis=-2)
    return mx.where(rows >= cols, x, -mx.inf)


def scan_matmul(gates, x, prev):
    """gates (B, m), x (B, m, *shape), prev (B, *shape) -> every h_t, (B, m, *shape)."""
    B, m = gates.shape
    if m == 1:
        return gates.reshape(B, 1, *([1] * (x.ndim - 2))) * prev[:, None] + x
    log_a = mx.log(mx.maximum(gates, 1e-30))
    mix = mx.exp(segment_sum(log_a)).astype(x.dtype)
    carry = mx.exp(mx.cumsum(log_a, axis=-1)).astype(x.dtype)
    flat = mix @ x.reshape(B, m, -1) + carry[..., None] * prev.reshape(B, 1, -1)
    return flat.reshape(x.shape)


def scan_loop(gates, x, prev):
    """Same recurrence; gates (B, m, ...) broadcast against x[:, t]. The slow, obvious form."""
    h, out = prev, []
    for t in range(x.shape[1]):
        h = gates[:, t] * h + x[:, t]
        out.append(h)
    return mx.stack(out, axis=1)


def scan(gates, x, prev):
    if gates.ndim == 2:
        return scan_matmul(gates, x, prev)
    return scan_loop(gates, x, prev)


def _lower(gates):
    """(B, m) gates -> the (B, m, m) matrix of the recurrence without its carry, and the carry's weights (B, m)."""
    log_a = mx.log(mx.maximum(gates, 1e-30))
    return mx.exp(segment_sum(log_a)), mx.exp(mx.cumsum(log_a, axis=-1))


def momentum_decay_matrix(eta, keep):
    """One matrix for momentum of any order followed by forgetting, with scalar gates per (batch, chunk).

    eta: (o, B, m) momentum gates (o may be 0); keep: (B, m) = 1 - alpha. Columns index the inputs
    [u_1..u_m, S0^(1)..S0^(o), W0]; rows give W_1..W_m then the carried momenta S^(1)_m..S^(o)_m. So a
    whole block's momentum and decay scans become one (m+o) x (m+o+1) matmul per weight tensor.
    """
    o, (B, m) = eta.shape[0], keep.shape
    n_in = m + o + 1
    basis = mx.eye(m + o + 1, dtype=keep.dtype)
    x = mx.broadcast_to(basis[:m], (B, m, n_in))
    carried = []
    for j in range(o):
        lower, carry = _lower(eta[j])
        x = lower @ x + carry[..., None] * basis[m + j]
        carried.append(x[:, -1:])
    lower, carry = _lower(keep)
    w = lower @ x + carry[..., None] * basis[m + o]
    return mx.concatenate([w] + carried, axis=1)
