"""Shared test settings: every test starts from the same MLX and NumPy random state, so that a test's random inputs
do not depend on which tests ran before it (or on pytest -k / -x)."""

import mlx.core as mx
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def seeded():
    mx.random.seed(0)
    np.random.seed(0)
