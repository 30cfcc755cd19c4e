"""python -m mlx_titans.generate on TitansLM checkpoints (the TitansQwen path is in test_qwen.py)."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mlx_titans.generate import main
from mlx_titans.model import TitansLMConfig, TitansLM, save_model

generate = sys.modules["mlx_titans.generate"]  # the command's module (mlx_titans.generate is also the function)


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

    template = model / "chat_template.jinja"
    template.write_text("{{ preamble | default('') }}" + template.read_text())
    argv = ("--model", model, "-p", "hi", "-m", "1")
    extra = ("--chat-template-config", '{"preamble": "Be brief."}')
    prompt = [run(capsys, *argv, *more)[1].split("Prompt: ")[1].split()[0] for more in ((), extra)]
    assert int(prompt[1]) > int(prompt[0])  # the template saw the preamble
    one_error_line(*run(capsys, *argv, "--extra-eos-token", "<no such token>")[::2], "is not a token")


def test_verbose_streams_the_text_it_would_print(checkpoint, capsys):
    """--verbose prints the reply token by token through mlx-lm's streaming detokenizer; the text must be what the
    quiet run prints in one piece (greedy, so both runs generate the same tokens)."""
    argv = ("--model", checkpoint / "mac", "-p", "hello there", "-m", "40", "--temp", "0")
    _, quiet, _ = run(capsys, *argv, "--verbose", "False")
    _, loud, _ = run(capsys, *argv)
    streamed = loud.split("=" * 10 + "\n", 1)[1].rsplit("\n" + "=" * 10 + "\n", 1)[0]
    assert len(quiet) > 20 and streamed == quiet[:-1]


def one_error_line(code, err, message, expected_code=1):
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_damaged_checkpoints_and_bad_flags_end_in_one_line_before_any_work(checkpoint, capsys, tmp_path, monkeypatch):
    def broken(name, damage):
        folder = tmp_path / name
        shutil.copytree(checkpoint / "mac", folder)
        damage(folder)
        return folder

    corrupt = broken("corrupt", lambda f: (f / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"))
    no_tok = broken("no_tok", lambda f: (f / "tokenizer.json").unlink())
    bad_json = broken("bad_json", lambda f: (f / "config.json").write_text('{"model_type": "titans", "dim": '))
    bad_type = broken("bad_type", lambda f: (f / "config.json").write_text('{"model_type": "titans", "dim": "32"}'))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "book.txt").write_text("It was a dark and stormy night. " * 40)

    def no_prefill(*args):
        raise AssertionError("the error must come before the prefill")

    monkeypatch.setattr(generate, "prefill", no_prefill)
    model = checkpoint / "mac"
    book = ["--model", model, "--file", tmp_path / "book.txt"]
    cases = [
        (["--model", corrupt, "-p", "hi"], "is not a readable safetensors file"),
        (["--model", no_tok, "-p", "hi"], "tokenizer.json does not exist"),
        (["--model", bad_json, "-p", "hi"], "config.json is not valid JSON"),
        (["--model", bad_type, "-p", "hi"], "dim must be int"),
        ([*book, "--memory-state-out", tmp_path / "folder"], "is a folder"),
        ([*book, "--memory-state-out", tmp_path / "a_file" / "s.safetensors"], "is a file, not a folder"),
        ([*book, "--temp", "-1"], "--temp must be >= 0"),
        ([*book, "--top-p", "5"], "--top-p must be in [0, 1]"),
        ([*book, "--max-tokens", "-1"], "--max-tokens must be >= 0"),
        ([*book, "--repetition-penalty", "0"], "--repetition-penalty must be positive"),
        ([*book, "--verbose", "no"], "--verbose takes True/T or False/F"),
        ([*book, "--chat-template-config", "{oops"], "--chat-template-config is not valid JSON"),
        ([*book, "--chat-template-config", "[1]"], "must be a JSON object"),
        (["--model", model, "-p", "hi", "--chat-template-config", "{}"], "applies to TitansQwen"),
        (["--model", model, "-p", "hi", "--extra-eos-token", "no-such-token"], "is not a token"),
        (["--model", model, "--file", tmp_path / "folder"], "is a folder"),
        (["--model", tmp_path / "folder", "-p", "hi"], "no model at"),
    ]
    for argv, message in cases:
        one_error_line(*run(capsys, *argv)[::2], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["corrupt", "no_tok", "bad_json", "bad_type", "a_file", "folder", "book.txt"]
    )  # nothing written
    assert not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("value", ["F", "f", "false", "FALSE"])
def test_verbose_false_as_mlx_lm_reads_it(checkpoint, capsys, value):
    code, out, _ = run(capsys, "--model", checkpoint / "mac", "-p", "hello", "-m", "4", "--verbose", value)
    assert code == 0 and "Generation:" not in out and "=" * 10 not in out


def test_ctrl_c_is_one_line_and_exit_130(checkpoint, capsys, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "prefill", interrupted)
    (tmp_path / "book.txt").write_text("It was a dark and stormy night. " * 40)
    out = tmp_path / "s.safetensors"
    argv = ["--model", checkpoint / "mac", "--file", tmp_path / "book.txt", "--memory-state-out", out]
    one_error_line(*run(capsys, *argv)[::2], "interrupted", 130)
    assert list(tmp_path.iterdir()) == [tmp_path / "book.txt"]


def test_a_training_run_folder_runs_its_newest_checkpoint(checkpoint, capsys, tmp_path):
    shutil.copytree(checkpoint / "mac", tmp_path / "run" / "step-00000001")
    other = TitansLM(TitansLMConfig(variant="swa", vocab_size=256, dim=32, layers=1, heads=2, window=8))
    save_model(tmp_path / "run" / "step-00000002", other, tokenizer_file=checkpoint / "tokenizer.json")
    argv = ("-p", "hello", "-m", "5", "--verbose", "False")
    _, newest, _ = run(capsys, "--model", tmp_path / "run" / "step-00000002", *argv)
    code, from_run, _ = run(capsys, "--model", tmp_path / "run", *argv)
    assert code == 0 and from_run == newest


def test_sampling_flags_and_extra_eos(checkpoint, capsys):
    model = checkpoint / "mac"
    argv = ("--model", model, "-p", "hello there", "--verbose", "False")
    _, greedy, _ = run(capsys, *argv, "-m", "3")
    code, sampled, _ = run(capsys, *argv, "-m", "3", "--temp", "1", "--top-k", "5", "--min-p", "0.05", "--seed", "1")
    assert code == 0 and len(sampled.strip("\n")) <= 3
    _, again, _ = run(capsys, *argv, "-m", "3", "--temp", "1", "--top-k", "5", "--min-p", "0.05", "--seed", "1")
    assert again == sampled  # seeded
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    first = tokenizer.encode(greedy[0]).ids[0]
    for eos in (tokenizer.id_to_token(first), str(first)):  # as text or as id, as mlx_lm.generate takes it
        code, out, _ = run(capsys, *argv, "-m", "3", "--extra-eos-token", eos)
        assert code == 0 and out == "\n"


def test_the_embedded_default_model_writes_on_reproducibly(capsys):
    """The README's first command: greedy, the default model repeats one sentence; its own sampling defaults (seeded)
    give text that does not loop, the same at every run."""
    code, text, _ = run(capsys, "--prompt", "It was a dark and stormy night", "--verbose", "F")
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    assert code == 0 and len(words) > 40 and len(set(grams)) > 0.9 * len(grams), text
    assert run(capsys, "--prompt", "It was a dark and stormy night", "--verbose", "F")[1] == text


def test_ctrl_c_as_a_user_presses_it(checkpoint, tmp_path):
    """SIGINT to the command as typed, while it generates: one line on stderr, exit status 130, no state file."""
    out = tmp_path / "s.safetensors"
    argv = ["--model", checkpoint / "mac", "-p", "hello", "-m", "100000", "--memory-state-out", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_titans.generate", *map(str, argv)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "=" * 10 + "\n"  # generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == ["error: interrupted; nothing written"], err
    assert not out.exists()


def test_a_file_and_a_prompt_join_with_one_blank_line(tmp_path):
    """As the text needles are written (haystack, a blank line, the question): a file's own last newline must not
    make it two."""
    from types import SimpleNamespace

    from mlx_titans.generate import read_context

    for ending in ("", "\n", "\r\n", "\n\n"):
        (tmp_path / "doc.txt").write_text("Once upon a time." + ending, newline="")
        args = SimpleNamespace(prompt="What then?", file=tmp_path / "doc.txt")
        assert read_context(args) == "Once upon a time.\n\nWhat then?"
    assert read_context(SimpleNamespace(prompt=None, file=tmp_path / "doc.txt")) == "Once upon a time.\n\n"
