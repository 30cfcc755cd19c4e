"""Shared test settings: every test starts from the same MLX and NumPy random state, so that a test's random inputs
do not depend on which tests ran before it (or on pytest -k / -x); and the tiny checkpoints the tests build once:
Hugging Face Qwens, a TitansQwen and a TitansLM."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.convert import convert as mlx_convert
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mlx_titans.model import TitansLM, TitansLMConfig, save_model
from mlx_titans.qwen.config import QWEN_TYPES
from mlx_titans.qwen.convert import convert
from mlx_titans.qwen.random_model import make_tiny_qwen


@pytest.fixture(autouse=True)
def seeded():
    mx.random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """A tiny HF checkpoint of every model type TitansQwen supports (make_tiny_qwen: qwen2 with lm_head and q/k/v
    bias, qwen3 with tied embeddings and q/k norms, ...; qwen3_moe tied too); and "mlx-4bit": what stock
    mlx_lm.convert -q makes of the qwen2 one."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {arch: make_tiny_qwen(root / arch, arch, tie=arch in ("qwen3", "qwen3_moe")) for arch in QWEN_TYPES}
    mlx_convert(str(dirs["qwen2"]), str(root / "mlx-4bit"), quantize=True)
    return {**dirs, "mlx-4bit": root / "mlx-4bit"}


@pytest.fixture(scope="session")
def titans_qwen(hf, tmp_path_factory):
    """A tiny 4-bit TitansQwen (window 16, one memory layer) converted from the qwen2 checkpoint."""
    out = tmp_path_factory.mktemp("titans-qwen") / "q"
    titans = {
        "memory_layers": [1],
        "window": 16,
        "segment_size": 16,
        "memory": {"heads": 2, "dim_head": 16, "chunk_size": 8},
    }
    convert(hf["qwen2"], out, quantize=True, titans=titans)
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny MAC model (checkpoint / "mac") with a byte-level tokenizer (one token per byte, so texts concatenate
    as token lists)."""
    root = tmp_path_factory.mktemp("gen")
    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(root / "tokenizer.json"))
    mx.random.seed(0)
    model = TitansLM(
        TitansLMConfig(variant="mac", vocab_size=256, dim=32, layers=2, heads=2, window=8, memory={"chunk_size": 4})
    )
    save_model(root / "mac", model, tokenizer_file=root / "tokenizer.json")
    return root
