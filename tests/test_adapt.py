"""mlx_titans.adapt (memory adapters on a frozen TitansQwen), the adapter layout, loading and fusing them."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_titans.adapt as adapt_module
from mlx_titans.adapt import main as adapt, sample_loss, text_streams, token_losses, value_and_grad
from mlx_titans.fuse import main as fuse
from mlx_titans.generate import main as generate
from mlx_titans.qwen import MEMORY_WEIGHTS, load, memory_weights
from mlx_titans.qwen.adapters import make_trainable
from mlx_titans.qwen.config import QWEN_TYPES
from mlx_titans.qwen.convert import convert
from mlx_titans.qwen.random_model import make_tiny_qwen
from mlx_titans.tokenizer import EOS
from test_qwen import SMALL, titans_model
from test_train import launch_two

WORDS = ["green", "quiet", "distant", "small", "red", "old", "bright", "heavy"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 4-bit Qwen3 converted to TitansQwen (window 16), its plain HF folder, and a folder of documents."""
    root = tmp_path_factory.mktemp("adapt")
    make_tiny_qwen(root / "hf", "qwen3", tie=True)
    convert(root / "hf", root / "titans", quantize=True, titans=SMALL)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("valid", 2)):
        write_stories(root / "docs" / split, n, 120, rng)
    return root


def write_stories(folder, files: int, sentences: int, rng):
    """`files` .txt documents of `sentences` random short sentences each, into `folder`."""
    folder.mkdir(parents=True)
    for i in range(files):
        text = " ".join(
            f"The {rng.choice(WORDS)} fox number {rng.integers(100)} ran. Was it {rng.choice(WORDS)}?"
            for _ in range(sentences)
        )
        (folder / f"{i}.txt").write_text(text)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_TITANS_CACHE", str(tmp_path / "cache"))


def flags(base, out, *extra):
    return [
        "--model",
        str(base / "titans"),
        "--data",
        str(base / "docs"),
        "--adapter-path",
        str(out),
        "--sample-length",
        "128",
        "--batch-size",
        "2",
        "--iters",
        "4",
        "--steps-per-report",
        "2",
        "--steps-per-eval",
        "4",
        "--val-batches",
        "1",
        "--save-every",
        "2",
        "--needle-tasks",
        "passkey",
        "number",
        *map(str, extra),
    ]


def open_gates(model, scale=0.5):
    for i, layer in enumerate(model.layers):
        if "memory" in layer:
            layer.memory_gate = scale * mx.random.normal(layer.memory_gate.shape, key=mx.random.key(i))


def gradients(model, segmented, last_segment_only=True, n=64):
    """Loss and gradients of a 4-segment sample: segment by segment (adapt's default) or as one graph."""
    tokens = mx.random.randint(3, 900, (2, n + 1), key=mx.random.key(1))
    weights = mx.ones((2, n)) * (mx.arange(n) >= n - 16) if last_segment_only else mx.ones((2, n))
    args = (tokens[:, :-1], tokens[:, 1:], weights, mx.array([False, False]))
    if segmented:
        loss, grads = value_and_grad(model, *args)
    else:
        loss, grads = nn.value_and_grad(model, lambda m: sample_loss(m, *args))(model)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads))


def test_segment_by_segment_gives_the_unrolled_gradients(base):
    """The backward pass segment by segment, each recomputed (memory bounded by a segment), gives exactly the
    gradients of the whole sample's graph, through the window's rotations and compactions of four segments; and a
    loss on the last segment alone reaches the memory's store projections through the caches before it."""
    model, _, _ = load(base / "titans")
    make_trainable(model)
    open_gates(model)
    (loss_a, a), (loss_b, b) = gradients(model, segmented=False), gradients(model, segmented=True)
    assert loss_a.item() == loss_b.item() and set(a) == set(b)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert mx.abs(a["model.layers.0.memory.to_keys.weight"]).max().item() > 1e-4
    assert not any("self_attn" in k or "mlp" in k for k in a)  # the base is frozen


