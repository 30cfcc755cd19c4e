"""TitansQwen (mlx_titans/qwen/: cache, model, loading, cache files) on tiny random checkpoints of every Qwen type it
supports (the windowed attention against a slow reference on Qwen2 / Qwen3, the other types against one call and
stock mlx-lm)."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache
from mlx_lm.models.rope_utils import YarnRoPE
from mlx_lm.utils import load_model

from mlx_titans import load_prompt_cache, prefill
from mlx_titans.prompt_cache import load_cache_file, save_cache_file
from mlx_titans.qwen import TitansCache, get_model_classes, load
from mlx_titans.qwen.config import QWEN_TYPES
from mlx_titans.qwen.random_model import make_tiny_qwen
from test_qwen_convert import corrupt_checkpoint

# small titans settings: chunk 8, so a few dozen tokens fill several memory chunks
SMALL = {
    "memory_layers": [0, 1],
    "window": 16,
    "sink_tokens": 4,
    "segment_size": 16,
    "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
}


def titans_model(path, gate=0.0, **section):
    """TitansQwen through mlx-lm's load_model hook; gate > 0 opens every memory gate to random values of that size."""
    mx.random.seed(0)  # the same memory initialisation in every model built here
    model, _ = load_model(
        Path(path), model_config={"titans": {**SMALL, **section}}, get_model_classes=get_model_classes
    )
    for i, layer in enumerate(model.layers):
        if "memory" in layer and gate:
            layer.memory_gate = gate * mx.random.normal(layer.memory_gate.shape, key=mx.random.key(i))
    return model


def prompt(n, seed=0):
    return mx.random.randint(3, 1000, (1, n), key=mx.random.key(seed))


def feed(model, tokens, lengths, cache=None):
    """Logits of `tokens` fed in calls of the given lengths."""
    cache = model.make_cache() if cache is None else cache
    bounds = np.cumsum([0, *lengths])
    return mx.concatenate([model(tokens[:, a:b], cache) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)


def assert_close(a, b, tol=2e-5):
    a, b = np.array(a), np.array(b)
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), np.abs(a - b).max()


