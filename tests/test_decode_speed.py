"""benchmarks/decode_speed.py (tiny)."""

import json

import mlx.core as mx
import pytest

from benchmarks import decode_speed
from mlx_titans.qwen.convert import convert
from mlx_titans.qwen.random_model import preset_config, random_model
from test_cost_model import section

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes


def test_decode_speed_rounds_and_ratios(tmp_path):
    out = tmp_path / "d.json"
    result = decode_speed.main(
        [
            "--preset",
            "tiny",
            "--context",
            "96",
            "-g",
            "4",
            "--rounds",
            "3",
            "--burn-in",
            "0",
            "--window",
            "64",
            "--methods",
            "titans",
            "window",
            "--out",
            str(out),
        ]
    )
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
        "median_ms": 3.0,
        "chunk_ms": [9.0],
    }
    out = tmp_path / "d.json"
    result = decode_speed.main(
        [
            "--preset",
            "tiny",
            "--context",
            "96",
            "-g",
            "4",
            "--rounds",
            "1",
            "--burn-in",
            "0",
            "--window",
            "64",
            "--methods",
            "titans",
            "--sync-tokens",
            "5",
            "--out",
            str(out),
        ]
    )
    assert set(result["sync"]) == {"titans", "full"} and json.loads(out.read_text())["sync"] == result["sync"]


def test_decode_speed_refuses_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="no model directory"):
        decode_speed.main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        decode_speed.parse_args(["--model", str(tmp_path), "--methods", "window"])
    with pytest.raises(SystemExit):
        decode_speed.parse_args(["--sync-tokens", "-1"])


def test_decode_speed_on_a_converted_hybrid(hf, tmp_path):
    """A qwen3_5_moe: the context is counted on its attention layers' caches (its first layer's cache is linear)."""
    convert(hf["qwen3_5_moe"], tmp_path / "q", quantize=True)
    argv = ["--model", str(tmp_path / "q"), "--context", "96", "-g", "4", "--rounds", "2", "--burn-in", "0"]
    result = decode_speed.main([*argv, "--methods", "titans", "rotating", "--out", str(tmp_path / "d.json")])
    assert set(result["summary"]) == {"titans", "rotating", "full"}
    assert 96 + 2 * 4 < result["final_context"] <= 96 + 1 + 2 * (4 + 2)
