import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.reproduce import RUNS, build_parser, count_parameters, matched_config, model_config
from benchmarks.reproduce import main as reproduce
from benchmarks.machine import GPUs
from benchmarks.reproduce import run_child, settings
from mlx_titans.data import mixed_batch
from mlx_titans.tasks import FIRST_SYMBOL, NEEDLE, QUERY

pytestmark = pytest.mark.benchmark  # smoke tests of a benchmarks/ command line, at tiny sizes

TEXT_VOCAB = 200
TINY = [
    "--dim",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--window",
    "32",
    "--persistent-tokens",
    "2",
    "--memory",
    '{"chunk_size": 16, "heads": 2, "max_grad_norm": 1.0}',
    "--seq-len",
    "64",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--samples",
    "2",
    "--valid-batches",
    "2",
]


def write_stream(path, n, seed, vocab=TEXT_VOCAB):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16))
    return path


def in_stream(piece, text):
    """Is `piece` a contiguous run of `text`?"""
    windows = np.lib.stride_tricks.sliding_window_view(text, len(piece))
    return bool((windows == piece).all(-1).any())


def test_mixed_batch(tmp_path):
    tokens = write_stream(tmp_path / "train.npy", 3000, seed=0)
    text = np.load(tokens).astype(np.int32) + FIRST_SYMBOL
    vocab, length = TEXT_VOCAB + FIRST_SYMBOL, 48
    inputs, targets, mask = mixed_batch("passkey,number,word", 8, length, np.random.default_rng(0), vocab, tokens)
    assert inputs.shape == targets.shape == mask.shape == (8, length)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    for row, (seq, tgt, weights) in enumerate(zip(inputs, targets, mask)):
        if row < 4:  # needle rows: the answer is the last tokens, weighted to a full row, after a book haystack
            answer = np.flatnonzero(weights)
            assert 5 <= len(answer) <= 7 and answer[0] == length - len(answer)
            assert np.isclose(weights.sum(), length)
            needle, query = np.flatnonzero(seq == NEEDLE)[0], np.flatnonzero(seq == QUERY)[0]
            key = length - query - len(answer)  # the question is QUERY, key; then comes the answer
            value = needle + 1 + key
            assert (seq[value : value + len(answer)] == tgt[answer]).all()
            for haystack in (seq[:needle], seq[value + len(answer) : query]):
                assert in_stream(haystack, text)  # book text with the same ids as the language-modelling rows
        else:  # language-modelling rows: windows of the stream, every token counts once
            assert (weights == 1).all() and in_stream(np.append(seq, tgt[-1]), text)
    again = mixed_batch("passkey,number,word", 8, length, np.random.default_rng(0), vocab, tokens)
    other = mixed_batch("passkey,number,word", 8, length, np.random.default_rng(1), vocab, tokens)
    assert all(np.array_equal(a, b) for a, b in zip((inputs, targets, mask), again))
    assert not np.array_equal(inputs, other[0])
    quarter = mixed_batch("word", 8, length, np.random.default_rng(0), vocab, tokens, needle_fraction=0.25)[2]
    assert (quarter[:2] != 1).all() and (quarter[2:] == 1).all()
    with pytest.raises(ValueError, match="too small"):
        mixed_batch("passkey", 2, length, np.random.default_rng(0), TEXT_VOCAB, tokens)


def test_parameters_are_matched_to_the_mac():
    args = build_parser().parse_args([])  # the real defaults: building a model is lazy, so cheap
    vocab = 8192 + FIRST_SYMBOL
    target = count_parameters(model_config(args, "mac", vocab))
    assert abs(count_parameters(model_config(args, "swa", vocab)) - target) > 0.2 * target  # unmatched, far off
    for name in RUNS:
        config = matched_config(args, name, vocab)
        assert config.mlp_dim % 32 == 0
        assert abs(count_parameters(config) - target) <= 0.02 * target, name
    assert matched_config(args, "mac", vocab).mlp_dim == model_config(args, "mac", vocab).mlp_dim


