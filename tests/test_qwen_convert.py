"""The TitansQwen converter (mlx_titans/qwen/convert.py, convert/qwen.py) on tiny random checkpoints of every Qwen
type it supports."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.rope_utils import YarnRoPE
from mlx_lm.models.switch_layers import SwitchLinear

import mlx_titans.qwen.convert as converter
from mlx_titans.generate import main as generate
from mlx_titans.qwen import MEMORY_WEIGHTS, load, load_plain_qwen, memory_weights
from mlx_titans.qwen.config import QWEN_TYPES
from mlx_titans.qwen.random_model import make_tiny_qwen

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arch", QWEN_TYPES)
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
    base = [(name, m) for name, m in model.named_modules() if ".memory" not in name]
    assert not any(isinstance(m, (nn.Linear, SwitchLinear)) for _, m in base)  # every base linear (and expert) 4-bit
    routers = {m.bits for name, m in base if name.endswith(("mlp.gate", "shared_expert_gate"))}
    assert routers <= {8} if arch in ("qwen3_moe", "qwen3_next", "qwen3_5_moe") else routers <= {4}  # mlx-lm's choice
    memory = model.layers[1].memory
    assert "memory" not in model.layers[0]
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in memory.named_modules())
    assert set(mx.load(str(out / "titans_memory.safetensors"))) == set(memory_weights(model))
    assert {w.dtype for w in memory_weights(model).values()} == {mx.float32}

    responses = list(stream_generate(model, tokenizer, "Hello world", max_tokens=6, prefill_step_size=5))
    assert responses[-1].generation_tokens == 6 or responses[-1].finish_reason == "stop"

    with pytest.raises(ValueError, match="custom module"):  # stock mlx-lm refuses it rather than run it plainly
        mlx_lm.load(str(out))
    stock, config = load_plain_qwen(out)  # the plain Qwen: no memory, base weights only
    stock_tokenizer = tokenizer
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


def with_rope_parameters(path, **rope):
    """The checkpoint at `path` with its RoPE settings only in transformers 5's rope_parameters."""
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    text = config.get("text_config", config)
    text["rope_parameters"] = {"rope_theta": text.pop("rope_theta", 1e6), **text.get("rope_parameters", {}), **rope}
    file.write_text(json.dumps(config))
    return str(path)


def pytorch_only(root):
    path = make_tiny_qwen(root / "bin", "qwen2")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    return str(path)


