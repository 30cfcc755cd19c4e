import itertools
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_titans import MemoryConfig, MemoryState, NeuralMemory, load_state, save_state
from mlx_titans.neural_memory import _merge_heads, _split_heads
from oracle import oracle_forward

DIM = 16


def make(**kw):
    mx.random.seed(0)
    kw.setdefault("chunk_size", 4)
    kw.setdefault("max_lr", 0.5)
    return NeuralMemory(MemoryConfig(dim=DIM, **kw))


def run_split(mem, x, cuts, mask=None):
    outs, state, start = [], None, 0
    for end in list(cuts) + [x.shape[1]]:
        m = None if mask is None else mask[:, start:end]
        y, state = mem(x[:, start:end], state, store_mask=m)
        outs.append(y)
        start = end
    return mx.concatenate(outs, axis=1), state


def assert_states_close(a, b, atol=1e-5):
    """Two MemoryStates (or dict trees) hold equal fields."""
    fa, fb = (dict(tree_flatten(s.to_tree() if isinstance(s, MemoryState) else s)) for s in (a, b))
    assert fa.keys() == fb.keys()
    for key in fa:
        if isinstance(fa[key], mx.array):
            assert fa[key].shape == fb[key].shape, key
            assert mx.allclose(fa[key], fb[key], atol=atol, rtol=1e-4), key
        else:
            assert fa[key] == fb[key], key


