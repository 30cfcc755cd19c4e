"""The TitansQwen converter (mlx_titans/qwen/convert.py, convert/qwen.py) on tiny random Qwen2 / Qwen3 checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate

import mlx_titans.qwen.convert as converter
from mlx_titans.qwen import load, memory_weights
from mlx_titans.qwen.random_model import make_tiny_qwen

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_convert_quantized_then_load_generate_and_stock_load(hf, arch, tmp_path):
    out = tmp_path / "out"
    rc = converter.main(
        [
            "--hf-path",
            str(hf[arch]),
            "--mlx-path",
            str(out),
            "-q",
            "--memory-layers",
            "1",
            "--window",
            "24",
            "--sink-tokens",
            "2",
            "--segment-size",
            "16",
            "--chunk-size",
            "8",
            "--memory-heads",
            "2",
            "--memory-dim-head",
            "16",
        ]
    )
    assert rc == 0 and (out / "titans_memory.safetensors").is_file()
    assert load(out, window=8)[0].titans.window == 8
    model, tokenizer, config = load(out)
    assert config["titans"]["memory_layers"] == [1] and config["titans"]["window"] == 24
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, nn.QuantizedLinear) for m in (attn.q_proj, attn.o_proj, mlp.up_proj, mlp.down_proj))
    memory = model.layers[1].memory
    assert "memory" not in model.layers[0]
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in memory.named_modules())
    assert set(mx.load(str(out / "titans_memory.safetensors"))) == set(memory_weights(model))
    assert {w.dtype for w in memory_weights(model).values()} == {mx.float32}

    responses = list(stream_generate(model, tokenizer, "Hello world", max_tokens=6, prefill_step_size=5))
    assert responses[-1].generation_tokens == 6 or responses[-1].finish_reason == "stop"

    stock, stock_tokenizer = mlx_lm.load(str(out))  # the plain Qwen: no memory, base weights only
    assert not any(".memory" in name for name, _ in tree_flatten(stock.parameters()))
    tokens = mx.array([stock_tokenizer.encode("The quick brown fox jumps over")])
    assert tokens.shape[1] <= 24
    assert mx.array_equal(model(tokens), stock(tokens))  # untrained memory: gate closed
    last = list(stream_generate(stock, stock_tokenizer, "hello", max_tokens=3))[-1]
    assert last.generation_tokens == 3 or last.finish_reason == "stop"


def corrupt_checkpoint(root):
    path = make_tiny_qwen(root / "corrupt", "qwen2")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(path)


BAD_SOURCES = {
    "missing path": (lambda root: str(root / "nope"), "does not exist"),
    "non-Qwen": (lambda root: str(make_tiny_qwen(root / "llama", model_type="llama")), "not Qwen2"),
    "corrupt safetensors": (corrupt_checkpoint, "cannot read the weights"),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_convert_bad_source_one_line_nothing_written(case, tmp_path, capsys):
    make_source, message = BAD_SOURCES[case]
    source, work = make_source(tmp_path), tmp_path / "work"
    work.mkdir()
    assert converter.main(["--hf-path", source, "--mlx-path", str(work / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert list(work.iterdir()) == []


def test_convert_unknown_hub_id_offline_as_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [
            sys.executable,
            "convert/qwen.py",
            "--hf-path",
            "mlx-titans-test/no-such-model",
            "--mlx-path",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: mlx-titans-test/no-such-model is not a local directory and the Hugging Face Hub cannot provide it "
        "(HF_HUB_OFFLINE is set)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_existing_output_and_leaves_nothing_on_interrupt(hf, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").mkdir()
    assert converter.main(["--hf-path", str(hf["qwen2"]), "--mlx-path", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err

    def interrupted_save(dst, *args, **kwargs):
        (Path(dst) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "save", interrupted_save)
    capsys.readouterr()
    assert converter.main(["--hf-path", str(hf["qwen2"]), "--mlx-path", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted; nothing written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
