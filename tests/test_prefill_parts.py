"""benchmarks/prefill_parts.py (tiny)."""

import json

import pytest

from benchmarks import prefill_parts

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes


@pytest.mark.parametrize("memory_layers", [["0", "1"], ["0"]])
def test_prefill_parts_rounds_and_ratios(tmp_path, memory_layers):
    """Every part in every round, ratios per round to the rotating cache; the part without the last layer's memory
    only where the last layer has one."""
    out = tmp_path / "p.json"
    argv = ["--preset", "tiny", "--no-quantize", "--dtype", "float32", "--window", "64", "--max-kv-size", "64"]
    argv += ["--memory-layers", *memory_layers, "--context", "160", "--prefill-step-size", "64", "--rounds", "3"]
    result = prefill_parts.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    parts = ["rotating", "rotating, last layer computed", "titans", "titans, no memory"]
    parts += ["titans, no memory in the last"] if memory_layers == ["0", "1"] else []
    assert sorted(result["summary"]) == sorted(parts) and all(sorted(r) == sorted(parts) for r in result["rounds"])
    assert result["summary"]["rotating"]["ratio_to_rotating"] == 1.0
    ratios = sorted(r["rotating"] / r["titans"] for r in result["rounds"])
    assert result["summary"]["titans"]["ratio_to_rotating"] == pytest.approx(ratios[1])
    assert result["titans"]["memory_layers"] == [int(i) for i in memory_layers]
