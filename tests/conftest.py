"""Shared test settings: every test starts from the same MLX and NumPy random state, so that a test's random inputs
do not depend on which tests ran before it (or on pytest -k / -x); and the tiny Hugging Face Qwen checkpoints the
TitansQwen tests build once."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.convert import convert as mlx_convert

from mlx_titans.qwen.config import QWEN_TYPES
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
