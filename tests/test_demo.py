"""The demo that ships: `--model demo-qwen` names a folder inside the package (EMBEDDED_MODELS), a small Qwen3
pretrained here with trained memory adapters fused in (docs/adapters.md says how it was made)."""

from pathlib import Path

import numpy as np

from mlx_titans import generate, load
from mlx_titans.generate import EMBEDDED_MODELS, main
from mlx_titans.qwen import load as load_titans_qwen


def test_a_named_model_is_the_package_folder_unless_a_local_path_has_its_name(
    titans_qwen, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(EMBEDDED_MODELS, "demo-qwen", titans_qwen)
    monkeypatch.chdir(tmp_path)
    model, _ = load("demo-qwen")
    assert model.titans.window == 16
    assert main(["--model", "demo-qwen", "-p", "hello", "-m", "2", "--ignore-chat-template"]) == 0
    (tmp_path / "demo-qwen").mkdir()  # a local folder of that name comes first: this one holds no model
    capsys.readouterr()
    assert main(["--model", "demo-qwen", "-p", "hello", "-m", "2"]) == 1
    assert capsys.readouterr().err.startswith("error: no model at demo-qwen")
    monkeypatch.setitem(EMBEDDED_MODELS, "demo-qwen", tmp_path / "not-installed")
    monkeypatch.chdir(tmp_path / "demo-qwen")
    assert main(["--model", "demo-qwen", "-p", "hello", "-m", "2"]) == 1
    assert (
        capsys.readouterr().err
        == "error: this install has no embedded demo-qwen model; pass a model folder or Hub id\n"
    )


STORY = Path(__file__).parents[1] / "examples" / "story.txt"
QUESTION = "What is the special magic number?"
NUMBER = "5183927"
OTHER_NUMBERS = [str(n) for n in np.random.default_rng(1).integers(1_000_000, 10_000_000, 8)]


def test_the_demo_recalls_a_magic_number_far_beyond_its_window_through_its_memory(capsys):
    """The 7-digit number sits 55 tokens into a 603-token story; the window is 32 tokens (4 sinks beside it), so the
    question comes 17x the window after it. Greedy, the demo answers with the number, and with most other numbers
    put in its place; with the memory's test-time updates off (the same weights, the memory frozen at its learned
    initial state) with none: the memory, not the gates or the window, carries it."""
    folder = EMBEDDED_MODELS["demo-qwen"]
    model, tokenizer, config = load_titans_qwen(folder)
    story = STORY.read_text()
    behind = len(tokenizer.encode(story)) - len(tokenizer.encode(story[: story.index(" The special magic")]))
    assert behind > 16 * config["titans"]["window"]
    capsys.readouterr()
    assert main(["--model", "demo-qwen", "--file", str(STORY), "-p", QUESTION, "-m", "20"]) == 0
    assert f"The special magic number is {NUMBER}." in capsys.readouterr().out
    frozen, _, _ = load_titans_qwen(folder, memory={"max_lr": 0.0, "max_decay": 0.0})
    recalled = {"on": 0, "off": 0}
    for number in OTHER_NUMBERS:
        prompt = story.replace(NUMBER, number).rstrip("\n") + "\n\n" + QUESTION
        recalled["on"] += number in generate(model, tokenizer, prompt, max_tokens=20)
        recalled["off"] += number in generate(frozen, tokenizer, prompt, max_tokens=20)
    assert recalled["on"] >= 6 and recalled["off"] == 0, recalled
