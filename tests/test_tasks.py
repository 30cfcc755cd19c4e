import numpy as np
import pytest

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