def test_end_to_end(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "niah_reproduction.json"
    write_stream(work / "tokens" / "train.npy", 20000, seed=0, vocab=8192)
    write_stream(work / "tokens" / "valid.npy", 5000, seed=1, vocab=8192)
    argv = ["--work", str(work), "--out", str(out), "--runs", "mac", "swa", "--jobs", "2", *TINY]
    reproduce(argv)
    results = json.loads(out.read_text())
    assert [run["name"] for run in results["runs"]] == ["mac", "swa"]
    assert all(run["tokens"] == 2 * 4 * 64 and np.isfinite(run["valid_ppl"]) for run in results["runs"])
    mac, swa = (run["parameters"] for run in results["runs"])
    assert abs(swa - mac) <= 0.02 * mac and results["runs"][1]["mlp_dim"] > results["runs"][0]["mlp_dim"]
    rows = results["rows"]
    assert len(rows) == 2 * 3 * 4 and {row["length"] for row in rows} == {64, 128, 256, 512}
    assert all(0 <= row["accuracy"] <= 1 and row["samples"] == 2 for row in rows)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| mac | " in capsys.readouterr().out

    with pytest.raises(SystemExit, match="other settings"):
        reproduce([*argv, "--samples", "3"])

    (work / "swa" / "result.json").unlink()  # a rerun trains only what is missing; here it fails
    write_stream(work / "tokens" / "valid.npy", 100, seed=1, vocab=8192)  # too short to evaluate on
    mac_log = (work / "mac" / "log.txt").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="swa failed"):
        reproduce(argv)
    assert (work / "mac" / "log.txt").stat().st_mtime_ns == mac_log
    assert not (work / "swa" / "result.json").exists()
    report = capsys.readouterr().out
    assert "swa: FAILED" in report and "fewer than one batch" in report  # with the end of its log


def test_each_run_gets_a_kernel_cache_of_its_own(tmp_path, monkeypatch):
    shared = tmp_path / "ptx"
    shared.mkdir()
    (shared / "kernel.ptx").write_text("compiled")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(shared))
    seen = {}
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, env, **kw: seen.update(env=env, command=command) or subprocess.CompletedProcess(command, 0),
    )
    assert run_child("mac", ["--jobs", "3"], tmp_path / "work") == 0
    own = seen["env"]["MLX_PTX_CACHE_DIR"]
    assert own != str(shared) and (Path(own) / "kernel.ptx").read_text() == "compiled"  # a warm copy
    assert seen["command"][-2:] == ["--only", "mac"]


def test_runs_spread_over_gpus_go_to_the_least_busy(tmp_path, monkeypatch):
    gpus = GPUs(3)
    with gpus.least_busy() as a, gpus.least_busy() as b:
        with gpus.least_busy() as c:
            assert (a, b, c) == ("0", "1", "2")
        with gpus.least_busy() as d:
            assert d == "2"
    with GPUs(1).least_busy() as none:
        assert none is None
    with pytest.raises(ValueError):
        GPUs(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match="shows fewer"):
        GPUs(3)
    with pytest.raises(SystemExit, match="shows fewer"):
        reproduce(["--gpus", "3", "--work", str(tmp_path / "never")])

    seen = []
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, env, **kw: (
            seen.append(env.get("CUDA_VISIBLE_DEVICES")) or subprocess.CompletedProcess(command, 0)
        ),
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = GPUs(2)
    with two.least_busy():  # GPU 0 busy
        run_child("mac", [], tmp_path / "work", two)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # the machine's own choice is kept: its second
    two = GPUs(2)
    with two.least_busy():
        run_child("mac", [], tmp_path / "work", two)
    run_child("mac", [], tmp_path / "work")
    assert seen == ["1", "5", "4,5"]
    parse = build_parser().parse_args
    assert settings(parse(["--gpus", "2", "--jobs", "4"])) == settings(parse([]))  # results made elsewhere still count


