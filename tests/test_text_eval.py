"""mlx_titans.text_eval (greedy needle answers and held-out losses through any cache) and benchmarks.niah --qwen."""

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from benchmarks.niah import main
from mlx_titans.qwen import load, load_plain_qwen
from mlx_titans.qwen.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, adapter_weights
from mlx_titans.qwen.convert import convert
from mlx_titans.qwen.random_model import make_tiny_qwen
from mlx_titans.text_eval import (
    answer_loss,
    greedy_continuations,
    needle_accuracy,
    needle_samples,
    text_windows,
    window_losses,
)
from mlx_titans.text_needles import read_haystack
from test_adapt import write_stories

SMALL = {
    "memory_layers": [0, 1],
    "window": 64,
    "sink_tokens": 4,
    "segment_size": 32,
    "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
}


def write_adapters(model, folder):
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, 0, 8, 20.0, {})))
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), adapter_weights(model))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny float32 Qwen3 converted to TitansQwen (window 64), its weights scaled up so that its greedy text
    depends on the prompt, a folder of books, adapters with open gates, and adapters of another model."""
    root = tmp_path_factory.mktemp("text_eval")
    make_tiny_qwen(root / "hf", "qwen3", tie=True)
    convert(root / "hf", root / "titans", dtype="float32", titans=SMALL)
    file = str(root / "titans" / "model.safetensors")
    mx.save_safetensors(file, {k: 5 * w if w.ndim == 2 else w for k, w in mx.load(file).items()})
    write_stories(root / "books", 2, 150, np.random.default_rng(0))
    model, tokenizer, _ = load(root / "titans")
    for i, layer in enumerate(model.layers):
        layer.memory_gate = 0.5 * mx.random.normal(layer.memory_gate.shape, key=mx.random.key(i))
    write_adapters(model, root / "adapters")
    write_adapters(load(root / "titans", window=32)[0], root / "other")
    return root, tokenizer, read_haystack(root / "books", tokenizer)


def test_samples_are_deterministic_and_spread_over_depths(tiny):
    _, tokenizer, haystack = tiny
    a, b = (needle_samples("number", tokenizer, haystack, 400, 5, seed=3) for _ in range(2))
    assert [s.prompt for s in a] == [s.prompt for s in b] and all(len(s.prompt) == 400 for s in a)
    assert [s.needle_index for s in a] == sorted(s.needle_index for s in a)
    assert a[0].needle_index < 30 and a[-1].needle_index > 250
    fixed = needle_samples("number", tokenizer, haystack, 400, 4, seed=3, depths=[0.0, 1.0])
    assert [s.needle_index < 200 for s in fixed] == [True, False, True, False]


def test_window_only_titans_qwen_generates_as_stock_full_attention(tiny):
    """With a window longer than the prompt and the gate closed, TitansQwen is the base model: the same greedy
    continuation as stock mlx-lm with full attention, whatever the prefill step."""
    root, tokenizer, haystack = tiny
    samples = needle_samples("passkey", tokenizer, haystack, 100, 3, seed=0)
    titans = load(root / "titans", window=256)[0]
    stock = load_plain_qwen(root / "titans")[0]
    expected = greedy_continuations(stock, tokenizer, samples)
    assert greedy_continuations(titans, tokenizer, samples, step=16) == expected
    assert len(set(expected)) > 1


def test_answer_loss_is_the_answers_cross_entropy_after_the_prompt(tiny):
    """Read through a bounded cache, batched (answers of several lengths, padded), the answer loss is the cross-entropy
    of the answer tokens in one uncached forward of prompt + answer, one sample at a time."""
    root, tokenizer, haystack = tiny
    model = load(root / "titans", adapter_path=root / "adapters")[0]
    samples = needle_samples("uuid", tokenizer, haystack, 120, 4, seed=2)
    answers = [tokenizer.encode(s.answer, add_special_tokens=False) for s in samples]
    assert len({len(a) for a in answers}) > 1
    total = 0.0
    for sample, answer in zip(samples, answers):
        ids = mx.array([sample.prompt + answer])
        logits = model(ids[:, :-1])[:, len(sample.prompt) - 1 :].astype(mx.float32)
        total += nn.losses.cross_entropy(logits, ids[:, len(sample.prompt) :]).sum().item()
    expected = total / sum(map(len, answers))
    assert answer_loss(model, tokenizer, samples, batch=2, step=32) == pytest.approx(expected, rel=1e-3)  # BLAS order


@pytest.mark.parametrize("method", ["titans", "adapters", "full", "rotating"])
def test_batched_answers_equal_one_at_a_time(tiny, method):
    """A batch of samples gets the continuations each sample gets alone (windows evicted: prompts of 100 > 64 + 4)."""
    root, tokenizer, haystack = tiny
    if method in ("full", "rotating"):
        model = load_plain_qwen(root / "titans")[0]
    else:
        model = load(root / "titans", adapter_path=root / "adapters" if method == "adapters" else None)[0]
    make_cache = partial(make_prompt_cache, max_kv_size=68) if method == "rotating" else make_prompt_cache
    samples = needle_samples("number", tokenizer, haystack, 100, 3, seed=1)
    batched = greedy_continuations(model, tokenizer, samples, make_cache, step=32)
    assert batched == [greedy_continuations(model, tokenizer, [s], make_cache, step=32)[0] for s in samples]
    assert len(set(batched)) > 1
    accuracy = needle_accuracy(model, tokenizer, samples, make_cache, batch=2, step=32)
    assert accuracy == np.mean([all(v in t for v in s.values) for t, s in zip(batched, samples)])


def test_first_window_loss_is_full_attention_loss(tiny):
    """The loss of the positions inside the first window is stock full attention's; so is every position's when
    the window covers the whole text; any prefill step gives the same losses."""
    root, _, haystack = tiny
    inputs, targets = text_windows(haystack.ids, 160, 3)
    assert inputs.shape == targets.shape == (3, 160) and (inputs[:, 1:] == targets[:, :-1]).all()
    stock = load_plain_qwen(root / "titans")[0]
    full = window_losses(stock, inputs, targets, 64, 96, step=48)
    windowed = window_losses(load(root / "titans")[0], inputs, targets, 64, 96, batch=2, step=32)
    assert windowed[0] == pytest.approx(full[0], rel=1e-5)
    assert windowed[1] != pytest.approx(full[1], rel=1e-5)  # the window forgets what full attention sees
    whole = window_losses(load(root / "titans", window=256)[0], inputs, targets, 64, 96, step=160)
    assert whole == pytest.approx(full, rel=1e-5)
    assert window_losses(stock, inputs, targets, 160, 164)[1] is None  # no position beyond the window
    with pytest.raises(ValueError, match="the haystack has"):
        text_windows(haystack.ids, len(haystack.ids) // 2, 3)


@pytest.mark.benchmark
def test_cli_writes_every_method_and_bad_input_is_one_error(tiny, tmp_path):
    root, _, _ = tiny
    common = [
        "--qwen",
        str(root / "titans"),
        "--haystack",
        str(root / "books"),
        "--tasks",
        "passkey",
        "number",
        "--samples",
        "2",
        "--batch",
        "2",
    ]
    out = tmp_path / "niah.json"
    main(
        [
            *common,
            "--adapters",
            str(root / "adapters"),
            "--memory-updates",
            "on",
            "off",
            "--lengths",
            "100",
            "140",
            "--perplexity-length",
            "128",
            "--perplexity-windows",
            "2",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    methods = [
        "stock mlx-lm, full attention",
        "stock mlx-lm, rotating cache 64+4",
        "TitansQwen, no adapters",
        f"TitansQwen + {root / 'adapters'}",
        f"TitansQwen + {root / 'adapters'}, memory updates off",
    ]
    assert [r["method"] for r in result["rows"]] == [m for m in methods for _ in range(4)]
    assert {(r["task"], r["length"], r["samples"]) for r in result["rows"]} == {
        (t, n, 2) for t in ("passkey", "number") for n in (100, 140)
    }
    assert all(0 <= r["accuracy"] <= 1 and r["seconds"] >= 0 for r in result["rows"])
    assert [p["method"] for p in result["perplexity"]] == methods
    losses = {p["method"]: p for p in result["perplexity"]}
    assert losses[methods[2]]["first_window_loss"] == pytest.approx(losses[methods[0]]["first_window_loss"], rel=1e-5)
    assert len({p["beyond_window_loss"] for p in result["perplexity"]}) == 5  # the adapters and the frozen memory
    assert result["titans"]["window"] == 64 and result["settings"]["samples"] == 2 and result["command"]
    assert out.with_suffix(".png").stat().st_size > 0
    loss_plot = tmp_path / "niah_answer_loss.png"
    assert loss_plot.stat().st_size > 0 and all(r["answer_loss"] > 0 for r in result["rows"])
    loss_plot.unlink()
    main(["--replot", str(out)])  # the plots again from the JSON alone
    assert loss_plot.stat().st_size > 0
    for bad, message in (
        (["--qwen", str(tmp_path / "none")], "no model directory"),
        (["--haystack", str(tmp_path)], "no .txt files"),
        (["--lengths", "20"], "too short"),
        (["--adapters", str(root / "other")], "trained for another model"),
        (["--adapters", str(root / "books")], "is not an adapters folder"),
    ):
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            main([*common, "--lengths", "100", *bad, "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.benchmark
def test_a_run_cut_short_keeps_the_methods_it_finished(tiny, tmp_path, monkeypatch):
    root, _, _ = tiny
    import benchmarks.niah as niah

    loaded = []

    def load_or_stop(folder, what):  # the window-only model never comes: Ctrl-C or a time limit
        loaded.append(what)
        if len(loaded) == 2:  # the two stock rows share one model
            raise KeyboardInterrupt
        return load_method(folder, what)

    load_method = niah.load_method
    monkeypatch.setattr(niah, "load_method", load_or_stop)
    out = tmp_path / "niah.json"
    argv = ["--qwen", str(root / "titans"), "--haystack", str(root / "books"), "--tasks", "passkey"]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--samples", "2", "--lengths", "100", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["stock mlx-lm, full attention", "stock mlx-lm, rotating cache 64+4"]
    assert not out.with_suffix(".png").exists()


@pytest.mark.benchmark
def test_memory_settings_apply_to_the_titans_qwen_rows(tiny, tmp_path):
    """--memory runs the TitansQwen rows with other memory settings: frozen by it, the adapters' row is the
    updates-off row, and the stock rows are untouched."""
    root, _, _ = tiny
    out = tmp_path / "niah.json"
    argv = ["--qwen", str(root / "titans"), "--haystack", str(root / "books"), "--tasks", "passkey", "--samples", "2"]
    argv += ["--adapters", str(root / "adapters"), "--memory-updates", "on", "off", "--stock", "full"]
    main([*argv, "--lengths", "140", "--memory", '{"max_lr": 0.0, "max_decay": 0.0}', "--out", str(out)])
    rows = {r["method"]: r["answer_loss"] for r in json.loads(out.read_text())["rows"]}
    on, off = f"TitansQwen + {root / 'adapters'}", f"TitansQwen + {root / 'adapters'}, memory updates off"
    assert rows[on] == rows[off] and rows[on] != rows["TitansQwen, no adapters"]
    main([*argv, "--lengths", "140", "--out", str(out)])
    assert json.loads(out.read_text())["rows"][0]["answer_loss"] == rows["stock mlx-lm, full attention"]
    assert {r["method"]: r["answer_loss"] for r in json.loads(out.read_text())["rows"]}[on] != rows[on]
