"""The Python API as mlx-lm's: mlx_titans.load / generate / stream_generate for both model kinds, memory states in
and out through `prompt_cache`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_titans import generate, load, load_cache_file, save_cache_file, stream_generate
from mlx_titans.generate import main

TEXT = "Titans neural memory learns at test time. The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(params=["titans_lm", "titans_qwen"])
def model_path(request, checkpoint, titans_qwen):
    return checkpoint / "mac" if request.param == "titans_lm" else titans_qwen


def test_generate_equals_the_command_line(model_path, capsys):
    """Greedy, the library's reply is the text the command line streams (both through mlx-lm's detokenizer: the
    tiny Qwen's random weights pick ids its tokenizer never learnt, which only a streaming detokenizer shows)."""
    argv = ["--model", str(model_path), "-p", TEXT, "-m", "12", "--ignore-chat-template"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out.split("=" * 10 + "\n", 1)[1].rsplit("\n" + "=" * 10 + "\n", 1)[0]
    model, tokenizer = load(model_path)
    assert generate(model, tokenizer, TEXT, max_tokens=12) == streamed


def tokens(model, tokenizer, prompt, max_tokens, cache=None):
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache)]


def test_state_out_then_in_equals_one_run(model_path, tmp_path):
    """A cache after a call holds the prompt and the whole reply: saved, loaded and continued with the next prompt, it
    generates what one call over prompt 1 + reply 1 + prompt 2 does."""
    model, tokenizer = load(model_path)
    first, second = tokenizer.encode(TEXT), tokenizer.encode("What did the fox do? It")
    cache = model.make_cache()
    reply = tokens(model, tokenizer, first, 3, cache)
    save_cache_file(tmp_path / "state.safetensors", model, cache)
    resumed = tokens(model, tokenizer, second, 8, load_cache_file(tmp_path / "state.safetensors", model))
    assert resumed == tokens(model, tokenizer, first + reply + second, 8)


def test_load_refuses_clearly(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no model at"):
        load(tmp_path / "nope")
    with pytest.raises(ValueError, match="apply to TitansQwen"):
        load(checkpoint / "mac", window=8)
    shutil.copytree(checkpoint / "mac", tmp_path / "mac")
    (tmp_path / "mac" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load(tmp_path / "mac")


def test_the_generate_command_runs_without_warnings(checkpoint):
    """mlx_titans imports the generate command's module before binding the function `generate` (see __init__), so
    python -m mlx_titans.generate runs that module twice; runpy's warning about it must not reach the user."""
    argv = ["-m", "mlx_titans.generate", "--model", checkpoint / "mac", "-p", "hi", "-m", "2", "--verbose", "False"]
    run = subprocess.run(
        [sys.executable, "-W", "default", *map(str, argv)],
        cwd=Path(__file__).resolve().parents[1],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stderr == "" and run.stdout.strip()


def test_load_takes_a_training_run_folder(checkpoint, tmp_path):
    """load(), as the command line, runs a training run folder's newest checkpoint."""
    shutil.copytree(checkpoint / "mac", tmp_path / "run" / "step-00000001")
    shutil.copytree(checkpoint / "mac", tmp_path / "run" / "step-00000003")
    expected = generate(*load(checkpoint / "mac"), TEXT, max_tokens=6)
    assert generate(*load(tmp_path / "run"), TEXT, max_tokens=6) == expected
