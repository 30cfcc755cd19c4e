"""The adapter-training costs of benchmarks/cost_model.py against real memory states and caches, and
benchmarks/adapt_cost.py end to end."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config

from benchmarks import adapt_cost, cost_model
from mlx_titans import MemoryConfig, NeuralMemory
from mlx_titans.adapt import value_and_grad
from mlx_titans.qwen import TitansQwenConfig
from mlx_titans.qwen.adapters import make_trainable
from mlx_titans.qwen.random_model import preset_config, random_model

TINY = preset_config("tiny")


def section(**overrides):
    base = {
        "memory_layers": [0, 1],
        "window": 24,
        "sink_tokens": 4,
        "segment_size": 16,
        "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
    }
    return TitansQwenConfig.from_section(
        {**base, **overrides}, TINY["num_hidden_layers"], TINY["hidden_size"]
    ).to_section()


def default_section(config) -> dict:
    return TitansQwenConfig.from_section({}, config["num_hidden_layers"], config["hidden_size"]).to_section()


def nbytes(tree) -> int:
    return sum(a.nbytes for _, a in tree_flatten(tree) if isinstance(a, mx.array))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"momentum": False},
        {"momentum_order": 2},
        {"batch_size": 8},
        {"conv_size": 4},
        {"depth": 3, "expansion": 2.0},
        {"residual_norm": False},
        {"per_head_init": False},
    ],
)
def test_memory_state_bytes_equal_a_real_state(changes):
    config = MemoryConfig(dim=32, heads=2, dim_head=8, chunk_size=4, **changes)
    memory = NeuralMemory(config)
    _, state = memory(mx.random.normal((3, 8, 32), key=mx.random.key(0)))
    assert nbytes(state.arrays()) == cost_model.memory_state_bytes({"memory": config.to_dict()}, 32, batch=3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_5"])
@pytest.mark.parametrize("dtype, dtype_bytes", [("bfloat16", 2), ("float32", 4)])
def test_cache_bytes_equal_a_fed_titans_cache(hf, arch, dtype, dtype_bytes):
    """At each segment boundary, before and after the window fills (window 24 + 4 sinks, segments of 16); a hybrid's
    Gated DeltaNet layer (with a memory: LinearCache) keeps its fixed-size state beside."""
    titans, config = section(), TINY if arch == "qwen2" else load_config(hf[arch])
    model = random_model(config, titans, 4, 64, dtype)
    cache, tokens = model.make_cache(), mx.random.randint(0, 512, (2, 48), key=mx.random.key(1))
    for start in range(0, 48, 16):
        model(tokens[:, start : start + 16], cache)
        mx.eval([c.state for c in cache])
        assert sum(c.nbytes for c in cache) == cost_model.cache_bytes(config, titans, start + 16, 2, dtype_bytes)


def test_peak_grows_by_one_full_cache_per_segment():
    """Past the window, every segment more keeps one more cache: sinks + window keys and values of every layer, and
    the state of the 4 memory layers (heads x (the memory MLP's weights + momentum + the gradient reference the
    default's 8 chunks share), float32)."""
    config = preset_config("qwen2.5-7b")
    titans = default_section(config)
    full = cost_model.cache_bytes(config, titans, 8192)
    short, long = (cost_model.adapt_peak_bytes(config, titans, n)["total"] for n in (16384, 20480))
    assert long - short == pytest.approx(2 * full)
    mlp = 128 * 512 + 512 * 128 + 128  # w0, w1, gamma
    assert full == 4100 * cost_model.kv_bytes_per_token(config) + 4 * 4 * 3 * mlp * 4


def test_peak_is_near_a_measured_step():
    """Loose: the activations are a rough count (see segment_activation_bytes)."""
    titans = section()
    model = random_model(TINY, titans, None, 64, "float32")
    make_trainable(model)
    tokens = mx.random.randint(0, 512, (1, 129), key=mx.random.key(2))
    args = (tokens[:, :-1], tokens[:, 1:], mx.ones((1, 128)), mx.array([False]))
    mx.eval(value_and_grad(model, *args))
    mx.clear_cache()
    held = mx.get_active_memory()  # the weights, and whatever earlier tests of this process left alive
    mx.reset_peak_memory()
    mx.eval(value_and_grad(model, *args))
    peak = cost_model.adapt_peak_bytes(TINY, titans, 128, bits=None, dtype_bytes=4)
    step = peak["total"] - peak["optimizer"] - peak["weights"]
    assert 0.5 < step / (mx.get_peak_memory() - held) < 1.5


def test_a_step_costs_three_forwards_and_the_attention_backward():
    config = preset_config("qwen2.5-7b")
    titans = default_section(config)
    s = cost_model.Shapes.from_config(config)
    forward = cost_model.prefill_flops(config, "titans", 65536, titans, None) + 2 * s.vocab * s.hidden
    assert 3 < cost_model.adapt_flops(config, titans, 65536) / forward < 3.2
    # bounded attention: a sample 8x longer costs (nearly) the same per token
    assert cost_model.adapt_flops(config, titans, 131072) / cost_model.adapt_flops(config, titans, 16384) < 1.03


@pytest.mark.benchmark
def test_cli_table_and_check(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    titans = section()
    (model_dir / "config.json").write_text(json.dumps({**TINY, "torch_dtype": "float32", "titans": titans}))
    measured = {
        "model": str(model_dir),
        "machine": "test",
        "titans": titans,
        "rows": [
            {"length": 64, "checkpoint": True, "peak_memory_gb": 0.01, "seconds_per_step": 2.0},
            {"length": 64, "checkpoint": False, "peak_memory_gb": 0.05, "seconds_per_step": 1.0},
        ],
    }
    (tmp_path / "measured.json").write_text(json.dumps(measured))
    out = tmp_path / "cost.json"
    assert adapt_cost.main(["--check-against", str(tmp_path / "measured.json"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tflop_s"]["estimate"] and "M3 Max" in result["tflop_s"]["source"]
    assert [(r["model"], r["window_multiple"]) for r in result["rows"]] == [
        (m, k) for m in ("qwen2.5-0.5b", "qwen2.5-7b") for k in (4, 16, 32)
    ]
    for r in result["rows"]:
        assert r["total_gb"] > r["weights_gb"] > 0 and r["hours_per_million_tokens"] > 0
    (row,) = result["check"]["rows"]
    peak = cost_model.adapt_peak_bytes(TINY, titans, 64, bits=None, dtype_bytes=4)
    assert row["predicted_peak_gb"] == pytest.approx((peak["total"] - peak["optimizer"]) / 1e9)
    assert row["predicted_over_measured"] == pytest.approx(row["predicted_peak_gb"] / 0.01)
    assert "estimate, not a measurement" in capsys.readouterr().out

    assert adapt_cost.main(["--tflops", "5.3", "--presets", "qwen2.5-7b", "--multiples", "4", "--out", str(out)]) == 0
    slower = json.loads(out.read_text())
    hours = slower["rows"][0]["hours_per_million_tokens"]
    assert hours == pytest.approx(2 * result["rows"][3]["hours_per_million_tokens"])
    assert slower["tflop_s"]["source"] == "--tflops"
    with pytest.raises(SystemExit):
        adapt_cost.main(["--tflops", "0"])
