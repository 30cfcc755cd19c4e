import os
from pathlib import Path

import numpy as np
import pytest

from mlx_titans.text_needles import TASKS, is_answered, make_haystack, make_sample, read_haystack, training_row

TEXT = " ".join(
    f"Sentence number {i} of the story tells of {w} things. Was it {w}? It was!"
    for i, w in enumerate(["green", "quiet", "distant", "small", "red", "old"] * 60)
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT],
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return make_haystack(tokenizer.encode(TEXT), tokenizer)


@pytest.mark.parametrize("task", TASKS)
def test_sample_has_its_length_needles_and_question(task, tokenizer, haystack):
    rng = np.random.default_rng(1)
    sample = make_sample(task, tokenizer, haystack, 300, 0.5, rng)
    assert len(sample.prompt) == 300
    text = tokenizer.decode(sample.prompt)
    assert text.endswith("?") and "\n\nWhat" in text
    for value in sample.values:
        assert value in text and value in sample.answer
    assert is_answered(sample.answer, sample.values)
    assert not is_answered(sample.answer.replace(sample.values[-1], "0"), sample.values)
    needles = {"multikey": 4, "multivalue": 4}.get(task, 1)
    assert text.count("special magic" if task != "passkey" else "pass key is") == needles + (task != "passkey")


def test_depth_places_the_needle_at_a_sentence_end(tokenizer, haystack):
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        sample = make_sample("number", tokenizer, haystack, 400, depth, np.random.default_rng(3))
        before = tokenizer.decode(sample.prompt[: sample.needle_index])
        after = tokenizer.decode(sample.prompt[sample.needle_index :])
        assert after.startswith(" The special magic number is " + sample.values[0] + ".")
        assert before == "" or before.rstrip().endswith((".", "?", "!")) or depth == 0
        positions.append(sample.needle_index / 400)
    assert positions == sorted(positions)
    assert positions[0] < 0.1 and positions[-1] > 0.8


def test_training_row_supervises_exactly_the_answer(tokenizer, haystack):
    rng = np.random.default_rng(0)
    for task in TASKS:
        inputs, targets, mask = training_row(task, tokenizer, haystack, 512, rng)
        assert inputs.shape == targets.shape == mask.shape == (512,)
        assert (inputs[1:] == targets[:-1]).all()
        answer = tokenizer.decode(targets[mask].tolist())
        assert answer.startswith(" The") and answer.endswith(".")
        assert mask[-1] and mask.sum() == len(tokenizer.encode(answer))
        assert not mask[: 512 - mask.sum()].any()


def test_bad_input_is_one_clear_error(tokenizer, haystack):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown text needle task"):
        make_sample("word", tokenizer, haystack, 300, 0.5, rng)
    with pytest.raises(ValueError, match="too short"):
        make_sample("uuid", tokenizer, haystack, 20, 0.5, rng)
    with pytest.raises(ValueError, match="depth"):
        make_sample("number", tokenizer, haystack, 300, 1.5, rng)
    with pytest.raises(ValueError, match="haystack has"):
        make_sample("number", tokenizer, make_haystack(haystack.ids[:50], tokenizer), 300, 0.5, rng)


def test_qwen3_tokenizer(tmp_path):
    """With Qwen3's own tokenizer: the prompt's ids re-encode to themselves around the needle (no merge across a
    piece boundary), and the value is in the decoded prompt."""
    folder = os.environ.get("MLX_TITANS_QWEN3_TOKENIZER")
    if not folder:
        pytest.skip("set MLX_TITANS_QWEN3_TOKENIZER to Qwen3's tokenizer folder (.ci/run does)")
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(folder))
    (tmp_path / "story.txt").write_text(TEXT)
    haystack = read_haystack(tmp_path, tokenizer)
    sample = make_sample("number", tokenizer, haystack, 2000, 0.3, np.random.default_rng(0))
    around = sample.prompt[sample.needle_index - 20 : sample.needle_index + 30]
    assert tokenizer.encode(tokenizer.decode(around), add_special_tokens=False) == around
    assert sample.values[0] in tokenizer.decode(sample.prompt)
