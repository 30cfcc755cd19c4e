"""The memory network: a small MLP whose weights *are* the long-term memory.

Every weight tensor carries leading batch axes (batch x heads, and optionally chunks), so one call evaluates
many independent memories. `memory_grads` is the hand-written gradient of the inner loss used on the hot path;
`memory_grads_autodiff` (vmap of grad) is its test oracle.

Weights are a dict: `w0 .. w{depth-1}` (x @ w, GELU between layers, no biases) and, with the residual-norm
wrapper of the paper/TTT, `gamma`: M(x) = LayerNorm(MLP(x)) * (1 + gamma) + x.
"""

import math

import mlx.core as mx
import mlx.nn as nn

LN_EPS = 1e-5


def init_memory_weights(dim: int, depth: int, expansion: float, residual_norm: bool) -> dict:
    """Xavier-uniform MLP weights dim -> hidden -> ... -> dim, and a zero gamma for the norm wrapper."""
    if depth < 1:
        raise ValueError(f"memory depth must be >= 1, got {depth}")
    hidden = int(dim * expansion)
    dims = [dim] + [hidden] * (depth - 1) + [dim]
    weights = {"gamma": mx.zeros((dim,))} if residual_norm else {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        bound = math.sqrt(6.0 / (d_in + d_out))
        weights[f"w{i}"] = mx.random.uniform(-bound, bound, (d_in, d_out))
    return weights


def _matrices(weights: dict) -> list:
    return [weights[f"w{i}"] for i in range(sum(name.startswith("w") for name in weights))]


def _layer_norm(h):
    mu = h.mean(-1, keepdims=True)
    centred = h - mu
    rstd = mx.rsqrt((centred * centred).mean(-1, keepdims=True) + LN_EPS)
    return centred * rstd, rstd


# erf(x) = x * p(x^2) / q(x^2) on [-4, 4], where float32's erf already reaches +-1 (Eigen's float erf)
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # fmt: skip
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)  # fmt: skip


def erf(x):
    """erf in multiplies and one division: MLX's CPU erf runs scalar, about ten times slower, and GELU and its
    gradient were most of the memory's time on the CPU. Max error 4.5e-7 against float64 (mx.erf's: 5.2e-7)."""
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p, q = ERF_P[0], ERF_Q[0]
    for a in ERF_P[1:]:
        p = p * x2 + a
    for b in ERF_Q[1:]:
        q = q * x2 + b
    return x * p / q


def exp(x):
    """e^x as 2^k * e^r, |r| <= ln 2 / 2, by a degree-7 polynomial (max relative error 1e-7, mx.exp's 8e-7): mx.exp
    too runs scalar on the CPU, six times slower. Below -87 (float32's smallest normal) it returns e^-87, not 0."""
    x = mx.maximum(x, -87.0)
    k = mx.stop_gradient(mx.floor(x * (1 / math.log(2)) + 0.5))  # piecewise constant: the slope is p's
    r = x - k * 0.693145751953125 - k * 1.428606765330187e-06  # ln 2 in two parts: r exact for |k| < 2^11
    p = 1 / math.factorial(7)
    for n in range(6, -1, -1):
        p = p * r + 1 / math.factorial(n)
    return p * mx.stop_gradient(mx.left_shift(k.astype(mx.int32) + 127, 23).view(mx.float32).astype(x.dtype))


def normal_pdf(a, exp=exp):
    return exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))


def gelu_slope(a, erf=erf, exp=exp):
    """d gelu / da, through the given erf and exp."""
    return 0.5 * (1.0 + erf(a * (1 / math.sqrt(2)))) + a * normal_pdf(a, exp)


# GELU and its slope have their exact derivatives as vjps: autodiff through the polynomials (a trained memory's
# backward) would keep each of their steps, and the slopes would be the polynomials' own.
@mx.custom_function
def gelu_polynomial(x):
    """nn.gelu (exact, erf-based) with the fast erf."""
    return 0.5 * x * (1.0 + erf(x * (1 / math.sqrt(2))))


@mx.custom_function
def gelu_grad_polynomial(a):
    return gelu_slope(a)


@gelu_polynomial.vjp
def gelu_polynomial_vjp(x, cotangent, output):
    return cotangent * gelu_grad_polynomial(x)


@gelu_grad_polynomial.vjp
def gelu_grad_polynomial_vjp(a, cotangent, output):
    return cotangent * (2 - a * a) * normal_pdf(a)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def gelu(x):
    """nn.gelu. On the CPU through the polynomials, whose reason is the CPU's scalar erf and exp; on a GPU MLX's own
    (vectorised there; the form the H100 measurements in docs/memory.md ran)."""
    return gelu_polynomial(x) if on_cpu() else nn.gelu(x)


def gelu_grad(a):
    """GELU's slope, as `gelu` chooses its form."""
    return gelu_grad_polynomial(a) if on_cpu() else gelu_slope(a, mx.erf, mx.exp)


