"""python -m mlx_titans.generate on TitansLM checkpoints (the TitansQwen path is in test_qwen.py)."""

from mlx_titans.generate import main
from mlx_titans.model import TitansLMConfig, TitansLM, save_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generates_and_prints_stats(checkpoint, capsys):
    code, out, err = run(capsys, "--model", checkpoint / "mac", "-p", "hello there", "-m", "6")
    assert code == 0
    assert "Prompt: 11 tokens" in out and "Generation: 6 tokens" in out and "Peak memory" in out


def test_long_file_context_with_progress(checkpoint, capsys, tmp_path):
    (tmp_path / "book.txt").write_text("It was a dark and stormy night. " * 40)
    code, out, err = run(
        capsys,
        "--model",
        checkpoint / "mac",
        "--file",
        tmp_path / "book.txt",
        "-p",
        "Then",
        "-m",
        "3",
        "--prefill-step-size",
        "64",
    )
    assert code == 0 and "prefill" in err


def test_memory_state_out_then_in_equals_one_run(checkpoint, capsys, tmp_path):
    model = checkpoint / "mac"
    a, b = "The pass key is 71234. ", "Remember it. What is the pass key? The pass key is"
    _, whole, _ = run(capsys, "--model", model, "-p", a + b, "-m", "8", "--verbose", "False")
    assert (
        run(
            capsys,
            "--model",
            model,
            "-p",
            a,
            "-m",
            "0",
            "--verbose",
            "False",
            "--memory-state-out",
            tmp_path / "s.safetensors",
        )[0]
        == 0
    )
    _, resumed, _ = run(
        capsys,
        "--model",
        model,
        "-p",
        b,
        "-m",
        "8",
        "--verbose",
        "False",
        "--memory-state-in",
        tmp_path / "s.safetensors",
    )
    assert resumed == whole


def test_bad_inputs_give_one_line_and_nonzero_exit(checkpoint, capsys, tmp_path):
    model = checkpoint / "mac"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("   ")
    other = TitansLM(TitansLMConfig(variant="swa", vocab_size=256, dim=32, layers=1, heads=2, window=8))
    save_model(tmp_path / "other", other, tokenizer_file=checkpoint / "tokenizer.json")
    run(capsys, "--model", tmp_path / "other", "-p", "x", "-m", "0", "--memory-state-out", tmp_path / "o.st")
    cases = [
        (["--model", tmp_path / "nope", "-p", "hi"], "no model at"),
        (["--model", model, "-p", ""], "empty prompt"),
        (["--model", model, "--file", tmp_path / "empty.txt"], "is empty"),
        (["--model", model, "--file", tmp_path / "missing.txt"], "no such file"),
        (["--model", model, "--file", tmp_path / "latin1.txt"], "not UTF-8"),
        (["--model", model, "-p", "x" * 50, "--max-context", "20"], "over --max-context 20"),
        (["--model", model, "-p", "hi", "--memory-state-in", tmp_path / "o.st"], "another config"),
        (["--model", model, "-p", "hi", "--window", "16"], "--window applies to TitansQwen"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 1, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, err)


def test_unknown_hub_id_offline_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLX_TITANS_CACHE", str(tmp_path))
    code, out, err = run(capsys, "--model", "no-such-org/no-such-model", "-p", "hi")
    assert code == 1
    assert err.strip().startswith("error: no-such-org/no-such-model is not a local directory")
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing half-converted


def test_titans_qwen_generation_and_state_round_trip(capsys, tmp_path):
    from mlx_titans.qwen.convert import convert
    from mlx_titans.qwen.random_model import make_tiny_qwen

    hf = make_tiny_qwen(tmp_path / "hf", "qwen2")
    convert(
        hf,
        tmp_path / "q",
        quantize=True,
        titans={
            "memory_layers": [1],
            "window": 16,
            "segment_size": 16,
            "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
        },
    )
    model = tmp_path / "q"
    code, out, _ = run(capsys, "--model", model, "-p", "The quick brown fox", "-m", "5", "--ignore-chat-template")
    assert code == 0 and "Generation:" in out
    (tmp_path / "doc.txt").write_text("Titans neural memory learns at test time. " * 30)
    code, _, _ = run(
        capsys,
        "--model",
        model,
        "--file",
        tmp_path / "doc.txt",
        "-m",
        "2",
        "--window",
        "8",
        "--memory-state-out",
        tmp_path / "s.safetensors",
    )
    assert code == 0
    code, _, err = run(
        capsys, "--model", model, "-p", "again", "-m", "2", "--memory-state-in", tmp_path / "s.safetensors"
    )  # saved with window 8, loaded with 16
    assert code == 1 and "another model" in err


def test_verbose_streams_the_text_it_would_print(checkpoint, capsys):
    """--verbose prints the reply token by token through mlx-lm's streaming detokenizer; the text must be what the
    quiet run prints in one piece (greedy, so both runs generate the same tokens)."""
    argv = ("--model", checkpoint / "mac", "-p", "hello there", "-m", "40", "--temp", "0")
    _, quiet, _ = run(capsys, *argv, "--verbose", "False")
    _, loud, _ = run(capsys, *argv)
    streamed = loud.split("=" * 10 + "\n", 1)[1].rsplit("\n" + "=" * 10 + "\n", 1)[0]
    assert len(quiet) > 20 and streamed == quiet[:-1]
