import json

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.forget_gate import keep_rates
from benchmarks.forget_gate import main as forget_gate
from benchmarks.reproduce import main as reproduce
from mlx_titans.model import load_model
from mlx_titans.tasks import make_batch
from mlx_titans.train import find_checkpoint
from test_reproduce import TINY, write_stream

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    write_stream(work / "tokens" / "train.npy", 20000, seed=0, vocab=8192)
    write_stream(work / "tokens" / "valid.npy", 5000, seed=1, vocab=8192)
    reproduce(
        [
            "--work",
            str(work),
            "--out",
            str(work / "niah.json"),
            "--runs",
            "mac",
            "mac_no_weight_decay",
            "--tasks",
            "passkey",
            *TINY,
        ]
    )
    return work


def test_scale_one_repeats_reproduce_and_scales_rescale_the_keeps(work):
    out = work / "niah_forget_gate.json"
    forget_gate(["--work", str(work), "--runs", "mac", "--scales", "1", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    measured = json.loads((work / "mac" / "result.json").read_text())["rows"]
    measured = {(r["task"], r["length"]): r["accuracy"] for r in measured}
    again = {(r["task"], r["length"]): r["accuracy"] for r in result["rows"] if r["max_decay"] == 1}
    assert again == measured and len(result["rows"]) == 2 * 4
    assert {(g["layer"], g["head"]) for g in result["gates"]} == {(0, 0), (0, 1)}
    assert all(0 < g["needle_left_median"] <= 1 and 0 < g["mean_keep"] < 1 for g in result["gates"])
    assert out.with_suffix(".png").stat().st_size > 0

    checkpoint = find_checkpoint(work / "mac" / "train")
    inputs = mx.array(make_batch("passkey", 2, 200, np.random.default_rng(0), 8205)[0])
    full, half = (keep_rates(load_model(checkpoint, memory={"max_decay": s}), inputs)[0] for s in (1, 0.5))
    assert full.shape == (2, 2, 200 // 16)
    first_segment = 32 // 16  # what MAC stores there does not depend on what the memory forgot
    assert np.allclose(half[..., :first_segment], 1 - 0.5 * (1 - full[..., :first_segment]), atol=1e-6)
    model = load_model(checkpoint)
    keep_rates(model, inputs)  # the recording is undone
    assert model.layers[0].memory.gate_log is None


def test_runs_without_a_forget_gate_or_result_are_refused(work):
    with pytest.raises(SystemExit, match="no forget gate"):
        forget_gate(["--work", str(work), "--runs", "mac_no_weight_decay"])
    with pytest.raises(SystemExit, match="not found"):
        forget_gate(["--work", str(work), "--runs", "mal"])
    with pytest.raises(SystemExit, match="scales"):
        forget_gate(["--work", str(work), "--runs", "mac", "--scales", "2"])
