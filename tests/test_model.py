import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_titans.blocks import VARIANTS
from mlx_titans.model import TitansLMConfig, TitansLM, load_model, save_model

VOCAB = 97


def make(variant, **kw):
    mx.random.seed(0)
    cfg = dict(
        variant=variant,
        vocab_size=VOCAB,
        dim=32,
        layers=2,
        heads=2,
        window=6,
        persistent_tokens=2,
        memory=dict(chunk_size=4, heads=2, max_lr=0.5, conv_size=3),
    )
    cfg.update(kw)
    if variant in ("swa", "transformer"):
        cfg.pop("memory")
    return TitansLM(TitansLMConfig(**cfg))


def tokens(n, b=2, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(0, VOCAB, (b, n))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cuts", [[5], [6, 12], [1, 2, 3, 9, 10, 11, 17], list(range(1, 23))], ids=str)
def test_cached_decoding_equals_uncached_forward(variant, cuts):
    """Prompts shorter and longer than a window/segment (6), not multiples of the memory chunk (4)."""
    model = make(variant)
    t = tokens(23)
    whole = model(t)
    cache, outs, start = model.make_cache(), [], 0
    for end in cuts + [23]:
        outs.append(model(t[:, start:end], cache))
        start = end
    assert mx.allclose(mx.concatenate(outs, axis=1), whole, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_at_the_logits(variant):
    model = make(variant)
    t = tokens(20)
    base = model(t)
    for p in (0, 7, 13):
        t2 = mx.array(t)
        t2[:, p] = (t2[:, p] + 1) % VOCAB
        out = model(t2)
        assert mx.array_equal(out[:, :p], base[:, :p]), p
        assert not mx.allclose(out[:, p], base[:, p]), p


@pytest.mark.parametrize("variant", ["swa", "mac"])
def test_attention_alone_forgets_beyond_its_reach_and_memory_remembers(variant):
    """Without memory, a token more than layers x (window - 1) back cannot change the logits; with it, it can."""
    model = make(variant, memory_layers=[]) if variant == "mac" else make(variant)
    t = tokens(30, b=1)
    t2 = mx.array(t)
    t2[:, 0] = (t2[:, 0] + 1) % VOCAB
    assert mx.array_equal(model(t)[:, 12:], model(t2)[:, 12:])
    with_memory = make("mac")
    assert not mx.allclose(with_memory(t)[:, 12:], with_memory(t2)[:, 12:], atol=1e-6)


def test_window_covering_everything_equals_full_attention():
    swa = make("swa", window=64)
    full = make("transformer")
    full.update(swa.parameters())
    t = tokens(21)
    assert mx.allclose(swa(t), full(t), atol=1e-5)


@pytest.mark.parametrize("variant", ["mac", "mag", "swa"])
def test_cache_does_not_grow_with_context(variant):
    model = make(variant)
    cache = model.make_cache()
    for _ in range(10):
        model(tokens(17, b=1), cache)
    for c in cache:
        assert c.keys.shape[2] <= 6


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = make(variant)
    t = tokens(14)
    loss = lambda m: nn.losses.cross_entropy(m(t[:, :-1]), t[:, 1:]).mean()
    _, grads = nn.value_and_grad(model, loss)(model)
    for name, g in tree_flatten(grads):
        assert mx.all(mx.isfinite(g)), name
        if "initial_weights.gamma" not in name:  # gamma's gradient is exactly 0 until the memory has moved
            assert mx.abs(g).max() > 0, name


def test_save_load_round_trip(tmp_path):
    model = make("mag")
    save_model(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    t = tokens(9)
    assert mx.array_equal(loaded(t), model(t))
    assert loaded.config == model.config
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")


def test_bad_configs():
    with pytest.raises(ValueError, match="variant"):
        TitansLMConfig(variant="mad")
    with pytest.raises(ValueError, match="every layer"):
        TitansLMConfig(variant="lmm", layers=2, memory_layers=[0])
    with pytest.raises(ValueError, match="baseline"):
        TitansLMConfig(variant="swa", memory_layers=[0])
    with pytest.raises(ValueError, match="unknown fields"):
        TitansLMConfig(memory={"chunk": 4})
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        make("swa")(mx.zeros((5,), dtype=mx.int32))


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer"])
def test_cache_save_load_continues_exactly(tmp_path, variant):
    from mlx_titans.prompt_cache import load_cache_file, save_cache_file

    model = make(variant)
    t = tokens(19, b=1)
    whole = model(t)
    cache = model.make_cache()
    first = model(t[:, :11], cache)
    save_cache_file(tmp_path / "state.safetensors", model, cache)
    resumed = load_cache_file(tmp_path / "state.safetensors", model)
    second = model(t[:, 11:], resumed)
    assert mx.allclose(mx.concatenate([first, second], axis=1), whole, atol=1e-5)
    with pytest.raises(ValueError, match="another config"):
        load_cache_file(tmp_path / "state.safetensors", make(variant, window=5))


@pytest.mark.parametrize(
    "variant, held", [("mac", 5), ("mag", 5), ("mal", 5), ("lmm", 0), ("swa", 5), ("transformer", 11)]
)
def test_mlx_lm_prompt_cache_file_continues_exactly(tmp_path, variant, held):
    """mlx-lm's save_prompt_cache writes a TitansLM cache and load_prompt_cache restores it: the same keys held
    (size(): what attention still sees of 11 tokens, window 6) and the same logits after it."""
    from mlx_lm.models.cache import save_prompt_cache

    from mlx_titans import load_prompt_cache

    model = make(variant)
    t = tokens(19)
    cache = model.make_cache()
    model(t[:, :11], cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache, {"note": "eleven tokens"})
    restored, metadata = load_prompt_cache(tmp_path / "cache.safetensors", return_metadata=True)
    assert metadata == {"note": "eleven tokens"}
    assert [c.size() for c in restored] == [c.size() for c in cache] == [held] * 2
    assert [c.offset for c in restored] == [11, 11] and not restored[0].empty()
    assert mx.array_equal(model(t[:, 11:], restored), model(t[:, 11:], cache))


def test_half_precision_storage_loads_as_float32(tmp_path):
    model = make("mac")
    save_model(tmp_path / "bf16", model, dtype=mx.bfloat16)
    loaded = load_model(tmp_path / "bf16")
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(loaded.parameters()))
    t = tokens(9)
    assert mx.allclose(loaded(t), model(t), atol=0.05)