def memory_forward(weights: dict, x):
    """M_W(x) for x of shape (*batch, tokens, dim) and weights of shape (*batch, ...)."""
    h = x
    for i, w in enumerate(_matrices(weights)):
        if i:
            h = gelu(h)
        h = h @ w
    if "gamma" in weights:
        h = mx.fast.layer_norm(h, None, None, LN_EPS) * (1 + weights["gamma"][..., None, :]) + x
    return h


def loss_grad(err, lr, loss: str, huber_delta):
    """d(sum_i lr_i * mean_d loss(err_i)) / d err."""
    d = err.shape[-1]
    if loss == "huber":
        return mx.clip(err, -huber_delta, huber_delta) * (lr[..., None] / d)
    return err * (lr[..., None] * (2.0 / d))


def memory_grads(weights: dict, keys, values, lr, loss: str = "l2", huber_delta=None, queries=None):
    """Per-chunk gradients of L_j(W) = sum_{i in chunk j} lr_i * mean_d loss(M_W(k_i) - v_i), all taken at W.

    weights: (B, ...) shared by the m chunks; keys, values: (B, m, c, d); lr: (B, m, c).
    Returns a dict of (B, m, ...) gradients. Written by hand: one matmul per layer for the whole block, and
    the per-chunk weight gradients as batched (in x c) @ (c x out) products.
    With queries (B, q, d), returns (gradients, M_W(queries)): the queries' rows ride in the keys' forward matmuls,
    which on a GPU costs nothing where reading separately costs a launch per layer (the sequential rule reads the
    weights a chunk left at the next chunk's gradient).
    """
    B, m, c, d = keys.shape
    n = m * c
    x = keys.reshape(B, n, d)
    rows = x if queries is None else mx.concatenate([x, queries], axis=1)
    keys_only = (lambda t: t) if queries is None else (lambda t: t[:, :n])
    mats = _matrices(weights)
    inputs, pre_acts = [], []
    h = rows
    for i, w in enumerate(mats):
        if i:
            pre_acts.append(h)
            h = gelu(h)
        inputs.append(h)
        h = h @ w
    grads = {}
    if "gamma" in weights:
        normed, rstd = _layer_norm(h)
        scale = 1 + weights["gamma"][:, None, :]
        read = normed[:, n:] * scale + queries if queries is not None else None
        normed, rstd = keys_only(normed), keys_only(rstd)
        err = normed * scale + x - values.reshape(B, n, d)
        dy = loss_grad(err, lr.reshape(B, n), loss, huber_delta)
        grads["gamma"] = (dy * normed).reshape(B, m, c, d).sum(2)
        dn = dy * scale
        g = rstd * (dn - dn.mean(-1, keepdims=True) - normed * (dn * normed).mean(-1, keepdims=True))
    else:
        read = h[:, n:] if queries is not None else None
        err = keys_only(h) - values.reshape(B, n, d)
        g = loss_grad(err, lr.reshape(B, n), loss, huber_delta)
    for i in reversed(range(len(mats))):
        inp = keys_only(inputs[i])
        if m == 1:  # no reshape: keys_only's rows are not contiguous and reshaping them would copy
            grads[f"w{i}"] = (inp.swapaxes(-1, -2) @ g)[:, None]
        else:
            grads[f"w{i}"] = inp.reshape(B, m, c, -1).swapaxes(-1, -2) @ g.reshape(B, m, c, -1)
        if i:
            g = (g @ mats[i].swapaxes(-1, -2)) * gelu_grad(keys_only(pre_acts[i - 1]))
    grads = {name: grads[name] for name in weights}
    return grads if queries is None else (grads, read)


def memory_loss(weights: dict, keys, values, lr, loss: str = "l2", huber_delta=None):
    """The inner loss of one chunk, for one memory: keys, values (c, d), lr (c,)."""
    err = memory_forward(weights, keys) - values
    if loss == "huber":
        a = mx.abs(err)
        per = mx.where(a <= huber_delta, 0.5 * err * err, huber_delta * (a - 0.5 * huber_delta))
    else:
        per = err * err
    return (per.mean(-1) * lr).sum()


def memory_grads_autodiff(weights: dict, keys, values, lr, loss: str = "l2", huber_delta=None) -> dict:
    """Oracle for `memory_grads`: vmap(grad) over batch and chunks."""
    B, m = keys.shape[:2]
    tiled = {n: mx.repeat(w[:, None], m, axis=1).reshape(B * m, *w.shape[1:]) for n, w in weights.items()}
    flat = lambda t: t.reshape(B * m, *t.shape[2:])
    fn = mx.vmap(mx.grad(lambda w, k, v, r: memory_loss(w, k, v, r, loss, huber_delta)))
    g = fn(tiled, flat(keys), flat(values), flat(lr))
    return {n: t.reshape(B, m, *t.shape[1:]) for n, t in g.items()}
