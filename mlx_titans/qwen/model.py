"""TitansQwen: mlx-lm's Qwen models with bounded attention and Titans neural memory layers.

Built on mlx-lm's own module of each type in QWEN_TYPES (qwen2, qwen3, their MoEs qwen2_moe / qwen3_moe, and the
hybrids qwen3_next, qwen3_5, qwen3_5_moe): the same modules and weight names (HF checkpoints load unchanged, a
vision-language checkpoint's text weights as mlx-lm's sanitize takes them), the same MLP or MoE block, lm_head /
tied-embedding, sanitize, quantization choices and inner model, plus a "titans" section in config.json:

    {"memory_layers": [3, 10, 17, 24], "window": 4096, "sink_tokens": 4, "segment_size": 2048,
     "memory": {MemoryConfig fields except dim, which is hidden_size}}

Attention sees the first `sink_tokens` tokens (StreamingLLM) and a window that slides once per segment: a token
of segment k = t // segment_size sees the `window` tokens before the segment's start and the segment up to itself
(between `window` and `window + segment_size` recent keys). So every call attends all the keys its cache holds under
a plain causal mask, mlx-lm's fused attention path, and no (queries x keys) mask is ever built. RoPE positions stay
bounded whatever the context length: in segment k a token at absolute index t sits at t - shift_k, with
shift_k = max(0, k * segment_size - window - sink_tokens), and the sinks at 0..s-1 (the cache rotates its window's
keys down once per segment). Distances inside the window are exact, no position exceeds
segment_size + window + sink_tokens, and since a query's keys and positions depend only on its own index, any split
of the input into calls gives the same outputs (calls are cut internally at segment boundaries). Until the first
eviction every shift is 0: the model is then exactly the base model.

In the hybrids only the full-attention layers get the window and sinks; their linear-attention (Gated DeltaNet)
layers run as mlx-lm has them, with their fixed-size state in mlx-lm's ArraysCache (LinearCache where the layer also
has a memory).

Memory layers (at any depth, either kind of layer), after the attention residual:
    h = h + memory_gate * NeuralMemory(post_attention_layernorm(h)).
memory_gate is per channel and starts at 0, so an untrained memory leaves the base model's outputs exactly unchanged.
Memory weights stay float32 and unquantized; converted models keep them in titans_memory.safetensors, beside
mlx-lm's model*.safetensors, which stock mlx-lm loads as the plain Qwen.
"""

import functools
import importlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.qwen3_next import Qwen3NextAttention

from ..memory_config import MemoryConfig
from ..neural_memory import NeuralMemory
from ..prefill import tokens_seen
from .cache import LinearCache, TitansCache
from .config import QWEN_TYPES, TitansQwenConfig, check_model_type


def is_memory_weight(name: str) -> bool:
    """model.layers.N.memory.* and model.layers.N.memory_gate: float32, never quantized, in MEMORY_WEIGHTS."""
    return ".memory" in name


def memory_weights(model) -> dict:
    return {k: v for k, v in tree_flatten(model.parameters()) if is_memory_weight(k)}


def output_layer(model):
    """mlx-lm's Qwen output layer of a stock or TitansQwen model: lm_head where it has one (qwen2_moe always does),
    else the tied embedding; a vision-language model's (qwen3_5) is its language_model's."""
    text = getattr(model, "language_model", model)
    return text.lm_head if "lm_head" in text else text.model.embed_tokens.as_linear


def window_attention(attn, x, mask, cache: TitansCache):
    """mlx-lm's Qwen attention over a TitansCache, with RoPE at the cache's bounded positions: qwen2 / qwen3 and
    their MoEs, and qwen3_next / qwen3_5's gated attention (its q_proj also yields a sigmoid gate on the output)."""
    B, L, _ = x.shape
    gated = isinstance(attn, Qwen3NextAttention)
    heads, kv_heads = (attn.num_attention_heads, attn.num_key_value_heads) if gated else (attn.n_heads, attn.n_kv_heads)
    queries = attn.q_proj(x).reshape(B, L, heads, -1)
    if gated:
        queries, gate = mx.split(queries, 2, axis=-1)
    keys = attn.k_proj(x).reshape(B, L, kv_heads, -1)
    values = attn.v_proj(x).reshape(B, L, kv_heads, -1).transpose(0, 2, 1, 3)
    if "q_norm" in attn:  # all but Qwen2
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries = attn.rope(queries.transpose(0, 2, 1, 3), offset=cache.offset - cache.position_shift())
    keys, values = cache.update_and_fetch(keys.transpose(0, 2, 1, 3), values, attn.rope)
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=attn.scale, mask=mask)
    out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return attn.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)) if gated else out)


@mx.compile
def gated_residual(h, gate, read):
    """h + gate * read in h's dtype: one fused kernel where the op-by-op form launches three (decode is
    launch bound)."""
    return h + (gate * read).astype(h.dtype)


