"""benchmarks/cost_model.py against built models and caches, and benchmarks/context_scaling.py end to end (tiny)."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from benchmarks import context_scaling, cost_model, decode_speed
from mlx_titans.qwen import TitansQwenConfig
from mlx_titans.qwen.random_model import preset_config, random_model

TINY_QWEN3 = {**preset_config("tiny"), "model_type": "qwen3", "head_dim": 32,
              "tie_word_embeddings": False}


def section(config, **overrides):
    return TitansQwenConfig.from_section({"memory_layers": [1], "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
                                      **overrides}, config["num_hidden_layers"], config["hidden_size"]).to_section()


@pytest.mark.parametrize("config", [preset_config("tiny"), TINY_QWEN3], ids=["qwen2-tied", "qwen3"])
@pytest.mark.parametrize("method", ["titans", "full"])
@pytest.mark.parametrize("bits", [4, None])
def test_weight_bytes_equal_the_built_model(config, method, bits):
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


def test_fit_recovers_a_linear_cost():
    fit = cost_model.fit_time_per_token([1e9, 2e9, 4e9], [0.002 + w / 400e9 for w in (1e9, 2e9, 4e9)])
    assert fit["overhead_ms"] == pytest.approx(2.0) and fit["rate"] == pytest.approx(400e9)
    assert fit["max_rel_error"] < 1e-9


def run(tmp_path, *extra):
    out = tmp_path / "cs.json"
    context_scaling.main(["--preset", "tiny", "--contexts", "128", "256", "--window", "64", "--max-kv-size", "64",
                          "--warmup-context", "128", "--burn-in", "0", "-g", "4", "--prefill-step-size", "64",
                          "--out", str(out), *extra])
    return json.loads(out.read_text()), out


def test_benchmark_end_to_end(tmp_path):
    result, out = run(tmp_path)
    assert [(r["method"], r["context"]) for r in result["rows"]] == [
        (m, n) for m in ("titans", "full", "rotating") for n in (128, 256)]
    for row in result["rows"]:
        assert row["prefill_tps"] > 0 and row["decode_tps"] > 0 and row["peak_gb"] > 0 and row["device"]
    assert result["stopped"] == {} and out.with_suffix(".png").stat().st_size > 0
    assert {c["method"] for c in result["analytic"]["cost"]} == {"titans", "full", "rotating"}
    assert set(result["analytic"]["fit"]) == {"decode", "prefill"}

    # methods measured in separate commands, analysed together
    (tmp_path / "b").mkdir()
    only_full, full_file = run(tmp_path / "b", "--methods", "full", "--time-budget", "0")
    assert [r["context"] for r in only_full["rows"]] == [128]  # the budget stops it after the first context
    assert "stopped before 256" in only_full["stopped"]["full"]
    merged = context_scaling.main(["--preset", "tiny", "--contexts", "128", "256", "--window", "64",
                                   "--rows-from", str(out), str(full_file), "--out", str(tmp_path / "m.json")])
    rows = {(r["method"], r["context"]): r for r in merged["rows"]}
    assert len(merged["rows"]) == 6
    assert rows["full", 128]["decode_tps"] == only_full["rows"][0]["decode_tps"]  # the later file wins
    assert merged["stopped"] == only_full["stopped"]


def test_bad_contexts_are_refused():
    with pytest.raises(SystemExit):
        context_scaling.parse_args(["--contexts", "4096", "1024"])


def test_decode_speed_rounds_and_ratios(tmp_path):
    out = tmp_path / "d.json"
    result = decode_speed.main(["--preset", "tiny", "--context", "96", "-g", "4", "--rounds", "3", "--burn-in", "0",
                                "--window", "64", "--methods", "titans", "window", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert len(result["rounds"]) == 3 and all(set(r) == {"titans", "window", "full"} for r in result["rounds"])
    titans = result["summary"]["titans"]
    ratios = [r["titans"] / r["full"] for r in result["rounds"]]
    assert titans["ratio_to_full"] == ratios and titans["median_ratio"] == sorted(ratios)[1]
    assert result["summary"]["full"]["median_ratio"] == result["summary"]["full"]["overall_ratio"] == 1.0
    assert 96 + 3 * 4 < result["final_context"] <= 96 + 1 + 3 * (4 + 2)  # the caches continue from round to round
    assert decode_speed.model_source(decode_speed.parse_args(["--preset", "tiny"]))[3] == "tiny"


def test_decode_speed_sync_steps_find_the_chunk_completing_ones(tmp_path):
    config = preset_config("tiny")
    titans = section(config)  # chunks of 8
    model = random_model(config, titans, None, 64, "float32")
    cache = model.make_cache()
    model(mx.zeros((1, 20), dtype=mx.int32), cache)  # 4 tokens past the last completed chunk
    rows = decode_speed.sync_latencies(model, cache, config["vocab_size"], 14)
    assert [i for i, (_, completes) in enumerate(rows) if completes] == [3, 11]
    assert cache[1].offset == 34 and all(ms > 0 for ms, _ in rows)
    fresh = decode_speed.sync_latencies(model, model.make_cache(), config["vocab_size"], 2)
    assert [completes for _, completes in fresh] == [True, False]  # a stream's first call takes it too
    window = random_model(config, {**titans, "memory_layers": []}, None, 64, "float32")
    assert not any(completes for _, completes in decode_speed.sync_latencies(window, window.make_cache(), 100, 3))
    assert decode_speed.sync_summary([(2.0, False), (9.0, True), (4.0, False), (3.0, False)]) == {
        "median_ms": 3.0, "chunk_ms": [9.0]}
    out = tmp_path / "d.json"
    result = decode_speed.main(["--preset", "tiny", "--context", "96", "-g", "4", "--rounds", "1", "--burn-in", "0",
                                "--window", "64", "--methods", "titans", "--sync-tokens", "5", "--out", str(out)])
    assert set(result["sync"]) == {"titans", "full"} and json.loads(out.read_text())["sync"] == result["sync"]


def test_decode_speed_refuses_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="no model directory"):
        decode_speed.main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        decode_speed.parse_args(["--model", str(tmp_path), "--methods", "window"])
    with pytest.raises(SystemExit):
        decode_speed.parse_args(["--sync-tokens", "-1"])
