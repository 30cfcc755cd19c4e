"""benchmarks/prefill_speed.py (tiny)."""

import json

import pytest

from benchmarks import prefill_speed

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes


def test_prefill_speed_rounds_and_ratios(tmp_path):
    out = tmp_path / "p.json"
    argv = ["--preset", "tiny", "--no-quantize", "--dtype", "float32", "--window", "64", "--memory-layers", "0", "1"]
    argv += ["--contexts", "96", "160", "-g", "4", "--rounds", "2", "--methods", "titans", "window", "--out", str(out)]
    result = prefill_speed.main(argv)
    saved = json.loads(out.read_text())
    assert saved["summary"] == result["summary"] and saved["command"].endswith(str(out))
    assert len(result["rounds"]) == 2
    assert set(result["summary"]) == {f"{m}@{c}" for m in ("titans", "window", "rotating") for c in (96, 160)}
    assert all(result["summary"][f"rotating@{c}"]["prefill_ratio"] == 1.0 for c in (96, 160))
    titans = [r["titans"][160]["prefill_tps"] / r["rotating"][160]["prefill_tps"] for r in result["rounds"]]
    assert result["summary"]["titans@160"]["prefill_ratio"] == pytest.approx(sum(titans) / 2)