def reference_logits(model, tokens):
    """Windowed attention written out over the whole sequence, slow: query t of segment g (R tokens each) sees the
    sinks k < s and the keys g R - W <= k <= t; the sinks sit at RoPE positions 0..s-1 and any other token k at
    k - max(0, g R - W - s)."""
    s, W, n, R = model.titans.sink_tokens, model.titans.window, tokens.shape[1], model.titans.segment_size
    bounds = np.array([*range(0, n, R), n])
    t = mx.arange(n)

    def rope_at(rope, x, positions):  # x (L, heads, D), each row rotated at its own position
        return rope(x[:, :, None], offset=positions)[:, :, 0]

    x = model.model.embed_tokens(tokens)
    for layer in model.layers:
        attn = layer.self_attn
        xn = layer.input_layernorm(x)[0]
        q = attn.q_proj(xn).reshape(n, attn.n_heads, -1)
        k = attn.k_proj(xn).reshape(n, attn.n_kv_heads, -1)
        v = attn.v_proj(xn).reshape(n, attn.n_kv_heads, -1)
        if "q_norm" in attn:
            q, k = attn.q_norm(q), attn.k_norm(k)
        k, v = (mx.repeat(z, attn.n_heads // attn.n_kv_heads, axis=1) for z in (k, v))
        out = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            pos = mx.where(t < s, t, t - max(0, a - W - s))[:b]
            scores = mx.einsum("qhd,khd->hqk", rope_at(attn.rope, q[a:b], pos[a:b]), rope_at(attn.rope, k[:b], pos))
            tq, tk = t[a:b, None], t[None, :b]
            visible = (tk <= tq) & ((tk < s) | (tk >= a - W))
            weights = mx.softmax(mx.where(visible, scores * attn.scale, -mx.inf), axis=-1)
            out.append(mx.einsum("hqk,khd->qhd", weights, v[:b]))
        h = x + attn.o_proj(mx.concatenate(out).reshape(1, n, -1))
        if "memory" in layer:
            read, _ = layer.memory(layer.post_attention_layernorm(h))  # the memory streams: one call = any split
            h = h + layer.memory_gate * read
        x = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.head(model.model.norm(x))


# ---------------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize(
    "rope", [nn.RoPE(8, base=100.0), YarnRoPE(8, base=100.0, scaling_factor=4.0)], ids=["composes", "scales-its-input"]
)
def test_cache_keys_sit_at_their_positions(rope):
    """Every call attends the sinks at positions 0..s-1 and the window's keys at t - shift, rotated from the keys
    before RoPE, whether the window was rotated down from its last positions (plain RoPE) or from kept unrotated keys
    (YaRN scales its input: its rotations do not compose)."""
    s, W, R, n = 2, 6, 4, 23
    keys = mx.random.normal((1, 2, n, 8))
    cache, t = TitansCache(s, W, R), 0
    while t < n:
        end = min(n, t + 3, (t // R + 1) * R)  # calls never cross a segment boundary (the model cuts them)
        shift = max(0, t // R * R - W - s)
        got, values = cache.update_and_fetch(keys[:, :, t:end], 2 * keys[:, :, t:end], rope)
        kept = [*range(min(s, end)), *range(max(s, t // R * R - W), end)]
        expected = mx.concatenate([rope(keys[:, :, i : i + 1], offset=i if i < s else i - shift) for i in kept], axis=2)
        assert mx.allclose(got, expected, atol=1e-5), t
        assert mx.array_equal(values, 2 * keys[:, :, kept])
        t = end
    assert (cache.unrotated is None) == isinstance(rope, nn.RoPE)


def test_load_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no model directory"):
        load(tmp_path / "nope")
    with pytest.raises(ValueError, match="'llama' model; TitansQwen supports model_type qwen2, qwen3, qwen2_moe"):
        load(make_tiny_qwen(tmp_path / "llama", model_type="llama"))
    with pytest.raises(ValueError, match="cannot read the weights"):
        load(corrupt_checkpoint(tmp_path))


# ---------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("arch", [*QWEN_TYPES, "mlx-4bit"])
def test_gate_closed_equals_stock_qwen_within_window(hf, arch):
    model, _, config = load(hf[arch])  # a plain HF / mlx-lm directory: default titans section, untrained memory
    assert config["titans"]["memory_layers"] == [0, 1]
    stock, _ = mlx_lm.load(str(hf[arch]))
    tokens = prompt(40)
    assert mx.array_equal(model(tokens), stock(tokens))
    cache, stock_cache = model.make_cache(), make_prompt_cache(stock)
    prefill(model, tokens[:, :-1], cache, 13)
    for start in range(0, 39, 13):  # the same calls: BLAS results may depend on the matrix shapes
        stock(tokens[:, start : start + 13], cache=stock_cache)
    assert mx.array_equal(model(tokens[:, -1:], cache), stock(tokens[:, -1:], cache=stock_cache))


@pytest.mark.parametrize("arch,gate", [("qwen2", 0.0), ("qwen2", 0.05), ("qwen3", 0.05)])
def test_beyond_window_equals_reference(hf, arch, gate):
    model = titans_model(hf[arch], gate)
    tokens = prompt(72)  # window 16 + 4 sinks: evicting from token 21 on
    reference = reference_logits(model, tokens)
    for lengths in ([20, 13, 7, 1, 1, 16, 14], [72], [5] * 14 + [2], [1] * 72):  # any split: the same outputs
        ours = feed(model, tokens, lengths)
        assert_close(ours, reference)
    unbounded = feed(titans_model(hf[arch], gate, window=100), tokens, [72])
    assert np.abs(np.array(ours - unbounded)).max() > 100 * 2e-5  # the window changes the outputs


@pytest.mark.parametrize("arch", QWEN_TYPES)
def test_any_split_equals_one_call(hf, arch):
    """Every type, the memory read (gate open), beyond the window: any split of the input into calls, one token at a
    time included, gives the outputs of one call; and the window changes them."""
    model = titans_model(hf[arch], 0.05)
    tokens = prompt(72)  # window 16 + 4 sinks: evicting from token 21 on
    one_call = feed(model, tokens, [72])
    for lengths in ([20, 13, 7, 1, 1, 16, 14], [5] * 14 + [2], [1] * 72):
        assert_close(feed(model, tokens, lengths), one_call)
    unbounded = feed(titans_model(hf[arch], 0.05, window=100), tokens, [72])
    assert np.abs(np.array(one_call - unbounded)).max() > 100 * 2e-5


def test_segmented_prefill_equals_whole_and_drives_stream_generate(hf):
    model = titans_model(hf["qwen2"], 0.05)  # window 16: most of the prompt has left the window
    tokens, after = prompt(56), prompt(3, seed=1)

    def run(segment_size):
        cache = model.make_cache()
        last = prefill(model, tokens, cache, segment_size)
        return last, model(after, cache), cache

    whole_last, whole_after, whole_cache = run(56)
    for segment_size in (None, 8, 24, 5, 13):
        last, next_logits, cache = run(segment_size)
        assert_close(last, whole_last)
        assert_close(next_logits, whole_after)
        for c, w in zip(cache, whole_cache):
            assert c.offset == w.offset == 59
            got = dict(tree_flatten(c.memory.to_tree()))
            for name, value in tree_flatten(w.memory.to_tree()):  # fast weights, momentum, unstored remainder, position
                assert_close(got[name], value)

    closed = titans_model(hf["qwen2"])
    assert np.abs(np.array(prefill(closed, tokens, closed.make_cache()) - whole_last)).max() > 1e-3  # memory is read

    # stock mlx-lm sampling over our cache (greedy, prefill in steps of 5) = our own greedy loop
    _, tokenizer, _ = load(hf["qwen2"])
    generated = [
        r.token for r in stream_generate(model, tokenizer, tokens[0].tolist(), max_tokens=4, prefill_step_size=5)
    ]
    cache, ours = model.make_cache(), []
    logits = prefill(model, tokens, cache)
    for _ in range(4):
        ours.append(mx.argmax(logits, axis=-1))
        logits = model(ours[-1][None], cache)[:, -1]
    assert generated == mx.concatenate(ours).tolist()


def test_decode_reads_the_weights_as_they_are_now(hf):
    """The compiled decode step reads the weights as they are at each call: weights loaded after it was traced
    (gates opened, memory and norm changed) are the ones it reads. The norm is scaled per channel: a uniform scale
    would vanish in the memory's own pre-norm."""
    model, tokens = titans_model(hf["qwen2"]), prompt(12)
    feed(model, tokens, [1] * 12)  # traces the decode step
    changed = titans_model(hf["qwen2"], 0.05)
    for layer in changed.layers:
        weight = layer.post_attention_layernorm.weight
        layer.post_attention_layernorm.weight = weight * mx.random.uniform(0.5, 1.5, weight.shape, key=mx.random.key(1))
        layer.memory.to_queries.weight = 2 * layer.memory.to_queries.weight
    model.load_weights(tree_flatten(changed.parameters()))
    assert_close(feed(model, tokens, [1] * 12), reference_logits(changed, tokens))


def test_cached_decode_equals_uncached_forward(hf):
    model = titans_model(hf["qwen3"], 0.05)
    tokens = prompt(45)
    cache = model.make_cache()
    prefill(model, tokens[:, :-1], cache, 8)
    assert_close(model(tokens[:, -1:], cache)[:, -1], model(tokens)[:, -1])


@pytest.mark.parametrize("arch", QWEN_TYPES)
def test_memory_state_out_and_in_continues_exactly(hf, tmp_path, arch):
    first, then = prompt(45), prompt(21, seed=1)  # beyond the window, memory mid-chunk
    model = titans_model(hf[arch], 0.05)
    cache = model.make_cache()
    prefill(model, first, cache)
    save_cache_file(tmp_path / "state.safetensors", model, cache)
    expected = model(then, cache)

    second_run = titans_model(hf[arch], 0.05)
    restored = load_cache_file(tmp_path / "state.safetensors", second_run)
    assert [type(c) for c in restored] == [type(c) for c in cache]
    assert mx.array_equal(second_run(then, restored), expected)
    attention = [c for c in restored if isinstance(c, TitansCache)]
    assert [c.offset for c in attention] == [66] * len(attention)
    assert [c.keys.shape[2] for c in attention] == [4 + 16 + 2] * len(attention)  # sinks, 48..63, the segment's 64, 65


def test_mlx_lm_prompt_cache_file_continues_exactly(hf, tmp_path):
    """mlx-lm's save_prompt_cache writes a TitansQwen cache and load_prompt_cache restores it: the same keys held
    (size(): sinks, the window before the segment, the segment so far) and bit-exact decoding after it."""
    first, then = prompt(45), prompt(21, seed=1)  # beyond the window, memory mid-chunk
    model = titans_model(hf["qwen2"], 0.05)
    cache = model.make_cache()
    prefill(model, first, cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache, {"note": "45 tokens"})
    restored, metadata = load_prompt_cache(tmp_path / "cache.safetensors", return_metadata=True)
    assert metadata == {"note": "45 tokens"} and all(isinstance(c, TitansCache) for c in restored)
    assert [c.size() for c in restored] == [c.size() for c in cache] == [4 + 16 + 13] * 2  # segment 32..47
    assert [c.offset for c in restored] == [45, 45] and restored[0].nbytes == cache[0].nbytes
    assert mx.array_equal(model(then, restored), model(then, cache))


def test_memory_state_of_another_model_is_refused(hf, tmp_path):
    model = titans_model(hf["qwen2"])
    cache = model.make_cache()
    prefill(model, prompt(10), cache)
    save_cache_file(tmp_path / "state.safetensors", model, cache)
    for other in (titans_model(hf["qwen2"], window=32), titans_model(hf["qwen3"]), titans_model(hf["qwen2_moe"])):
        with pytest.raises(ValueError, match="saved for another model"):
            load_cache_file(tmp_path / "state.safetensors", other)
    with pytest.raises(ValueError, match="not a TitansQwen memory state"):
        load_cache_file(hf["qwen2"] / "model.safetensors", model)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_5"])
def test_peak_memory_flat_in_context_length(hf, arch):
    """The whole cache is bounded: the window and the memory states, and a hybrid's linear-attention state."""
    model = titans_model(
        hf[arch],
        0.05,
        memory_layers=[1],
        window=32,
        segment_size=128,
        memory={"heads": 1, "dim_head": 16, "chunk_size": 128},
    )
    prefill(model, prompt(1024), model.make_cache())  # compile and warm up
    peaks = []
    for n in (4096, 65536):
        tokens = prompt(n)
        mx.eval(tokens)
        mx.reset_peak_memory()
        mx.eval(prefill(model, tokens, model.make_cache()))
        peaks.append(mx.get_peak_memory() - tokens.nbytes)  # weights and working memory, not the prompt itself
    assert peaks[1] <= 1.1 * peaks[0], peaks