BAD_SOURCES = {
    "missing path": (lambda root: str(root / "nope"), "does not exist"),
    "non-Qwen": (
        lambda root: str(make_tiny_qwen(root / "llama", model_type="llama")),
        f"'llama' model; TitansQwen supports model_type {', '.join(QWEN_TYPES)}",
    ),
    "corrupt safetensors": (corrupt_checkpoint, "cannot read the weights"),
    "PyTorch weights only": (pytorch_only, "holds PyTorch weights (pytorch_model.bin) but no model*.safetensors"),
    "YaRN that mlx-lm's qwen3_moe drops": (
        lambda root: with_rope_parameters(make_tiny_qwen(root / "moe", "qwen3_moe"), rope_type="yarn", factor=4.0),
        "asks for 'yarn' RoPE scaling, which mlx-lm's qwen3_moe does not apply",
    ),
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


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_next", "qwen3_5"])
def test_rope_settings_only_in_rope_parameters_are_honoured(arch, tmp_path):
    """transformers 5 writes rope_theta and YaRN only in rope_parameters, which mlx-lm's qwen2 and qwen3_next do not
    read: TitansQwen and the converted folder (in stock mlx-lm too) run them, as mlx-lm's qwen3 and qwen3_5 do."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 1e4}
    hf = with_rope_parameters(make_tiny_qwen(tmp_path / "hf", arch), **yarn)
    converter.convert(hf, tmp_path / "out", dtype="float32")  # MLX's CPU runs MoE experts (gather_mm) in float32 only
    ours, converted, stock = load(hf)[0], load(tmp_path / "out")[0], load_plain_qwen(tmp_path / "out")[0]
    for model in (ours, converted, stock):
        ropes = [layer.self_attn.rope for layer in model.layers if "self_attn" in layer]
        assert ropes and all(isinstance(rope, YarnRoPE) for rope in ropes)
    tokens = mx.random.randint(3, 1000, (1, 24))
    assert mx.array_equal(converted(tokens), stock(tokens))
    theta = with_rope_parameters(make_tiny_qwen(tmp_path / "theta", arch), rope_theta=1e4)
    assert {layer.self_attn.rope.base for layer in load(theta)[0].layers if "self_attn" in layer} == {1e4}


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


@pytest.mark.parametrize("arch", list(QWEN_TYPES)[2:])  # qwen2, qwen3: test_generate, test_adapt
def test_generate_runs_a_converted_model_and_its_memory_state(hf, arch, tmp_path, capsys):
    """mlx_titans.generate on a converted model of each type: a document through its bounded cache, the state out,
    a later run from it; a state of another model type is refused in one error line."""
    titans = {"memory_layers": [0, 1], "window": 16, "segment_size": 16, "memory": {"heads": 2, "chunk_size": 8}}
    converter.convert(hf[arch], tmp_path / "q", quantize=True, titans=titans)
    (tmp_path / "doc.txt").write_text("Titans neural memory learns at test time. " * 30)
    state, other = tmp_path / "s.safetensors", "qwen3_moe" if arch != "qwen3_moe" else "qwen2_moe"
    argv = ["--model", str(tmp_path / "q"), "--file", str(tmp_path / "doc.txt"), "-m", "2"]
    assert generate(argv + ["--memory-state-out", str(state)]) == 0
    assert generate(["--model", str(tmp_path / "q"), "-p", "again", "-m", "2", "--memory-state-in", str(state)]) == 0
    assert "Generation: 2 tokens" in capsys.readouterr().out
    converter.convert(hf[other], tmp_path / "other", titans=titans)
    assert generate(["--model", str(tmp_path / "other"), "-p", "again", "--memory-state-in", str(state)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved for another model" in err[0], err


def test_generate_refuses_an_unsupported_model_type_naming_the_supported_ones(tmp_path, capsys):
    llama = make_tiny_qwen(tmp_path / "llama", model_type="llama")
    assert generate(["--model", str(llama), "-p", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {llama} holds a 'llama' model; TitansQwen supports model_type {', '.join(QWEN_TYPES)}"]


def test_stock_mlx_lm_with_trust_remote_code_runs_the_real_titans_qwen(titans_qwen, tmp_path):
    """config.json's model_file: stock mlx-lm (trust_remote_code) builds TitansQwen with the folder's memory weights
    (here a memory made to matter: gate open, random weights), and generates as mlx-titans does past the window."""
    folder = tmp_path / "q"
    shutil.copytree(titans_qwen, folder)
    weights = mx.load(str(folder / MEMORY_WEIGHTS))
    weights = {
        k: (mx.ones_like(v) if k.endswith("memory_gate") else v + 0.1 * mx.random.normal(v.shape))
        for k, v in weights.items()
    }
    mx.save_safetensors(str(folder / MEMORY_WEIGHTS), weights, metadata={"format": "mlx"})
    ours, tokenizer, _ = load(folder)
    stock, stock_tokenizer = mlx_lm.load(str(folder), trust_remote_code=True)
    assert type(stock).__mro__[1] is type(ours) and len(memory_weights(stock)) == len(weights)
    prompt = "The quick brown fox jumps over the lazy dog. " * 6  # past the window (16) and a memory segment
    assert len(tokenizer.encode(prompt)) > 40
    expected = mlx_lm.generate(ours, tokenizer, prompt, max_tokens=8, prefill_step_size=16)
    assert mlx_lm.generate(stock, stock_tokenizer, prompt, max_tokens=8, prefill_step_size=16) == expected
    plain = mlx_lm.generate(load_plain_qwen(folder)[0], tokenizer, prompt, max_tokens=8, prefill_step_size=16)
    assert plain != expected  # the memory (and the window) change what is generated
