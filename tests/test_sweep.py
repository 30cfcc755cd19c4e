import json

import pytest

from benchmarks.sweep import main as sweep

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes

TRAIN = [
    "--task",
    "passkey",
    "--vocab-size",
    "64",
    "--dim",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--window",
    "8",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--log-every",
    "1",
    "--eval-batches",
    "1",
    "--dtype",
    "float32",
]
NIAH = ["--tasks", "passkey", "--lengths", "32", "64", "--samples", "4", "--batch", "4"]


def write_spec(path, runs):
    path.write_text(json.dumps({"train": TRAIN, "niah": NIAH, "runs": runs}))
    return path


def test_sweep_trains_tests_and_gathers_then_resumes(tmp_path):
    spec = write_spec(
        tmp_path / "spec.json",
        [
            {"name": "mac", "train": ["--variant", "mac", "--memory", '{"chunk_size": 4, "conv_size": 3}']},
            {"name": "swa_seed1", "train": ["--variant", "swa", "--seed", "1"]},
        ],
    )
    argv = [str(spec), "--work", str(tmp_path / "work"), "--jobs", "2", "--out", str(tmp_path / "sweep.json")]
    result = sweep(argv)
    assert json.loads((tmp_path / "sweep.json").read_text()) == result
    assert [r["name"] for r in result["runs"]] == ["mac", "swa_seed1"]
    assert {(r["model"], r["length"]) for r in result["rows"]} == {
        (m, n) for m in ("mac", "swa_seed1") for n in (32, 64)
    }
    assert all(r["valid_loss"] > 0 for r in result["runs"])
    train, niah = result["runs"][0]["commands"]
    assert train.startswith("python -m mlx_titans.train ") and '\'{"chunk_size": 4, "conv_size": 3}\'' in train
    assert niah.startswith("python -m benchmarks.niah --models ")
    assert (tmp_path / "sweep.png").stat().st_size > 0

    stamp = (tmp_path / "work" / "mac" / "log.txt").stat().st_mtime_ns
    assert sweep(argv)["rows"] == result["rows"]  # nothing run again
    assert (tmp_path / "work" / "mac" / "log.txt").stat().st_mtime_ns == stamp


def test_sweep_reports_a_failed_run_and_refuses_a_bad_spec(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.json", [{"name": "bad", "train": ["--variant", "nope"]}])
    with pytest.raises(SystemExit, match="bad failed"):
        sweep([str(spec), "--work", str(tmp_path / "work")])
    assert "variant must be one of" in capsys.readouterr().out  # the end of its log
    twice = write_spec(tmp_path / "twice.json", [{"name": "a"}, {"name": "a"}])
    with pytest.raises(SystemExit, match="distinct names"):
        sweep([str(twice)])
    with pytest.raises(SystemExit, match="GPUs must be at least 1"):
        sweep([str(spec), "--gpus", "0"])