@pytest.mark.parametrize("arch", list(QWEN_TYPES)[2:])  # qwen3: above
def test_every_qwen_type_trains_only_its_memory_segment_by_segment(hf, arch):
    """On each type's layers (MoE experts and routers, Gated DeltaNet, gated attention) only the memory layers train,
    and the segment-by-segment gradients equal the whole graph's, through the caches of either kind of layer."""
    model = titans_model(hf[arch])
    make_trainable(model)
    open_gates(model)
    (loss_a, a), (loss_b, b) = gradients(model, segmented=False), gradients(model, segmented=True)
    assert loss_a.item() == loss_b.item() and set(a) == set(b) == set(memory_weights(model))
    assert all(mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-7).item() for k in a)
    assert all(mx.abs(a[k]).max().item() > 0 for k in a if k.endswith("memory.to_keys.weight"))


def test_memory_updates_off_leave_the_store_path_without_gradient(base):
    """The ablation: with the memory's test-time updates switched off (lr and forgetting 0), what it would store
    cannot matter, so its key and value projections get no gradient; the read path still does."""
    model, _, _ = load(base / "titans", memory={"max_lr": 0.0, "max_decay": 0.0})
    make_trainable(model)
    open_gates(model)
    _, grads = gradients(model, segmented=True, last_segment_only=False)
    for name in ("to_keys", "to_values", "to_lr", "to_momentum", "to_decay"):
        assert mx.abs(grads[f"model.layers.0.memory.{name}.weight"]).max().item() == 0, name
    assert mx.abs(grads["model.layers.0.memory.to_queries.weight"]).max().item() > 0


def test_distillation_from_itself_is_zero():
    logits = mx.random.normal((2, 5, 11))
    targets = mx.zeros((2, 5), dtype=mx.int32)
    kl = token_losses(logits, targets, mx.array([False, True]), teacher_logits=logits)
    assert mx.abs(kl[0]).max().item() < 1e-6
    assert mx.allclose(kl[1], nn.losses.cross_entropy(logits[1], targets[1])).item()  # answer rows: cross-entropy


