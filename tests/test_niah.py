"""Needle evaluation of TitansLM checkpoints: mlx_titans/niah.py and benchmarks/niah.py's --models mode (its --qwen
mode is in test_text_eval.py)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.niah import main
from mlx_titans.model import TitansLM, TitansLMConfig, load_model, save_model
from mlx_titans.niah import accuracy, answer_logits
from mlx_titans.tasks import make_batch


@pytest.mark.benchmark
def test_block_evaluation_equals_one_pass_and_cli(tmp_path):
    mx.random.seed(0)
    model = TitansLM(
        TitansLMConfig(variant="mag", vocab_size=128, dim=32, layers=2, heads=2, window=8, memory=dict(chunk_size=4))
    )
    inputs = mx.array(make_batch("passkey", 2, 50, np.random.default_rng(1), 128)[0])
    assert mx.allclose(answer_logits(model, inputs, 40, 16), model(inputs)[:, 40:], atol=5e-4)  # BLAS summation order
    assert 0.0 <= accuracy(model, "passkey", 50, 4, 2, 0, 16) <= 1.0
    save_model(tmp_path / "m", model)
    main(
        [
            "--models",
            str(tmp_path / "m"),
            "--tasks",
            "passkey",
            "mqar",
            "--lengths",
            "40",
            "60",
            "--samples",
            "2",
            "--block",
            "16",
            "--out",
            str(tmp_path / "niah.json"),
        ]
    )
    assert (tmp_path / "niah.png").stat().st_size > 0
    for memory, same in (({"max_decay": 1.0}, True), ({"max_decay": 0.0}, False)):  # run with other memory settings
        slowed = load_model(tmp_path / "m", memory=memory)
        assert slowed.layers[0].memory.config.max_decay == memory["max_decay"]
        assert mx.allclose(slowed(inputs), model(inputs), atol=1e-5) == same
    main(
        [
            "--models",
            str(tmp_path / "m"),
            "--tasks",
            "passkey",
            "--lengths",
            "40",
            "--samples",
            "2",
            "--memory",
            '{"max_decay": 0}',
            "--out",
            str(tmp_path / "slowed.json"),
        ]
    )
    assert json.loads((tmp_path / "slowed.json").read_text())["rows"][0]["memory"] == {"max_decay": 0}
    with pytest.raises(SystemExit):
        main(["--models", str(tmp_path / "m"), "--memory", "{max_decay", "--out", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="unknown fields"):
        main(["--models", str(tmp_path / "m"), "--memory", '{"max_decy": 0}', "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
