"""Fuzz tests: every file loader and command line, fed damaged files (truncated, random or flipped bytes, JSON with
fields missing or of the wrong type) and odd flag values. A loader either loads or raises ValueError / OSError saying
why; a command line ends in success, in one `error:` line with exit status 1, or in argparse's usage error
(exit 2); never a traceback, never a half-written output. Seeded, tiny models, a bounded number of cases."""

import copy
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mlx_titans import MemoryConfig, NeuralMemory, load_state, save_state
from mlx_titans.adapt import main as adapt
from mlx_titans.files import save_safetensors_atomic
from mlx_titans.fuse import main as fuse
from mlx_titans.generate import main as generate
from mlx_titans.model import TitansLM, TitansLMConfig, load_model, save_model
from mlx_titans.prompt_cache import load_cache_file, save_cache_file
from mlx_titans.qwen import load as load_qwen
from mlx_titans.qwen.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, adapter_weights, make_trainable
from mlx_titans.qwen.convert import convert
from mlx_titans.qwen.convert import main as convert_main
from mlx_titans.qwen.random_model import make_tiny_qwen
from mlx_titans.tokenizer import EOS
from mlx_titans.train import main as train
from mlx_titans.train import read_trainer_state

REPO = Path(__file__).resolve().parents[1]
CASES = 10  # JSON fields mutated per file, beside 4 texts that are not JSON objects and 7 byte-level damages
ODD_VALUES = ["x", -1, 0, 2.5, None, [], {}, True, [1, "a"], {"a": None}]
ODD_FLAGS = ["-1", "0", "nan", "x", "{", "[]", '{"a": 1}', "", "1.5", "/dev/null/x"]
SMALL = {
    "memory_layers": [1],
    "window": 16,
    "segment_size": 16,
    "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
}


