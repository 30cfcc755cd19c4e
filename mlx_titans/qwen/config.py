"""TitansQwenConfig: the "titans" section of a TitansQwen config.json, resolved against the defaults and checked."""

from dataclasses import dataclass

from ..files import check_field_types
from ..memory_config import MemoryConfig

QWEN_TYPES = ("qwen2", "qwen3")
DEFAULT_MEMORY = {"heads": 4, "dim_head": 128, "chunk_size": 64}


def default_memory_layers(num_layers: int, count: int = 4) -> list:
    """`count` evenly spaced layers, one in the middle of each equal block of the stack (3, 10, 17, 24 of 28)."""
    step = max(1, num_layers // count)
    return list(range(step // 2, num_layers, step))[:count]


@dataclass(frozen=True)
class TitansQwenConfig:
    memory_layers: tuple
    memory: MemoryConfig
    window: int = 4096
    sink_tokens: int = 4
    segment_size: int = 2048  # prompt tokens per call in `prefill` (a multiple of the memory chunk)

    @classmethod
    def from_section(cls, section: dict, num_layers: int, hidden_size: int) -> "TitansQwenConfig":
        """Resolve a (possibly partial or empty) titans section against the defaults and check it."""

        def bad(msg):
            raise ValueError(f"titans config: {msg}")

        if not isinstance(section, dict):
            bad(f"the section must be an object, got {section!r}")
        unknown = set(section) - {"memory_layers", "window", "sink_tokens", "segment_size", "memory"}
        if unknown:
            bad(f"unknown fields {sorted(unknown)}")
        memory = section.get("memory", {})
        if not isinstance(memory, dict):
            bad(f"memory must be an object of MemoryConfig fields, got {memory!r}")
        if "dim" in memory:
            bad("memory.dim is the model's hidden_size; leave it out")
        layers = section.get("memory_layers")
        if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
            bad(f"memory_layers must be a list of layer indices, got {layers!r}")
        layers = tuple(sorted(set(default_memory_layers(num_layers) if layers is None else layers)))
        sizes = {k: section[k] for k in ("window", "sink_tokens", "segment_size") if k in section}
        cfg = cls(layers, MemoryConfig.from_dict({**DEFAULT_MEMORY, **memory, "dim": hidden_size}), **sizes)
        check_field_types(cfg)
        if any(not 0 <= i < num_layers for i in layers):
            bad(f"memory_layers {list(layers)} must lie in 0..{num_layers - 1}")
        if cfg.window < 1 or cfg.sink_tokens < 0:
            bad("window must be >= 1 and sink_tokens >= 0")
        if cfg.segment_size < 1 or cfg.segment_size % cfg.memory.chunk_size:
            bad(f"segment_size {cfg.segment_size} must be a multiple of the memory chunk_size {cfg.memory.chunk_size}")
        return cfg

    @property
    def first_beyond_window(self) -> int:
        """The first position whose attention no longer sees every token before it: the start of the first segment
        whose window begins after the sinks (tokens of segment k see the keys from k * segment_size - window on)."""
        return ((self.window + self.sink_tokens) // self.segment_size + 1) * self.segment_size

    def to_section(self) -> dict:
        memory = self.memory.to_dict()
        del memory["dim"]
        return {
            "memory_layers": list(self.memory_layers),
            "window": self.window,
            "sink_tokens": self.sink_tokens,
            "segment_size": self.segment_size,
            "memory": memory,
        }
