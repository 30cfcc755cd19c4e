"""benchmarks/cost_model.py against built models and caches (its adapter-training part: test_adapt_cost.py)."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config

from benchmarks import context_scaling, cost_model
from mlx_titans.qwen import TitansQwenConfig
from mlx_titans.qwen.config import QWEN_TYPES, text_config
from mlx_titans.qwen.random_model import preset_config, random_model

TINY_QWEN3 = {**preset_config("tiny"), "model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": False}


def section(config, **overrides):
    text = text_config(config)
    return TitansQwenConfig.from_section(
        {"memory_layers": [1], "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8}, **overrides},
        text["num_hidden_layers"],
        text["hidden_size"],
    ).to_section()


def tiny_config(hf, arch) -> dict:
    return load_config(hf[arch]) if arch in hf else {"tiny": preset_config("tiny"), "qwen3": TINY_QWEN3}[arch]


@pytest.mark.parametrize("arch", ["tiny", "qwen3", *list(QWEN_TYPES)[2:]])  # tiny: qwen2 tied
@pytest.mark.parametrize("method", ["titans", "full"])
@pytest.mark.parametrize("bits", [4, None])
def test_weight_bytes_equal_the_built_model(hf, arch, method, bits):
    """Every type: MoE experts, routers kept at 8 bits, Gated DeltaNet layers, a vision-language text model."""
    config = tiny_config(hf, arch)
    titans = section(config, memory={"heads": 2, "dim_head": 16, "conv_size": 4, "qk_rmsnorm": True})
    model = random_model(config, titans if method == "titans" else None, bits, 64, "bfloat16")
    actual = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert cost_model.weight_bytes(config, method, titans, bits, 64) == actual


def test_titans_decode_attends_what_the_model_says():
    """Averaged over a segment of decode steps, TitansCache holds the keys cost_model.attended counts."""
    config = preset_config("tiny")
    titans = section(config, window=32, sink_tokens=4, segment_size=16)
    model = random_model(config, titans, None, 64, "float32")
    cache = model.make_cache()
    model(mx.zeros((1, 64), dtype=mx.int32), cache)  # a segment boundary, far beyond the window
    sizes = []
    for _ in range(16):
        sizes.append(cache[0].size() + 1)  # the keys the step attends: those kept, and itself
        model(mx.zeros((1, 1), dtype=mx.int32), cache)
    assert sum(sizes) / len(sizes) == cost_model.attended("titans", 80, titans, 4096)
    assert cost_model.attended("titans", 10, titans, 4096) == 10  # within the window: the whole context


def test_kv_bytes_per_token_equal_a_full_cache():
    config = TINY_QWEN3
    model = random_model(config, None, None, 64, "bfloat16")
    cache = context_scaling.make_cache(model, "full", 4096)
    model(mx.zeros((1, 100), dtype=mx.int32), cache)
    held = sum(c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in cache)
    assert held == 100 * cost_model.kv_bytes_per_token(config)


def test_costs_grow_with_context_only_for_the_full_cache():
    config = preset_config("qwen2.5-7b")
    titans = section(config)
    for method in cost_model.METHODS:
        short, long = (cost_model.decode_bytes(config, method, n, titans, 4096) for n in (8192, 524288))
        grows = cost_model.kv_bytes_per_token(config) * (524288 - 8192) if method == "full" else 0
        assert long - short == grows
    # the M3 Max reference: an 8B 4-bit model prefills 32K at ~428 tok/s, i.e. ~10.6 TFLOP/s of these FLOPs
    flops = cost_model.prefill_flops(preset_config("qwen3-8b"), "full", 32768, titans, 4096)
    assert 380 < cost_model.M3_MAX["tflop_s"] * 1e12 / flops < 480


def test_only_attention_layers_keys_grow_in_a_hybrid():
    """Qwen3.6-35B-A3B: only 10 of its 40 layers attend, ~20 KB of keys and values per token (paper-and-peers.md
    §8), against Qwen3-8B's 144 KiB; its decode at 512K reads ~3B active weights, not all 35B."""
    hybrid, dense = preset_config("qwen3.6-35b-a3b"), preset_config("qwen3-8b")
    assert cost_model.kv_bytes_per_token(hybrid) == 2 * 10 * 2 * 256 * 2 == 20480
    assert cost_model.kv_bytes_per_token(dense) == 144 * 1024
    titans = section(hybrid)
    for method in cost_model.METHODS:
        short, long = (cost_model.decode_bytes(hybrid, method, n, titans, 4096) for n in (8192, 524288))
        assert long - short == (20480 * (524288 - 8192) if method == "full" else 0)
    for name in ("qwen3-30b-a3b", "qwen3.6-35b-a3b"):  # "A3B": ~3B of their parameters active per token
        s = cost_model.Shapes.from_config(preset_config(name))
        assert 2.5e9 < cost_model.active_matrix_params(s) + 2 * s.vocab * s.hidden < 4e9


def test_fit_recovers_a_linear_cost():
    fit = cost_model.fit_time_per_token([1e9, 2e9, 4e9], [0.002 + w / 400e9 for w in (1e9, 2e9, 4e9)])
    assert fit["overhead_ms"] == pytest.approx(2.0) and fit["rate"] == pytest.approx(400e9)
    assert fit["max_rel_error"] < 1e-9