def damaged_bytes(data: bytes, rng) -> list:
    """Empty, truncated (at random, in half, inside the safetensors header), random bytes, and bytes flipped in the
    first 256 (a safetensors header, a JSON head) and anywhere."""
    cuts = [b"", data[: rng.randrange(1, len(data))], data[: len(data) // 2], data[:12], rng.randbytes(40)]
    flipped = []
    for span in (min(256, len(data)), len(data)):
        damaged = bytearray(data)
        for _ in range(4):
            damaged[rng.randrange(span)] ^= 1 << rng.randrange(8)
        flipped.append(bytes(damaged))
    return cuts + flipped


def paths(obj, prefix=()):
    """The key paths of a JSON object, nested objects included."""
    for key, value in obj.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from paths(value, (*prefix, key))


def damaged_json(obj: dict, rng, cases: int = CASES) -> list:
    """Not an object at all, cut short, and `cases` copies with one field deleted or given a value of another type."""
    texts = ["[]", "null", '"config"', json.dumps(obj)[:-1]]
    keys = list(paths(obj))
    for _ in range(cases):
        mutated = copy.deepcopy(obj)
        *parents, key = rng.choice(keys)
        inner = mutated
        for parent in parents:
            inner = inner[parent]
        if rng.random() < 0.25:
            del inner[key]
        else:
            inner[key] = rng.choice(ODD_VALUES)
        texts.append(json.dumps(mutated))
    return texts


def variants(file: Path, rng) -> list:
    """Damaged contents for `file`: structural for JSON, byte-level for anything."""
    data = file.read_bytes()
    structural = [t.encode() for t in damaged_json(json.loads(data), rng)] if file.suffix == ".json" else []
    return structural + damaged_bytes(data, rng)


def each_damaged(folder: Path, name: str, work: Path, rng):
    """Copies of `folder` with `name` damaged, one at a time."""
    for i, content in enumerate(variants(folder / name, rng)):
        copy_ = work / f"{folder.name}-{Path(name).stem}-{i}"
        shutil.copytree(folder, copy_)
        (copy_ / name).write_bytes(content)
        yield copy_


def loads_or_refuses(load, *args):
    """The loader either works or raises ValueError / OSError with a message."""
    try:
        load(*args)
    except (ValueError, OSError) as e:
        assert str(e).strip(), type(e)


def call(main, argv, capsys):
    """main(argv) in process: (exit status, stderr)."""
    try:
        result = main([str(a) for a in argv])
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_clean(code, err, outputs=()):
    """Success, one `error:` line with status 1 (130 on Ctrl-C; after a training's progress bar, if it failed while
    training), or argparse's usage error; no output left behind on failure, nor a temporary file beside it."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if code == 2:
        assert lines and ": error: " in lines[-1], err  # argparse: the usage, then prog: error: ...
    elif code:
        errors = [line for line in lines if "error:" in line]
        assert code in (1, 130) and errors == lines[-1:] and errors[0].startswith("error: "), (code, err)
        for out in map(Path, outputs):
            assert not out.exists(), out
            assert not [p for p in out.parent.glob(f".{out.name}*")], out


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_TITANS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One of each file the package reads: a TitansLM checkpoint and a training run of it, its memory state file, a
    NeuralMemory state, a Hugging Face Qwen, its TitansQwen and an adapters folder for it."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens([EOS])  # id 256: training separates documents with it
    tok.save(str(root / "tokenizer.json"))
    mx.random.seed(0)
    config = TitansLMConfig(
        variant="mac", vocab_size=256, dim=32, layers=2, heads=2, window=8, memory={"chunk_size": 4}
    )
    model = TitansLM(config)
    save_model(root / "lm", model, tokenizer_file=root / "tokenizer.json")
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9]]), cache)
    save_cache_file(root / "lm-state.safetensors", model, cache)

    memory = NeuralMemory(MemoryConfig(dim=16, heads=2, chunk_size=4))
    _, state = memory(mx.random.normal((1, 8, 16)))
    save_state(root / "memory.safetensors", state, memory.config)

    make_tiny_qwen(root / "hf", "qwen2")
    convert(root / "hf", root / "qwen", quantize=True, titans=SMALL)
    qwen, _, _ = load_qwen(root / "qwen")
    make_trainable(qwen)
    (root / "adapters").mkdir()
    save_safetensors_atomic(root / "adapters" / ADAPTER_WEIGHTS, adapter_weights(qwen), {"format": "mlx"})
    (root / "adapters" / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(qwen, 0, 8, 20.0, {})))

    (root / "books").mkdir()
    for i in range(3):
        (root / "books" / f"{i}.txt").write_text("The quick brown fox jumps over the lazy dog. " * (30 + i))
    tiny = ["--dim", "16", "--layers", "1", "--heads", "2", "--window", "8", "--memory", '{"chunk_size": 4}']
    run = ["--data", root / "books", "--tokenizer", root / "tokenizer.json", "--seq-len", "16", "--batch-size", "2"]
    train([str(a) for a in [*run, *tiny, "--steps", "1", "--eval-batches", "1", "--out", root / "run"]])
    return root


def test_titans_lm_checkpoint_files(files, tmp_path, capsys):
    rng = random.Random(1)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        for folder in each_damaged(files / "lm", name, tmp_path, rng):
            loads_or_refuses(load_model, folder)
            out = tmp_path / "out" / f"{folder.name}.safetensors"
            argv = ["--model", folder, "-p", "hello", "-m", "2", "--verbose", "F", "--memory-state-out", out]
            assert_clean(*call(generate, argv, capsys), [out])


def test_memory_state_and_cache_files(files, tmp_path, capsys):
    rng = random.Random(2)
    model = load_model(files / "lm")
    memory_config = MemoryConfig(dim=16, heads=2, chunk_size=4)
    arrays, metadata = mx.load(str(files / "lm-state.safetensors"), return_metadata=True)
    structural = []
    for key in rng.sample(
        sorted(metadata), min(CASES, len(metadata))
    ):  # each metadata entry deleted or garbled, the arrays intact
        garbled = {k: v for k, v in metadata.items() if k != key or rng.random() < 0.5}
        if key in garbled:
            garbled[key] = rng.choice(["", "x", "[]", "{}", "-1", '{"model": "TitansLM"}'])
        structural.append((arrays, garbled))
    for i, (a, m) in enumerate(structural):
        mx.save_safetensors(str(tmp_path / f"meta-{i}.safetensors"), a, metadata=m)
    for i, content in enumerate(damaged_bytes((files / "lm-state.safetensors").read_bytes(), rng)):
        (tmp_path / f"bytes-{i}.safetensors").write_bytes(content)
    for i, content in enumerate(damaged_bytes((files / "memory.safetensors").read_bytes(), rng)):
        (tmp_path / f"memory-{i}.safetensors").write_bytes(content)
        loads_or_refuses(load_state, tmp_path / f"memory-{i}.safetensors", memory_config)
    for state in [*tmp_path.glob("meta-*"), *tmp_path.glob("bytes-*")]:
        loads_or_refuses(load_cache_file, state, model)
        argv = ["--model", files / "lm", "-p", "again", "-m", "2", "--verbose", "F", "--memory-state-in", state]
        assert_clean(*call(generate, argv, capsys))


def test_titans_qwen_folder_and_adapters(files, tmp_path, capsys):
    rng = random.Random(3)
    for name in ("config.json", "titans_memory.safetensors", "model.safetensors"):
        for folder in each_damaged(files / "qwen", name, tmp_path, rng):
            loads_or_refuses(load_qwen, folder)
            argv = ["--model", folder, "-p", "hi", "-m", "2", "--verbose", "F", "--ignore-chat-template"]
            assert_clean(*call(generate, argv, capsys))
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        for i, folder in enumerate(each_damaged(files / "adapters", name, tmp_path, rng)):
            loads_or_refuses(lambda path: load_qwen(files / "qwen", adapter_path=path), folder)
            out = tmp_path / f"fused-{name}-{i}"
            argv = ["--model", files / "qwen", "--adapter-path", folder, "--save-path", out]
            assert_clean(*call(fuse, argv, capsys), [out])


def test_training_run_and_its_state_files(files, tmp_path, capsys):
    rng = random.Random(4)
    checkpoint = next((files / "run").glob("step-*"))
    for name in ("trainer_state.json", "optimizer.safetensors", "model.safetensors"):
        for i, content in enumerate(variants(checkpoint / name, rng)):
            run = tmp_path / f"{Path(name).stem}-{i}"
            shutil.copytree(files / "run", run)
            (next(run.glob("step-*")) / name).write_bytes(content)
            if name == "trainer_state.json":
                loads_or_refuses(read_trainer_state, next(run.glob("step-*")))
            assert_clean(*call(train, ["--resume", run, "--out", run, "--steps", "2"], capsys))
            assert_clean(*call(generate, ["--model", run, "-p", "hi", "-m", "2", "--verbose", "F"], capsys))


def test_hugging_face_source_of_convert(files, tmp_path, capsys):
    rng = random.Random(5)
    for name in ("config.json", "model.safetensors"):
        for i, folder in enumerate(each_damaged(files / "hf", name, tmp_path, rng)):
            out = tmp_path / f"converted-{folder.name}"
            assert_clean(*call(convert_main, ["--hf-path", folder, "--mlx-path", out, "-q"], capsys), [out])


def odd_command_lines(parser_flags: list, base: list, rng, cases: int) -> list:
    """`base` with one or two of the flags given an odd value."""
    lines = []
    for _ in range(cases):
        extra = []
        for flag in rng.sample(parser_flags, rng.choice([1, 2])):
            extra += [flag, rng.choice(ODD_FLAGS)]
        lines.append(base + extra)
    return lines


def test_odd_flag_values(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an odd value can be a fine relative output path: --memory-state-out 0
    rng = random.Random(6)
    commands = {
        generate: (
            [
                "--max-tokens",
                "--temp",
                "--top-p",
                "--min-p",
                "--top-k",
                "--repetition-penalty",
                "--seed",
                "--verbose",
                "--max-context",
                "--prefill-step-size",
                "--file",
                "--memory-state-in",
                "--memory-state-out",
                "--chat-template-config",
                "--extra-eos-token",
                "--window",
            ],
            ["--model", files / "lm", "-p", "hello", "-m", "2", "--verbose", "F"],
        ),
        train: (
            [
                "--steps",
                "--batch-size",
                "--seq-len",
                "--lr",
                "--warmup",
                "--dim",
                "--layers",
                "--heads",
                "--window",
                "--memory",
                "--memory-layers",
                "--variant",
                "--dtype",
                "--eval-every",
                "--config",
                "--task-kwargs",
            ],
            [
                "--data",
                files / "books",
                "--tokenizer",
                files / "tokenizer.json",
                "--out",
                tmp_path / "run",
                "--dim",
                "16",
                "--layers",
                "1",
                "--heads",
                "2",
                "--window",
                "8",
                "--memory",
                '{"chunk_size": 4}',
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--eval-batches",
                "1",
            ],
        ),
        adapt: (
            [
                "--iters",
                "--batch-size",
                "--sample-length",
                "--learning-rate",
                "--needle-fraction",
                "--needle-tasks",
                "--teacher",
                "--lora-layers",
                "--lora-rank",
                "--val-batches",
                "--steps-per-eval",
            ],
            [
                "--model",
                files / "qwen",
                "--data",
                files / "books",
                "--adapter-path",
                tmp_path / "adapters",
                "--iters",
                "1",
                "--sample-length",
                "48",
                "--val-batches",
                "1",
            ],
        ),
        convert_main: (
            [
                "--memory-layers",
                "--window",
                "--sink-tokens",
                "--segment-size",
                "--chunk-size",
                "--memory-heads",
                "--memory-dim-head",
                "--memory-depth",
                "--memory",
                "--q-bits",
                "--q-group-size",
                "--dtype",
            ],
            ["--hf-path", files / "hf", "--mlx-path", tmp_path / "converted"],
        ),
        fuse: (
            ["--adapter-path", "--model"],
            ["--model", files / "qwen", "--adapter-path", files / "adapters", "--save-path", tmp_path / "fused"],
        ),
    }
    for main, (flags, base) in commands.items():
        for argv in odd_command_lines(flags, base, rng, 5):
            outputs = [tmp_path / "converted", tmp_path / "fused"]
            assert_clean(*call(main, argv, capsys), outputs if main in (convert_main, fuse) else [])
            for out in (*outputs, tmp_path / "run", tmp_path / "adapters"):
                shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(
    "module, damage",
    [("mlx_titans.generate", "model.safetensors"), ("mlx_titans.train", "trainer_state.json")],
)
def test_damaged_files_as_a_user_runs_them(files, tmp_path, module, damage):
    """The command lines as typed, in a subprocess: the exit status and stderr that a shell sees."""
    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    (next(run.glob("step-*")) / damage).write_bytes(b"\x00garbage")
    argv = ["--model", run, "-p", "hi", "-m", "2"] if module.endswith("generate") else ["--resume", run, "--out", run]
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
