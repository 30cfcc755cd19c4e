"""MemoryConfig: the settings of a NeuralMemory (see neural_memory.py for what they do)."""

from dataclasses import asdict, dataclass, fields
from typing import Optional

from .files import check_field_types, fingerprint


@dataclass(frozen=True)
class MemoryConfig:
    dim: int
    heads: int = 1
    dim_head: Optional[int] = None  # default dim // heads
    chunk_size: int = 64
    batch_size: Optional[int] = None  # tokens per mini-batch (multiple of chunk_size); None: one chunk; 0: never
    depth: int = 2  # 1 = linear memory
    expansion: float = 4.0
    residual_norm: bool = True  # M(x) = LN(MLP(x)) * (1 + gamma) + x
    momentum: bool = True
    momentum_order: int = 1
    weight_decay: bool = True
    channelwise_decay: bool = False  # alpha in [0, 1]^dim_head instead of a scalar per head
    max_lr: float = 0.1
    max_decay: float = 1.0  # alpha = max_decay * sigmoid(.): the most a chunk can forget (1 = the paper's [0, 1])
    per_head_init: bool = True  # learned initial weights per head, or one shared by all heads
    pre_norm: bool = True
    qk_rmsnorm: bool = False
    post_rmsnorm: bool = False
    conv_size: int = 0  # the paper's short depthwise causal conv on q/k/v (4); 0 = none
    qkv_silu: bool = False
    qk_l2norm: bool = False
    loss: str = "l2"  # or "huber"
    huber_delta: float = 1.0
    max_grad_norm: Optional[float] = None  # clamp each gradient tensor's norm per chunk: g * M / max(|g|, M)
    norm_eps: float = 1e-6
    init_lr_bias: Optional[float] = None
    init_momentum_bias: Optional[float] = None
    init_decay_bias: Optional[float] = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"MemoryConfig: {msg}")

        check_field_types(self)
        if self.dim < 1 or self.heads < 1 or self.chunk_size < 1 or self.depth < 1 or self.momentum_order < 1:
            bad("dim, heads, chunk_size, depth and momentum_order must be >= 1")
        if self.dim_head is None:
            if self.dim % self.heads:
                bad(f"dim {self.dim} is not divisible by heads {self.heads}; give dim_head")
            object.__setattr__(self, "dim_head", self.dim // self.heads)
        if self.batch_size is not None and (self.batch_size < 0 or self.batch_size % self.chunk_size):
            bad(f"batch_size {self.batch_size} must be 0 or a multiple of chunk_size {self.chunk_size}")
        if self.loss not in ("l2", "huber"):
            bad(f"loss must be 'l2' or 'huber', got {self.loss!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad("max_grad_norm must be positive")
        if self.conv_size < 0:
            bad("conv_size must be >= 0")
        if not 0 <= self.max_decay <= 1:
            bad(f"max_decay must be in [0, 1], got {self.max_decay}")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def refresh_chunks(self) -> int:
        """Chunks per mini-batch (gradient reference refresh period); 0 = never."""
        if self.batch_size is None:
            return 1
        return self.batch_size // self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MemoryConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        return fingerprint(self.to_dict())
