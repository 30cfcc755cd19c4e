"""benchmarks/context_scaling.py end to end (tiny)."""

import json

import pytest

from benchmarks import context_scaling
from mlx_titans.qwen import load_plain_qwen
from mlx_titans.qwen.convert import convert

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes


def run(tmp_path, *extra):
    out = tmp_path / "cs.json"
    context_scaling.main(
        [
            "--preset",
            "tiny",
            "--contexts",
            "128",
            "256",
            "--window",
            "64",
            "--max-kv-size",
            "64",
            "--warmup-context",
            "128",
            "--burn-in",
            "0",
            "-g",
            "4",
            "--prefill-step-size",
            "64",
            "--out",
            str(out),
            *extra,
        ]
    )
    return json.loads(out.read_text()), out


def test_benchmark_end_to_end(tmp_path):
    result, out = run(tmp_path)
    assert [(r["method"], r["context"]) for r in result["rows"]] == [
        (m, n) for m in ("titans", "full", "rotating") for n in (128, 256)
    ]
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
    merged = context_scaling.main(
        [
            "--preset",
            "tiny",
            "--contexts",
            "128",
            "256",
            "--window",
            "64",
            "--rows-from",
            str(out),
            str(full_file),
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    rows = {(r["method"], r["context"]): r for r in merged["rows"]}
    assert len(merged["rows"]) == 6
    assert rows["full", 128]["decode_tps"] == only_full["rows"][0]["decode_tps"]  # the later file wins
    assert merged["stopped"] == only_full["stopped"]


def test_bad_contexts_are_refused():
    with pytest.raises(SystemExit):
        context_scaling.parse_args(["--contexts", "4096", "1024"])


def test_a_converted_hybrid_moe(hf, tmp_path):
    """--model a converted qwen3_5_moe (Gated DeltaNet and attention layers, experts): every method runs, the
    rotating cache only in its attention layers, and the cost model's KV bytes count those layers alone."""
    convert(hf["qwen3_5_moe"], tmp_path / "q", quantize=True)
    out = tmp_path / "cs.json"
    argv = ["--model", str(tmp_path / "q"), "--contexts", "128", "256", "--window", "64", "--max-kv-size", "64"]
    argv += ["--warmup-context", "128", "--burn-in", "0", "-g", "4", "--prefill-step-size", "64", "--out", str(out)]
    context_scaling.main(argv)
    result = json.loads(out.read_text())
    assert [(r["method"], r["context"]) for r in result["rows"]] == [
        (m, n) for m in ("titans", "full", "rotating") for n in (128, 256)
    ]
    model = load_plain_qwen(tmp_path / "q")[0]
    rotating = context_scaling.make_cache(model, "rotating", 64)
    assert [type(c).__name__ for c in rotating] == ["ArraysCache", "RotatingKVCache"]
    full = {c["context"]: c["kv_gb"] for c in result["analytic"]["cost"] if c["method"] == "full"}
    assert full[256] - full[128] == 128 * 2 * 1 * 2 * 16 * 2 / 1e9  # one attention layer: 2 KV heads of 16