OPTIONS = [
    {},
    {"heads": 2},
    {"batch_size": 0},
    {"batch_size": 8, "heads": 2},
    {"momentum_order": 2, "channelwise_decay": True},
    {"momentum": False, "weight_decay": False, "depth": 1},
    {"conv_size": 4, "qkv_silu": True, "qk_l2norm": True},
    {"qk_rmsnorm": True, "post_rmsnorm": True, "loss": "huber", "max_grad_norm": 0.5},
    {"per_head_init": False, "heads": 2, "chunk_size": 1},
]
SPLITS = [
    [4, 8, 12],  # chunk-aligned
    [3, 5, 6, 13],  # unaligned, pieces shorter than a chunk
    list(range(1, 23)),  # one token at a time
    [9],  # a prompt, then the rest
    [2, 3],
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_stream_splits_equal_one_call(options):
    mem = make(**options)
    x = mx.random.normal((2, 23, DIM))
    mask = mx.random.uniform(shape=(2, 23)) > 0.3
    whole, whole_state = mem(x, store_mask=mask)
    for cuts in SPLITS:
        y, state = run_split(mem, x, cuts, mask)
        assert mx.allclose(y, whole, atol=1e-5, rtol=1e-4), cuts
        assert_states_close(state, whole_state)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"heads": 2, "batch_size": 8},
        {"batch_size": 0, "momentum_order": 2},
        {"channelwise_decay": True},
        {"max_grad_norm": 0.05, "loss": "huber", "huber_delta": 0.3},
        {"depth": 3, "residual_norm": False},
        {"max_decay": 0.3, "heads": 2},
    ],
    ids=str,
)
def test_matches_slow_loop_oracle(options):
    mem = make(**options)
    x = mx.random.normal((2, 19, DIM))
    mask = mx.random.uniform(shape=(2, 19)) > 0.2
    y, _ = mem(x, store_mask=mask)
    assert mx.allclose(y, oracle_forward(mem, x, mask), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("channelwise", [False, True])
def test_max_decay_scales_the_forget_gate(channelwise):
    """max_decay 0 forgets nothing (the same memory as weight_decay=False), and max_decay scales alpha: a memory at
    max_decay 1 whose gate bias is that of sigmoid(a) forgets as one at max_decay s whose bias gives sigmoid(a) / s."""
    x = mx.random.normal((2, 21, DIM))
    base = make(heads=2, channelwise_decay=channelwise)
    no_decay = make(heads=2, weight_decay=False)
    no_decay.update(tree_unflatten([(k, v) for k, v in tree_flatten(base.parameters()) if "to_decay" not in k]))
    capped = make(heads=2, channelwise_decay=channelwise, max_decay=0.0)
    capped.update(base.parameters())
    assert mx.allclose(capped(x)[0], no_decay(x)[0], atol=1e-6)
    assert not mx.allclose(base(x)[0], no_decay(x)[0], atol=1e-4)

    def constant_gate(mem, alpha):  # a gate blind to its input: alpha everywhere
        mem.to_decay.weight = mx.zeros_like(mem.to_decay.weight)
        mem.to_decay.bias = mx.full(mem.to_decay.bias.shape, math.log(alpha / (1 - alpha)))

    half = make(heads=2, channelwise_decay=channelwise, max_decay=0.5)
    half.update(base.parameters())
    constant_gate(base, 0.1)
    constant_gate(half, 0.2)
    assert mx.allclose(half(x)[0], base(x)[0], atol=1e-5)


def test_a_store_mask_arriving_mid_stream():
    """Calls without a mask store every token: a stream that gets its first mask mid-chunk equals one call whose mask
    is all True until then."""
    mem = make(heads=2)
    x = mx.random.normal((2, 19, DIM))
    mask = mx.random.uniform(shape=(2, 19)) > 0.3
    mask[:, :6] = True
    whole, whole_state = mem(x, store_mask=mask)
    y1, state = mem(x[:, :6])
    assert "store" not in state.remainder
    y2, state = mem(x[:, 6:7], state, store_mask=mask[:, 6:7])
    y3, state = mem(x[:, 7:], state, store_mask=mask[:, 7:])
    assert mx.allclose(mx.concatenate([y1, y2, y3], axis=1), whole, atol=1e-5)
    assert_states_close(state, whole_state)
    unmasked, _ = mem(x)
    assert not mx.allclose(unmasked[:, 8:], whole[:, 8:], atol=1e-4)


def test_gate_log_records_the_gates_a_call_computes():
    """keep = 1 - max_decay * sigmoid(mean of to_decay over the chunk), per head and chunk; only calls that store
    record, and nothing is recorded (nor kept among the parameters) without a log."""
    b, n, h, c = 2, 12, 2, 4
    mem = make(heads=h, max_decay=0.5)
    x = mx.random.normal((b, n, DIM))
    y, _ = mem(x)
    assert mem.gate_log is None
    mem.gate_log = []
    logged_y, state = mem(x)
    mem(x[:, :3], state)  # completes no chunk: stores nothing
    (gates,) = mem.gate_log
    logits = mem.to_decay(mem.store_norm(x)).reshape(b, n // c, c, h).mean(2)  # (b, chunks, heads)
    keep = 1 - 0.5 * mx.sigmoid(logits).transpose(0, 2, 1).reshape(b * h, n // c)
    assert mx.allclose(gates["keep"], keep, atol=1e-6)
    assert gates["lr"].shape == (b * h, n // c, c) and gates["eta"].shape == (1, b * h, n // c)
    assert mx.array_equal(logged_y, y)
    assert not any(name.startswith("gate_log") for name, _ in tree_flatten(mem.parameters()))


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8])
def test_short_calls_and_retrieval_index(n):
    """n < c reads W0 and stores nothing; the last token of a chunk already reads that chunk's update."""
    mem = make()
    x = mx.random.normal((1, n, DIM))
    y, state = mem(x)
    assert mx.allclose(y, oracle_forward(mem, x), atol=2e-5)
    assert state.position == n
    assert state.remainder["inputs"].shape[1] == n % 4
    if n < 4:
        assert_states_close({"w": state.weights}, {"w": mem.initial_state(1).weights})


@pytest.mark.parametrize("b, n", [(1, 1), (2, 1), (2, 3)])
def test_head_split_and_merge(b, n):
    """The single-token shortcut (a reshape) lays heads out as the general transpose does, and merge inverts it."""
    h, e = 3, 5
    rows = mx.arange(b * n * h * e).reshape(b * n, h * e)
    split = _split_heads(rows, b, n, h)
    assert mx.array_equal(split, rows.reshape(b, n, h, e).transpose(0, 2, 1, 3).reshape(b * h, n, e))
    assert mx.array_equal(_merge_heads(split, b), rows)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("conv_size", [0, 4])
def test_retrieve_equals_the_reads_of_a_call_that_completes_no_chunk(n, conv_size):
    """Given the query part of the call's conv state, retrieve reads what the call reads."""
    mem = make(heads=2, conv_size=conv_size, qkv_silu=True)
    x = mx.random.normal((2, 5 + n, DIM))
    _, state = mem(x[:, :5])
    y, _ = mem(x[:, 5:], state)
    queries_conv = state.conv["read"] if conv_size else None
    read, conv = mem.retrieve(x[:, 5:], state, queries_conv)
    assert mx.allclose(y, read, atol=1e-6)
    assert (conv is None) == (conv_size == 0)


def test_retrieve_streams_its_convolution():
    """Reads of a stream in pieces, each piece continuing the last one's conv cache, equal one read of it all; the
    first piece starts from zeros."""
    mem = make(heads=2, conv_size=4)
    _, state = mem(mx.random.normal((2, 9, DIM)))
    x = mx.random.normal((2, 11, DIM))
    whole, _ = mem.retrieve(x, state)
    pieces, conv = [], None
    for a, b in ((0, 2), (2, 3), (3, 11)):
        y, conv = mem.retrieve(x[:, a:b], state, conv)
        pieces.append(y)
    assert mx.allclose(mx.concatenate(pieces, axis=1), whole, atol=1e-6)
    shifted, _ = mem.retrieve(x[:, 1:], state)
    assert not mx.allclose(shifted[:, :3], whole[:, 1:4], atol=1e-4)  # the conv sees the token before


@pytest.mark.parametrize("p", [0, 5, 6, 7, 13])
def test_causality(p):
    mem = make(heads=2)
    c, n = 4, 20
    x = mx.random.normal((1, n, DIM))
    y, _ = mem(x)
    x2 = mx.array(x)
    x2[:, p] = x2[:, p] + 3.0
    y2, _ = mem(x2)
    changed = np.abs(np.array(y2 - y)).max(-1)[0] > 1e-6
    first_visible = (p // c + 1) * c - 1  # first token that reads the chunk holding p
    expected = np.zeros(n, bool)
    expected[p] = True
    expected[first_visible:] = True
    assert (changed == expected).all(), (changed, expected)


def test_gradients_through_the_compiled_graphs_equal_op_by_op():
    """Training differentiates through the compiled graphs of a call (the module's parameters are their implicit
    inputs): calls completing chunks and a call completing none give the gradients of the uncompiled code."""
    mem = make(heads=2, conv_size=4, qk_rmsnorm=True)
    x = mx.random.normal((2, 11, DIM))

    def loss(params):
        mem.update(params)
        total, state = 0.0, None
        for a, b in ((0, 6), (6, 7), (7, 11)):  # 2 chunks, a remainder of 2; one token; completes a chunk
            y, state = mem(x[:, a:b], state)
            total = total + (y * y).sum()
        return total

    params = mem.trainable_parameters()
    compiled = mx.grad(loss)(params)
    mx.disable_compile()
    try:
        eager = mx.grad(loss)(params)
    finally:
        mx.enable_compile()
    flat = dict(tree_flatten(eager))
    for name, g in tree_flatten(compiled):
        assert mx.allclose(g, flat[name], atol=1e-5, rtol=1e-4), name
    assert any(mx.abs(g).max().item() > 0 for _, g in tree_flatten(compiled) if g.size)


def test_causality_with_conv():
    mem = make(conv_size=4, qkv_silu=True)
    x = mx.random.normal((1, 16, DIM))
    x2 = mx.array(x)
    x2[:, 9] = 5.0
    y, _ = mem(x)
    y2, _ = mem(x2)
    assert mx.array_equal(y[:, :9], y2[:, :9])
    assert not mx.allclose(y[:, 9:], y2[:, 9:])


GRID = list(itertools.product([1, 2], [1, 2], [None, 0], [None, 1.0], ["l2", "huber"]))


@pytest.mark.parametrize("heads,order,batch_size,clamp,loss", GRID)
def test_no_nan_or_inf(heads, order, batch_size, clamp, loss):
    mem = make(
        heads=heads,
        momentum_order=order,
        batch_size=batch_size,
        max_grad_norm=clamp,
        loss=loss,
        max_lr=1.0,
        channelwise_decay=order == 2,
    )
    x = 10 * mx.random.normal((2, 21, DIM))
    mask = mx.ones((2, 21), dtype=mx.bool_)
    mask[:, 4:12] = False  # whole masked chunks: zero gradients must stay 0, not 0/0
    mask[1] = False
    y, state = mem(x, store_mask=mask)
    assert mx.all(mx.isfinite(y))
    assert all(mx.all(mx.isfinite(v)) for _, v in tree_flatten(state.arrays()))
    loss_fn = lambda model: model(x, store_mask=mask)[0].square().mean()
    _, grads = nn.value_and_grad(mem, loss_fn)(mem)
    assert all(mx.all(mx.isfinite(g)) for _, g in tree_flatten(grads))


def test_clamp_never_inflates_small_gradients():
    small = make(max_grad_norm=1e6)
    plain = make()
    x = mx.random.normal((1, 12, DIM))
    assert mx.allclose(small(x)[0], plain(x)[0], atol=1e-6)


def test_second_order_gradients_match_finite_differences():
    """The outer loss differentiates through the inner gradient step (keys enter only through it)."""
    mem = make(heads=2, batch_size=8, max_lr=0.1)
    x = mx.random.normal((1, 17, DIM))
    target = mx.random.normal((1, 17, DIM))
    names = ["to_keys.weight", "to_values.weight", "to_lr.bias", "to_decay.weight", "initial_weights.w0"]
    params = dict(tree_flatten(mem.trainable_parameters()))

    def loss_of(name, value):
        mem.update(tree_unflatten([(name, value)]))
        out = (mem(x)[0] * target).sum()
        mem.update(tree_unflatten([(name, params[name])]))
        return out

    mx.random.seed(1)
    for name in names:
        grad = mx.grad(lambda w: loss_of(name, w))(params[name])
        direction = mx.random.normal(params[name].shape)
        direction = direction / mx.linalg.norm(direction.reshape(-1))

        def central(eps):
            return (
                loss_of(name, params[name] + eps * direction) - loss_of(name, params[name] - eps * direction)
            ).item() / (2 * eps)

        numeric = (4 * central(1e-3) - central(2e-3)) / 3  # Richardson: cancels the eps^2 term
        analytic = (grad * direction).sum().item()
        assert abs(analytic) > 1e-2, name
        assert math.isclose(numeric, analytic, rel_tol=2e-2, abs_tol=2e-3), (name, numeric, analytic)


def test_linear_memory_without_momentum_is_the_delta_rule():
    """Depth 1, no norm wrapper, eta = 0, no decay, chunk 1: W <- W + (2 lr / d) (v - W^T k) k^T."""
    mem = make(depth=1, residual_norm=False, momentum=False, weight_decay=False, chunk_size=1, pre_norm=False)
    b, n = 2, 11
    x = mx.random.normal((b, n, DIM))
    y, _ = mem(x)
    q, k, v = mem.to_queries(x), mem.to_keys(x), mem.to_values(x)
    lr = mx.sigmoid(mem.to_lr(x)) * mem.config.max_lr
    w0 = mem.initial_weights["w0"][0]
    state = mx.broadcast_to(w0.T[None, None], (b, 1, DIM, DIM))
    beta = 2 * lr / DIM
    expect, _ = mx.fast.gated_delta_update(q[:, :, None], k[:, :, None], v[:, :, None], mx.ones_like(beta), beta, state)
    assert mx.allclose(y, expect[:, :, 0], atol=1e-5)


def test_titans_semantics_take_every_gradient_at_the_initial_weights():
    """batch_size=0 (titans-pytorch's default) equals the paper rule evaluated at frozen W0 by the oracle."""
    mem = make(batch_size=0, heads=2)
    x = mx.random.normal((1, 18, DIM))
    paper = make(heads=2)
    assert mx.allclose(mem(x)[0], oracle_forward(mem, x), atol=2e-5)
    assert not mx.allclose(mem(x)[0], paper(x)[0], atol=1e-3)


def test_float64_and_bfloat16_inputs():
    mem = make()
    x = mx.random.normal((1, 9, DIM))
    y32, _ = mem(x)
    y16, _ = mem(x.astype(mx.bfloat16))
    assert y16.dtype == mx.bfloat16
    assert mx.allclose(y16.astype(mx.float32), y32, atol=0.1)
    mem64 = make()
    mem64.update(tree_map(lambda p: p.astype(mx.float64), mem64.parameters()))
    y64, state = mem64(x.astype(mx.float64))
    assert y64.dtype == mx.float64 and state.weights["w0"].dtype == mx.float64
    assert mx.allclose(y64.astype(mx.float32), y32, atol=1e-4)


def test_state_save_load_round_trip(tmp_path):
    mem = make(heads=2, batch_size=8, conv_size=4)
    x = mx.random.normal((2, 21, DIM))
    whole, _ = mem(x)
    y1, state = mem(x[:, :10])
    save_state(tmp_path / "state.safetensors", state, mem.config)
    loaded = load_state(tmp_path / "state.safetensors", mem.config)
    assert_states_close(loaded, state, atol=0)
    y2, _ = mem(x[:, 10:], loaded)
    assert mx.allclose(mx.concatenate([y1, y2], axis=1), whole, atol=1e-5)
    assert not list(tmp_path.glob(".state*"))  # no temporary file left behind


def test_state_from_another_config_is_refused(tmp_path):
    mem = make()
    _, state = mem(mx.random.normal((1, 6, DIM)))
    save_state(tmp_path / "s.safetensors", state, mem.config)
    other = make(chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size: saved 4, this memory 8"):
        load_state(tmp_path / "s.safetensors", other.config)
    wider = NeuralMemory(MemoryConfig(dim=DIM, dim_head=8, heads=2, chunk_size=4))
    with pytest.raises(ValueError, match="does not fit"):
        wider(mx.random.normal((1, 3, DIM)), state)
    arrays, metadata = mx.load(str(tmp_path / "s.safetensors"), return_metadata=True)
    mx.save_safetensors(str(tmp_path / "old.safetensors"), arrays, {**metadata, "format": "mlx-titans-memory-state/1"})
    with pytest.raises(ValueError, match="another mlx-titans version"):
        load_state(tmp_path / "old.safetensors", mem.config)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        load_state(tmp_path / "bad.safetensors", mem.config)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.safetensors", mem.config)


def test_bad_inputs_raise_clear_errors():
    mem = make()
    with pytest.raises(ValueError, match=r"shape \(batch, tokens, 16\)"):
        mem(mx.zeros((1, 4, DIM + 1)))
    with pytest.raises(ValueError, match=r"shape \(batch, tokens, 16\)"):
        mem(mx.zeros((4, DIM)))
    with pytest.raises(TypeError, match="floating-point"):
        mem(mx.zeros((1, 4, DIM), dtype=mx.int32))
    with pytest.raises(TypeError, match="mx.array"):
        mem(np.zeros((1, 4, DIM), np.float32))
    x = mx.random.normal((1, 4, DIM))
    x[0, 2, 3] = mx.nan
    with pytest.raises(ValueError, match="NaN"):
        mem.check_finite(x)
    with pytest.raises(ValueError, match="store_mask"):
        mem(mx.zeros((1, 4, DIM)), store_mask=mx.ones((1, 5), dtype=mx.bool_))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        MemoryConfig(dim=DIM, chunk_size=4, batch_size=6)
    with pytest.raises(ValueError, match="loss"):
        MemoryConfig(dim=DIM, loss="l1")
    with pytest.raises(ValueError, match="max_decay"):
        MemoryConfig(dim=DIM, max_decay=1.5)