class MemoryBlock:
    """Mixed into mlx-lm's decoder layer: windowed attention (a linear-attention layer keeps mlx-lm's own), then (in
    memory layers) the gated memory read."""

    indexed: bool  # whether mlx-lm's layer class takes its index

    def __init__(self, args, index: int, memory: Optional[MemoryConfig]):
        if self.indexed:
            super().__init__(args, index)
        else:
            super().__init__(args)
        if memory is not None:
            self.memory = NeuralMemory(memory)
            self.memory_gate = mx.zeros((args.hidden_size,))
            # the read's modules as implicit inputs (their weights as they are at each call), not the whole
            # block's: fewer arrays to flatten per call, and decode is host bound
            self._read_step = mx.compile(
                self._read_step_eager, inputs=[self.memory.state, self.post_attention_layernorm.state]
            )

    def __call__(self, x, mask=None, cache=None):
        if "linear_attn" in self:  # Gated DeltaNet (qwen3_next, qwen3_5): its fixed-size state in mlx-lm's cache
            h = x + self.linear_attn(self.input_layernorm(x), mask, cache)
        else:
            h = x + window_attention(self.self_attn, self.input_layernorm(x), mask, cache)
        if "memory" in self:
            h = self._memory_residual(h, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _memory_residual(self, h, cache):
        """h + memory_gate * memory(post_attention_layernorm(h)). A call that completes no memory chunk (63 decode
        steps in 64) runs as one compiled graph: decode is bound by kernel launches and Python calls per token."""
        state, n = cache.memory, h.shape[1]
        if state is None or self.memory.completes_chunk(state, n):
            read, cache.memory = self.memory(self.post_attention_layernorm(h), state)
            return gated_residual(h, self.memory_gate, read)
        h, remainder, conv = self._read_step(h, self.memory_gate, *self.memory.read_step_inputs(state))
        cache.memory = self.memory.state_after_read(state, remainder, conv, n)
        return h

    def _read_step_eager(self, h, gate, weights, remainder, conv):
        read, remainder, conv = self.memory.read_step(self.post_attention_layernorm(h), weights, remainder, conv)
        return gated_residual(h, gate, read), remainder, conv


class TitansQwen:
    """Mixed into mlx-lm's Model of a Qwen type (see `get_model_classes`); `model.titans` is the resolved section."""

    block_class: type

    def __init__(self, args):
        super().__init__(args)
        text = self.text_model.args
        self.titans = TitansQwenConfig.from_section(args.titans, text.num_hidden_layers, text.hidden_size)
        self.model.layers = [
            self.block_class(text, i, self.titans.memory if i in self.titans.memory_layers else None)
            for i in range(text.num_hidden_layers)
        ]

    @property
    def text_model(self):
        """The language model: this model, or a vision-language checkpoint's language_model (qwen3_5)."""
        return getattr(self, "language_model", self)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        """Logits (batch, tokens, vocab); without a cache the input starts a new context."""
        cache = self.make_cache() if cache is None else cache
        return self.head(self.hidden(inputs, cache, input_embeddings))

    def hidden(self, inputs, cache, input_embeddings=None):
        """The final hidden states, the input cut at segment boundaries (one RoPE shift per call)."""
        size, n = self.titans.segment_size, inputs.shape[1]
        pieces, start = [], 0
        while start < n:
            end = min(n, start + size - (tokens_seen(cache) % size if start == 0 else 0))
            # qwen2_moe's and qwen3_next's inner models take no embeddings
            embeddings = {} if input_embeddings is None else {"input_embeddings": input_embeddings[:, start:end]}
            pieces.append(self.model(inputs[:, start:end], cache, **embeddings))
            start = end
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)

    def head(self, h):
        return output_layer(self)(h)

    def description(self) -> dict:
        """What a saved cache depends on: the language model's config (shapes, RoPE) and the titans section."""
        base = {k: v for k, v in asdict(self.text_model.args).items() if k != "titans"}
        return {"model": "TitansQwen", "base": base, "titans": self.titans.to_section()}

    def make_cache(self) -> list:
        """A TitansCache per attention layer; a linear-attention layer keeps the ArraysCache of mlx-lm's make_cache,
        with the memory's state beside it in memory layers."""
        t = self.titans
        return [
            TitansCache(t.sink_tokens, t.window, t.segment_size)
            if "self_attn" in layer
            else (LinearCache if "memory" in layer else ArraysCache)(size=2)
            for layer in self.layers
        ]

    def sanitize(self, weights):
        """mlx-lm's sanitize; memory weights the checkpoint lacks keep their initial values (gate closed)."""
        return {**memory_weights(self), **super().sanitize(weights)}

    @property
    def quant_predicate(self):
        """mlx-lm's (the MoEs keep their routers at 8 bits), never quantizing the memory."""
        base = getattr(super(), "quant_predicate", None)
        return lambda path, module: not is_memory_weight(path) and (base is None or base(path, module))

    @property
    def cast_predicate(self):
        """mlx-lm's (qwen3_5 keeps A_log float32), never casting the memory."""
        base = getattr(super(), "cast_predicate", None)
        return lambda name: not is_memory_weight(name) and (base is None or base(name))


@functools.cache
def _classes(model_type: str):
    layers, block, takes_index = QWEN_TYPES[model_type]
    base = importlib.import_module(f"mlx_lm.models.{model_type}")

    @dataclass
    class ModelArgs(base.ModelArgs):
        titans: dict = field(default_factory=dict)

        @classmethod
        def from_dict(cls, params):
            """The base's from_dict (qwen3_5's makes a flat config its text_config), keeping the titans section."""
            args = super().from_dict(params)
            args.titans = params.get("titans", {})
            return args

    class TransformerBlock(MemoryBlock, getattr(importlib.import_module(f"mlx_lm.models.{layers}"), block)):
        indexed = takes_index

    class Model(TitansQwen, base.Model):
        block_class = TransformerBlock

    return Model, ModelArgs


def get_model_classes(config: dict):
    """(Model, ModelArgs) for mlx_lm.utils.load_model: TitansQwen on mlx-lm's model of a type in QWEN_TYPES."""
    check_model_type(config)
    return _classes(config["model_type"])
