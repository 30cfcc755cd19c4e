import json

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.niah import main
from mlx_titans.model import TitansLMConfig, TitansLM, load_model, save_model
from mlx_titans.niah import accuracy, answer_logits
from mlx_titans.tasks import DIGITS, HEX, NEEDLE, QUERY, TASKS, answered, make_batch


@pytest.mark.parametrize("task", TASKS)
def test_batches_are_well_formed(task):
    rng = np.random.default_rng(0)
    inputs, targets, mask = make_batch(task, 4, 80, rng, 128)
    assert inputs.shape == targets.shape == mask.shape == (4, 80)
    assert (inputs[:, 1:] == targets[:, :-1]).all()  # targets are the inputs shifted by one
    assert mask.sum(-1).min() > 0
    if task == "mqar":
        return
    for seq, tgt, m in zip(inputs, targets, mask):
        needle_at = np.flatnonzero(seq == NEEDLE)
        assert len(needle_at) == 1 and (seq == QUERY).sum() == 1
        answer = tgt[m]
        # the answer is written right after the needle marker (and its key)
        start = needle_at[0] + 1 + (0 if task == "passkey" else 2)
        assert (seq[start : start + len(answer)] == answer).all()
        alphabet = {"passkey": DIGITS, "number": DIGITS, "uuid": HEX}.get(task)
        if alphabet is not None:
            assert np.isin(answer, alphabet).all()
    if task == "uuid":  # hex letters too, not only digits (all 32 digits: p = (10/16)^32)
        assert not np.isin(targets[mask], DIGITS).all()


def test_answered_and_errors():
    targets = np.array([[5, 6, 7]])
    mask = np.array([[False, True, True]])
    logits = np.eye(10)[[[1, 6, 7]]]
    assert answered(logits, targets, mask).tolist() == [True]
    logits = np.eye(10)[[[5, 6, 8]]]
    assert answered(logits, targets, mask).tolist() == [False]
    with pytest.raises(ValueError, match="too short"):
        make_batch("number", 1, 10, np.random.default_rng(0), 128)
    with pytest.raises(ValueError, match="unknown task"):
        make_batch("haystack", 1, 100, np.random.default_rng(0), 128)


def test_block_evaluation_equals_one_pass_and_cli(tmp_path):
    mx.random.seed(0)
    model = TitansLM(TitansLMConfig(variant="mag", vocab_size=128, dim=32, layers=2, heads=2, window=8,
                                  memory=dict(chunk_size=4)))
    inputs = mx.array(make_batch("passkey", 2, 50, np.random.default_rng(1), 128)[0])
    assert mx.allclose(answer_logits(model, inputs, 40, 16), model(inputs)[:, 40:], atol=5e-4)  # BLAS summation order
    assert 0.0 <= accuracy(model, "passkey", 50, 4, 2, 0, 16) <= 1.0
    save_model(tmp_path / "m", model)
    main(["--models", str(tmp_path / "m"), "--tasks", "passkey", "mqar", "--lengths", "40", "60",
          "--samples", "2", "--block", "16", "--out", str(tmp_path / "niah.json")])
    assert (tmp_path / "niah.png").stat().st_size > 0
    for memory, same in (({"max_decay": 1.0}, True), ({"max_decay": 0.0}, False)):  # run with other memory settings
        slowed = load_model(tmp_path / "m", memory=memory)
        assert slowed.layers[0].memory.config.max_decay == memory["max_decay"]
        assert mx.allclose(slowed(inputs), model(inputs), atol=1e-5) == same
    main(["--models", str(tmp_path / "m"), "--tasks", "passkey", "--lengths", "40", "--samples", "2",
          "--memory", '{"max_decay": 0}', "--out", str(tmp_path / "slowed.json")])
    assert json.loads((tmp_path / "slowed.json").read_text())["rows"][0]["memory"] == {"max_decay": 0}
    with pytest.raises(SystemExit):
        main(["--models", str(tmp_path / "m"), "--memory", "{max_decay", "--out", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="unknown fields"):
        main(["--models", str(tmp_path / "m"), "--memory", '{"max_decy": 0}', "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
