import math

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_titans import memory_model
from mlx_titans.memory_model import (
    erf,
    exp,
    gelu,
    gelu_grad,
    init_memory_weights,
    memory_forward,
    memory_grads,
    memory_grads_autodiff,
)
from mlx_titans.scan import scan_loop, scan_matmul


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("residual_norm", [True, False])
@pytest.mark.parametrize("loss", ["l2", "huber"])
@pytest.mark.parametrize("polynomial_gelu", [True, False], ids=["cpu-gelu", "gpu-gelu"])
def test_manual_grads_match_vmap_grad(depth, residual_norm, loss, polynomial_gelu, monkeypatch):
    monkeypatch.setattr(memory_model, "on_cpu", lambda: polynomial_gelu)  # both of gelu's forms, on this CPU
    mx.random.seed(depth)
    B, m, c, d = 3, 4, 5, 8
    w = init_memory_weights(d, depth, 2.0, residual_norm)
    w = {n: mx.broadcast_to(t, (B, *t.shape)) + 0.1 * mx.random.normal((B, *t.shape)) for n, t in w.items()}
    keys, values = mx.random.normal((B, m, c, d)), 2 * mx.random.normal((B, m, c, d))
    lr = mx.random.uniform(shape=(B, m, c))
    delta = mx.array(0.5)
    ours = memory_grads(w, keys, values, lr, loss, delta)
    oracle = memory_grads_autodiff(w, keys, values, lr, loss, delta)
    assert ours.keys() == oracle.keys()
    for name in ours:
        assert ours[name].shape == (B, m, *w[name].shape[1:])
        assert mx.allclose(ours[name], oracle[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("residual_norm", [True, False])
def test_grads_with_queries_read_the_same_weights(m, residual_norm):
    """Queries riding in the gradient's forward (the sequential rule's read) change no gradient, and read what
    memory_forward reads at the same weights."""
    mx.random.seed(m)
    B, c, q, d = 2, 4, 6, 8
    w = init_memory_weights(d, 2, 2.0, residual_norm)
    w = {n: mx.broadcast_to(t, (B, *t.shape)) + 0.1 * mx.random.normal((B, *t.shape)) for n, t in w.items()}
    keys, values, lr = (
        mx.random.normal((B, m, c, d)),
        mx.random.normal((B, m, c, d)),
        mx.random.uniform(shape=(B, m, c)),
    )
    queries = mx.random.normal((B, q, d))
    grads, read = memory_grads(w, keys, values, lr, queries=queries)
    alone = memory_grads(w, keys, values, lr)
    for name in alone:
        assert mx.allclose(grads[name], alone[name], atol=1e-6), name
    assert mx.allclose(read, memory_forward(w, queries), atol=1e-5)


@pytest.mark.parametrize("polynomial_gelu", [True, False], ids=["cpu-gelu", "gpu-gelu"])
def test_fast_erf_exp_and_gelu_are_float32_accurate(polynomial_gelu, monkeypatch):
    """The rational erf and the range-reduced exp (MLX's run scalar on the CPU) agree with float64 to float32
    precision; GELU, its slope and the slopes' vjps, in the form the CPU runs and the form a GPU runs, agree with
    nn.gelu's autodiff."""
    monkeypatch.setattr(memory_model, "on_cpu", lambda: polynomial_gelu)
    x = mx.linspace(-10, 10, 4001)
    assert max(abs(a - math.erf(v)) for a, v in zip(erf(x).tolist(), x.tolist())) < 1e-6
    neg = mx.linspace(-80, 0, 4001)
    assert max(abs(a / math.exp(v) - 1) for a, v in zip(exp(neg).tolist(), neg.tolist())) < 1e-6
    slope = mx.grad(lambda t: nn.gelu(t).sum())
    assert mx.allclose(gelu(x), nn.gelu(x), atol=1e-6)
    assert mx.allclose(mx.grad(lambda t: gelu(t).sum())(x), slope(x), atol=1e-6)
    assert mx.allclose(gelu_grad(x), slope(x), atol=1e-6)
    assert mx.allclose(mx.grad(lambda t: gelu_grad(t).sum())(x), mx.grad(lambda t: slope(t).sum())(x), atol=1e-5)


def test_scan_matmul_matches_loop_and_splits():
    mx.random.seed(0)
    B, m = 2, 9
    x = mx.random.normal((B, m, 3, 4))
    prev = mx.random.normal((B, 3, 4))
    gates = mx.random.uniform(shape=(B, m))
    gates[:, 4] = 0.0  # a chunk that forgets everything
    loop = scan_loop(gates[..., None, None], x, prev)
    fast = scan_matmul(gates, x, prev)
    assert mx.allclose(fast, loop, atol=1e-5)
    # scan(all)[-1] == scan(second part, prev=scan(first part)[-1])[-1]
    first = scan_matmul(gates[:, :5], x[:, :5], prev)
    second = scan_matmul(gates[:, 5:], x[:, 5:], first[:, -1])
    assert mx.allclose(second[:, -1], fast[:, -1], atol=1e-5)
    assert mx.all(mx.isfinite(mx.grad(lambda g: scan_matmul(g, x, prev).sum())(gates)))
