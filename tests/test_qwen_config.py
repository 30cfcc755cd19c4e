"""TitansQwenConfig's defaults: a gradient reference shared by 8 chunks unless the section says otherwise."""

import pytest

from mlx_titans.qwen.config import TitansQwenConfig


def resolve(memory: dict) -> TitansQwenConfig:
    return TitansQwenConfig.from_section({"memory": memory}, num_layers=8, hidden_size=256)


def test_default_rule_shares_a_reference_per_8_chunks_and_old_sections_keep_theirs():
    assert resolve({}).memory.batch_size == 8 * 64
    assert resolve({"chunk_size": 16}).memory.refresh_chunks == 8
    exact = resolve({"batch_size": None})  # what configs written before the default changed hold
    assert exact.memory.batch_size is None and exact.memory.refresh_chunks == 1
    written = resolve({}).to_section()
    assert TitansQwenConfig.from_section(written, 8, 256) == resolve({})


def test_a_chunk_size_of_the_wrong_type_is_named_not_multiplied():
    with pytest.raises(ValueError, match="chunk_size must be int, got '64'"):
        resolve({"chunk_size": "64"})