def test_adapt_trains_only_the_memory_of_a_4bit_base_and_writes_mlx_lm_layout(base, tmp_path, capsys):
    out = tmp_path / "adapters"
    assert adapt(flags(base, out, "--teacher", "full")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and np.isfinite(summary["train_loss"]) and summary["beyond_window_loss"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "titans_memory" and config["num_layers"] == 0
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(".memory" in k for k in weights)
    before, _, _ = load(base / "titans")
    after, _, _ = load(base / "titans", adapter_path=out)
    old, new = dict(tree_flatten(before.parameters())), dict(tree_flatten(after.parameters()))
    assert all(mx.array_equal(old[k], new[k]).item() for k in old if ".memory" not in k)  # 4-bit base untouched
    assert not mx.array_equal(old["model.layers.0.memory_gate"], new["model.layers.0.memory_gate"]).item()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002", "step-00000004"]


def test_adapt_distils_a_hybrid_vision_language_moe_and_fuses_it(base, hf, tmp_path, capsys):
    """A converted qwen3_5_moe (vision-language layout: its language_model's head), distilled from its own base with
    full attention, LoRA on its last layer; fused, the folder runs as the adapters do."""
    convert(hf["qwen3_5_moe"], tmp_path / "titans", quantize=True, titans=SMALL)
    shutil.copytree(base / "docs", tmp_path / "docs")
    out = tmp_path / "adapters"
    assert adapt(flags(tmp_path, out, "--teacher", "full", "--lora-layers", "1")) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_loss"])
    assert (
        fuse(["--model", str(tmp_path / "titans"), "--adapter-path", str(out), "--save-path", str(tmp_path / "f")]) == 0
    )
    tokens = mx.array([[5, 6, 7, 8]])
    adapted, fused = load(tmp_path / "titans", adapter_path=out)[0], load(tmp_path / "f")[0]
    assert mx.allclose(adapted(tokens), fused(tokens), atol=0.1)  # LoRA merged into 4-bit weights: requantized


@pytest.mark.parametrize("lengths", [["128"], ["96", "128"]])
def test_resume_continues_exactly(base, tmp_path, capsys, monkeypatch, lengths):
    """Also with mixed sample lengths: each step draws one, the resumed run draws what the whole run drew."""
    drawn = []
    monkeypatch.setattr(
        adapt_module,
        "train_step",
        lambda run, batch, f=adapt_module.train_step: drawn.append(batch[0].shape[1]) or f(run, batch),
    )
    assert adapt(flags(base, tmp_path / "whole", "--sample-length", *lengths)) == 0
    assert adapt(flags(base, tmp_path / "split", "--sample-length", *lengths, "--iters", "2")) == 0
    assert adapt(flags(base, tmp_path / "split", "--sample-length", *lengths, "--resume")) == 0
    assert drawn[:4] == drawn[4:] and set(drawn) == set(map(int, lengths))
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["run_tokens"] == 2 * sum(drawn[:4])  # batch 2: the tokens the steps took, whatever their lengths
    a, b = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("whole", "split"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_fuse_writes_a_standalone_folder_and_generate_runs_adapters(base, tmp_path, capsys):
    """Fused memory adapters are exactly the adapters; with LoRA on a 4-bit base the fused linears are quantized
    again (as mlx_lm.fuse does), so they agree to the quantization's precision."""
    tokens = mx.random.randint(3, 900, (1, 40), key=mx.random.key(2))
    for name, extra, tolerance in (("memory", [], 0.0), ("lora", ["--lora-layers", "1", "--lora-rank", "2"], 0.05)):
        out = tmp_path / name
        assert adapt(flags(base, out, "--iters", "2", *extra)) == 0
        weights = mx.load(str(out / "adapters.safetensors"))
        assert any(k.endswith("lora_a") for k in weights) == (name == "lora")
        assert (
            fuse(
                [
                    "--model",
                    str(base / "titans"),
                    "--adapter-path",
                    str(out),
                    "--save-path",
                    str(tmp_path / f"fused-{name}"),
                ]
            )
            == 0
        )
        with_adapters, _, _ = load(base / "titans", adapter_path=out)
        fused, _, _ = load(tmp_path / f"fused-{name}")
        assert mx.abs(with_adapters(tokens) - fused(tokens)).max().item() <= tolerance
    capsys.readouterr()
    assert (
        generate(
            ["--model", str(base / "titans"), "--adapter-path", str(tmp_path / "lora"), "-p", "The fox", "-m", "3"]
        )
        == 0
    )
    assert "Generation: 3 tokens" in capsys.readouterr().out


def test_bad_input_is_one_error_line_and_writes_nothing(base, tmp_path, capsys):
    out = tmp_path / "adapters"
    cases = [
        (["--model", str(base / "hf")], "not a TitansQwen folder"),
        (["--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--sample-length", "16"], "not longer than the window"),
        (["--teacher", "half"], "--teacher must be one of none, full"),
        (["--needle-fraction", "2"], "needle-fraction"),
    ]
    for extra, message in cases:
        assert adapt(flags(base, out) + extra) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") <= 2, err
        assert not out.exists()
    other = tmp_path / "other"
    convert(base / "hf", other, titans={**SMALL, "window": 32})
    assert adapt(flags(base, out, "--iters", "1")) == 0
    with pytest.raises(ValueError, match="trained for another model"):
        load(other, adapter_path=out)
    capsys.readouterr()
    assert adapt(flags(base, out, "--iters", "1")) == 1
    assert "already holds adapters" in capsys.readouterr().err


def write_jsonl(folder, splits: dict) -> None:
    """{split: rows}: FOLDER/split.jsonl, a row a line."""
    folder.mkdir(parents=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_jsonl_folder_is_the_same_documents_as_txt_files(base, tmp_path, capsys):
    """mlx-lm's layout (train.jsonl, valid.jsonl of {"text": ...} rows): each row a document, joined with EOS as
    .txt files are, so the same documents give the same token streams; and adapt trains on it."""
    jsonl = tmp_path / "jsonl"
    write_jsonl(
        jsonl,
        {
            split: [{"text": f.read_text()} for f in sorted((base / "docs" / split).glob("*.txt"))]
            for split in ("train", "valid")
        },
    )
    _, tokenizer, _ = load(base / "titans")
    txt, rows = (text_streams(folder, tokenizer, tmp_path / "cache") for folder in (base / "docs", jsonl))
    eos = tokenizer.backend_tokenizer.token_to_id(EOS)
    for split, documents in (("train", 6), ("valid", 2)):
        assert np.array_equal(txt[split], rows[split]) and (np.asarray(rows[split]) == eos).sum() == documents
    assert adapt(flags(base, tmp_path / "adapters", "--iters", "1", "--data", jsonl)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1


def test_bad_data_folder_is_one_error_line(base, tmp_path, capsys):
    row = {"text": "The quiet fox ran. " * 200}
    cases = {
        "neither": ({}, "no .txt files, nor train.jsonl and valid.jsonl"),
        "no valid": ({"train": [row]}, "has no valid.jsonl"),
        "no text": (
            {"train": [row], "valid": [row, {"prompt": "a", "completion": "b"}]},
            'valid.jsonl line 2 has no "text"',
        ),
        "empty split": ({"train": [], "valid": [row]}, "train.jsonl has no rows"),
    }
    for name, (splits, message) in cases.items():
        folder = tmp_path / name
        write_jsonl(folder, splits)
        out = tmp_path / f"adapters-{name}"
        assert adapt(flags(base, out, "--data", folder)) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") <= 2, (name, err)
        assert not out.exists()


def test_two_processes_train_as_one(base, tmp_path):
    """One step on 2 processes, each on its row of the global batch (seed 0: a text row and a needle row) == one
    process on the whole batch. The gates are open, so that every memory weight gets a gradient (closed, only the
    gates and LoRA's B would), and LoRA is on, so its random initialization must be the same on every process.
    Exact to ~2e-6 with MLX's own CPU matmuls; with openblas preloaded a 1-row and a 2-row matmul round differently
    and the bfloat16 base's gradients differ by ~1% (in one process too), so the adapters (Adam's first step) do not
    agree to 1e-5 there."""
    opened = tmp_path / "opened"
    shutil.copytree(base / "titans", opened)
    model, _, _ = load(opened)
    open_gates(model)
    mx.save_safetensors(str(opened / MEMORY_WEIGHTS), memory_weights(model))
    extra = ["--iters", "1", "--warmup", "0", "--lora-layers", "1", "--lora-rank", "2", "--model", opened]
    proc = launch_two("mlx_titans.adapt", *flags(base, tmp_path / "two", *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert adapt(flags(base, tmp_path / "one", *extra)) == 0
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2 and two["ranks_in_sync"]
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-5
    norms = [
        json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["grad_norm"] for name in ("one", "two")
    ]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    a, b = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys() and any(k.endswith("lora_a") for k in a)
    for k in a:
        assert mx.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, mx.abs(a[k] - b[k]).max().item())


@pytest.mark.benchmark
def test_adapt_memory_benchmark(base, tmp_path):
    """benchmarks.adapt_memory: a row per length and mode, the segment by segment step never above one graph's."""
    from benchmarks.adapt_memory import main as adapt_memory

    out = tmp_path / "adapt_memory.json"
    assert (
        adapt_memory(["--model", str(base / "titans"), "--multiples", "2", "4", "--repeats", "1", "--out", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["length"], r["checkpoint"]) for r in rows] == [(32, True), (32, False), (64, True), (64, False)]
    assert all(a["peak_memory_gb"] <= b["peak_memory_gb"] for a, b in zip(rows[::2], rows[1::2]))
    assert out.with_suffix(".png").stat().st_size > 0
