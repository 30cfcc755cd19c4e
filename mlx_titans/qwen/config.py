"""TitansQwenConfig: the "titans" section of a TitansQwen config.json, resolved against the defaults and checked."""

from dataclasses import dataclass

from ..files import check_field_types
from ..memory_config import MemoryConfig

# model_type: (the mlx-lm module of its decoder layer, the layer's class, whether the class takes the layer index).
# The model classes are mlx-lm's own module of that name; qwen3_5_moe's layers are qwen3_5's.
QWEN_TYPES = {
    "qwen2": ("qwen2", "TransformerBlock", False),
    "qwen3": ("qwen3", "TransformerBlock", False),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeDecoderLayer", False),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeDecoderLayer", True),
    "qwen3_next": ("qwen3_next", "Qwen3NextDecoderLayer", True),
    "qwen3_5": ("qwen3_5", "DecoderLayer", True),
    "qwen3_5_moe": ("qwen3_5", "DecoderLayer", True),
}


def check_model_type(config: dict, where: str = "the config") -> None:
    """ValueError naming the supported types unless config's model_type is one of them."""
    if config.get("model_type") not in QWEN_TYPES:
        raise ValueError(
            f"{where} holds a {config.get('model_type')!r} model; TitansQwen supports model_type "
            f"{', '.join(QWEN_TYPES)}"
        )


UNSCALED_ROPE = ("qwen2_moe", "qwen3_moe")  # types whose mlx-lm attention is a plain RoPE: it applies no scaling


def rope_type(settings: dict) -> str:
    """The RoPE type of a rope_scaling / rope_parameters dict, read as mlx-lm's initialize_rope reads it."""
    return settings.get("type") or settings.get("rope_type", "default")


def rope_settings(config: dict) -> dict:
    """config.json's RoPE settings under the keys mlx-lm's ModelArgs read, where the config has them only in
    transformers 5's rope_parameters: mlx-lm's qwen2, qwen2_moe, qwen3_moe and qwen3_next read rope_theta,
    rope_scaling and partial_rotary_factor alone and would silently run at their defaults, without the scaling (YaRN
    included). qwen3 and qwen3_5 read rope_parameters themselves; the keys added agree with what they read. A scaling
    that the type's mlx-lm module does not apply is refused, rather than dropped."""
    if "text_config" in config:  # a vision-language qwen3_5 / qwen3_5_moe: its text model reads rope_parameters
        return {}
    params = config.get("rope_parameters") or {}
    settings = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params and k not in config}
    if config.get("rope_scaling") is None and rope_type(params) != "default":
        settings["rope_scaling"] = params
    scaling = config.get("rope_scaling") or settings.get("rope_scaling") or {}
    if rope_type(scaling) != "default" and config["model_type"] in UNSCALED_ROPE:
        raise ValueError(
            f"config.json asks for {rope_type(scaling)!r} RoPE scaling, which mlx-lm's {config['model_type']} does "
            "not apply; remove it from config.json to run at the native RoPE (TitansQwen's positions stay below "
            "window + segment_size + sink_tokens)"
        )
    return settings


def text_config(config: dict) -> dict:
    """The language model's config: a vision-language checkpoint's text_config (qwen3_5), else the config itself."""
    return config.get("text_config", config)


DEFAULT_MEMORY = {"heads": 4, "chunk_size": 64}
# chunks per gradient reference (batch_size = 8 chunks): at the qwen2.5-7b shape on an H100 the exact rule
# prefilled 4K at 0.85x stock's rotating cache and 8 chunks at 0.93x; adapters trained with it recalled as the exact
# rule's did (docs/qwen.md, "Measured: a gradient reference per 8 chunks")
DEFAULT_CHUNKS_PER_REFERENCE = 8


def default_dim_head(hidden_size: int, heads) -> int:
    """128, or less where the memory would be wider than the model (heads * dim_head > hidden_size): such a memory
    costs more per token than the layers it serves (on the CPU a 128-wide Qwen2 with 4 x 128 memories prefilled at
    a third of stock mlx-lm's speed, benchmarks/results/prefill_speed_cpu.json)."""
    return max(1, min(128, hidden_size // heads)) if type(heads) is int and heads > 0 else 128


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
        chunk = memory.get("chunk_size", DEFAULT_MEMORY["chunk_size"])
        defaults = {
            **DEFAULT_MEMORY,
            "dim_head": default_dim_head(hidden_size, memory.get("heads", DEFAULT_MEMORY["heads"])),
            "batch_size": DEFAULT_CHUNKS_PER_REFERENCE * chunk if type(chunk) is int else None,  # bad: checked below
        }
        cfg = cls(layers, MemoryConfig.from_dict({**defaults, **memory, "dim": hidden_size}), **sizes)
        check_field_types(cfg)
        if any(not 0 <= i < num_layers for i in layers):
            bad(f"memory_layers {list(layers)} must lie in 0..{num_layers - 1}")
        if cfg.window < 1 or cfg.sink_tokens < 0:
            bad("window must be >= 1 and sink_tokens >= 0")
        if cfg.segment_size < 1 or cfg.segment_size % cfg.memory.chunk_size:
            bad(f"segment_size {cfg.segment_size} must be a multiple of the memory chunk_size {cfg.memory.chunk_size}")
        return cfg

    @classmethod
    def for_config(cls, section: dict, config: dict) -> "TitansQwenConfig":
        """from_section for the language model of a Qwen config.json (a vision-language one's text_config)."""
        text = text_config(config)
        return cls.from_section(section, text["num_hidden_layers"], text["hidden_size"])

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
