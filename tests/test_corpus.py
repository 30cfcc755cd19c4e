"""The qwen base pipeline at a tiny scale: tokenizer and random model folders that mlx-lm loads, jsonl rows of about
seq_len tokens with text needle rows, and mlx-lm's full fine-tune + fuse on them (benchmarks.qwen_base)."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.utils import load_tokenizer

from benchmarks.qwen_base import main
from mlx_titans.corpus import load_hf_tokenizer, write_data

PARAGRAPHS = [
    "The river ran low that summer, and the miller's boy walked its banks every morning. He counted the herons, "
    "he named the stones, and he wondered where the water went when it left the valley.",
    "Lanterns hung along the harbour wall. Sailors argued about the weather, the price of rope and the captain's "
    "temper; nobody agreed, and everybody stayed until the tide turned!",
    "She opened the letter twice before reading it. Was it good news? The paper smelled of pine and ink, and the "
    "handwriting leaned forward as if in a hurry to arrive.",
]
SEQ_LEN = 320
SIZES = ["hidden_size=64", "num_hidden_layers=2", "intermediate_size=128", "head_dim=16"]


def books(folder, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "book.txt").write_text("\n\n".join(PARAGRAPHS[i] for i in rng.integers(0, 3, 120)))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_base")
    books(root / "books" / "train", 0)
    books(root / "books" / "valid", 1)
    args = [
        "--work",
        str(root / "work"),
        "--data",
        str(root / "books"),
        "--vocab-size",
        "1024",
        "--sizes",
        *SIZES,
        "--seq-len",
        str(SEQ_LEN),
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--tokens",
        str(12 * SEQ_LEN),
        "--valid-tokens",
        str(4 * SEQ_LEN),
        "--needle-fraction",
        "0.5",
        "--steps-per-report",
        "1",
        "--val-batches",
        "1",
    ]
    assert main(args) == 0
    return root, args


def rows(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_tokenizer_folder_round_trips(work):
    tokenizer = load_tokenizer(work[0] / "work" / "tokenizer")
    text = "The miller's boy — naïve, 42 herons — waded in.\n\nWhat next?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0


def test_random_model_loads(work):
    model, tokenizer = load(str(work[0] / "work" / "model"))
    config = json.loads((work[0] / "work" / "model" / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["tie_word_embeddings"] and config["model_type"] == "qwen3"
    logits = model(mx.array([tokenizer.encode("The river ran low.")]))
    assert logits.shape == (1, len(tokenizer.encode("The river ran low.")), config["vocab_size"])
    assert config["vocab_size"] == len(load_hf_tokenizer(work[0] / "work" / "tokenizer"))


def test_rows_have_about_seq_len_tokens_and_repeat_by_seed(work, tmp_path):
    root = work[0]
    tokenizer = load_tokenizer(root / "work" / "tokenizer")
    summary = json.loads((root / "work" / "data" / "summary.json").read_text())
    assert summary["train"]["rows"] == 12 and summary["valid"]["rows"] == 4
    for split in ("train", "valid"):
        lengths = [len(tokenizer.encode(t)) for t in rows(root / "work" / "data" / f"{split}.jsonl")]
        assert all(SEQ_LEN - 8 <= n <= SEQ_LEN for n in lengths), lengths
    write_data(
        tmp_path / "again",
        load_hf_tokenizer(root / "work" / "tokenizer"),
        root / "books" / "train",
        root / "books" / "valid",
        SEQ_LEN,
        12 * SEQ_LEN,
        4 * SEQ_LEN,
        0.5,
        0,
    )
    assert (tmp_path / "again" / "train.jsonl").read_text() == (root / "work" / "data" / "train.jsonl").read_text()


def test_needle_rows_hold_question_and_answer(work):
    root = work[0]
    texts = rows(root / "work" / "data" / "train.jsonl")
    needles = [t for t in texts if "\n\nWhat " in t]
    assert len(needles) == json.loads((root / "work" / "data" / "summary.json").read_text())["train"]["needle_rows"]
    assert needles
    for text in needles:
        hay, question, answer = re.fullmatch(r"(.*)\n\n(What [^?]*\?)( The .*\.)", text, re.S).groups()
        values = re.findall(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}|\d{5,}", answer)
        assert values and all(v in hay for v in values), (question, answer)


@pytest.mark.benchmark
def test_train_and_fuse_write_a_model_mlx_lm_loads(work, tmp_path, capsys):
    root, args = work
    assert main([*args, "train", "fuse"]) == 0
    model, tokenizer = load(str(root / "work" / "base"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, len(tokenizer.vocab))
    random, _ = load(str(root / "work" / "model"))
    trained = model.model.embed_tokens.weight
    assert not mx.array_equal(trained, random.model.embed_tokens.weight)  # every weight is trained, not only layers
    assert main([*args, "--seq-len", "256"]) == 1
    assert main([*args, "nope"]) == 1
    assert main(["--work", str(tmp_path / "fresh"), "model"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-3].startswith("error: ") and "seq_len" in err[-3] and err[-2].startswith("error: unknown stage")
    assert err[-1].startswith("error: the model stage needs")