def gradient_norm(variant: str, memory: dict = None) -> float:
    """Global gradient norm of a freshly initialised tiny model on pass-key samples; for MAC: 8 segments, 16 chained
    chunk updates per layer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_titans.model import TitansLMConfig, TitansLM
    from mlx_titans.tasks import make_batch

    mx.random.seed(0)
    model = TitansLM(
        TitansLMConfig(variant=variant, vocab_size=64, dim=64, layers=2, heads=2, window=32, memory=memory or {})
    )
    x, y, m = (mx.array(a) for a in make_batch("passkey", 4, 256, np.random.default_rng(0), 64))

    def loss(params):
        model.update(params)
        return (nn.losses.cross_entropy(model(x), y) * m).sum() / m.sum()

    grads = mx.grad(loss)(model.trainable_parameters())
    return mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads))).item()


def test_the_reproduction_memory_keeps_macs_gradient_sane():
    """MAC with the reproduction's memory settings (RMS-normalised q/k, forget gate starting near 0, no conv) against
    the settings of the run before them (unit-l2 q/k, gate near 0.5, conv 4), whose gradient through the chained chunk
    updates exploded at initialisation (and that MAC never learnt to retrieve); chunk 16, so 256 tokens chain 16."""
    from benchmarks.reproduce import MEMORY

    ours = {**MEMORY, **RUNS["mac"]["memory"], "chunk_size": 16}
    before = {
        "chunk_size": 16,
        "heads": 2,
        "qkv_silu": True,
        "qk_l2norm": True,
        "conv_size": 4,
        "post_rmsnorm": True,
        "max_grad_norm": 1.0,
    }
    norms = {"ours": gradient_norm("mac", ours), "before": gradient_norm("mac", before), "swa": gradient_norm("swa")}
    print("global gradient norm at initialisation:", {k: round(v, 1) for k, v in norms.items()})  # the README's
    assert norms["ours"] < 30
    assert norms["before"] > 100 * norms["ours"]
    assert norms["ours"] < 5 * norms["swa"]


def test_a_run_stopped_half_way_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """run_one checkpoints every CHECKPOINT_EVERY steps; after a stop (here: the last checkpoint and the result
    removed) it resumes from the newest checkpoint and ends with the weights of the run that never stopped. A
    change of settings starts over."""
    import mlx.core as mx

    from benchmarks import reproduce as rep

    monkeypatch.setattr(rep, "CHECKPOINT_EVERY", 2)
    work = tmp_path / "work"
    write_stream(work / "tokens" / "train.npy", 20000, seed=0, vocab=8192)
    write_stream(work / "tokens" / "valid.npy", 5000, seed=1, vocab=8192)
    argv = ["--work", str(work), "--only", "swa", *TINY, "--steps", "4", "--lengths", "64"]
    reproduce(argv)
    train_dir = work / "swa" / "train"
    assert [p.name for p in sorted(train_dir.glob("step-*"))] == ["step-00000002", "step-00000004"]
    straight = mx.load(str(train_dir / "step-00000004" / "model.safetensors"))
    shutil.rmtree(train_dir / "step-00000004")
    (work / "swa" / "result.json").unlink()

    reproduce(argv)
    assert "resuming from" in capsys.readouterr().out
    result = json.loads((work / "swa" / "result.json").read_text())
    assert result["resumed_from"] == "step-00000002" and result["tokens"] == 4 * 4 * 64
    resumed = mx.load(str(train_dir / "step-00000004" / "model.safetensors"))
    assert all(mx.array_equal(straight[k], resumed[k]) for k in straight)

    reproduce([*argv, "--lr", "3e-3"])  # other settings: trained from the start
    assert json.loads((work / "swa" / "result.json").read_text())["resumed_from"] is None
