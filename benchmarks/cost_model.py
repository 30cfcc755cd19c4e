"""Analytic cost per token of a Qwen model under each context method, and a roofline projection to a Mac.

Decode at batch 1 is bound by memory traffic: every weight is read once per generated token, and attention reads
the cached keys and values it attends (all of them for a full KV cache, at most the window for a rotating cache or
TitansQwen). Prefill is bound by arithmetic: 2 FLOPs per weight per token, plus 4 * heads * head_dim FLOPs per layer
for every key a query attends (the useful ones: causal, inside the window). TitansQwen adds its memory layers:
float32 projections and memory MLPs read per token, and per chunk a gradient step on the memory MLP.

    decode tok/s  ~ bandwidth / decode_bytes(...)        prefill tok/s ~ FLOP/s / prefill_flops(...)

Training memory adapters (mlx_titans.adapt) is bound by arithmetic too, about three forwards per token
(adapt_flops), in a peak memory of the weights, the cache kept at every segment's start and one segment's
activations (adapt_peak_bytes).

The sizes come from the config alone (checked against built models in tests/test_cost_model.py), for every type
TitansQwen supports: an MoE layer's token reads and multiplies only its routed experts, and in a hybrid only the
attention layers' keys and values grow with the context (its Gated DeltaNet layers keep a fixed-size state).
"""

from dataclasses import dataclass

import numpy as np

from mlx_titans.qwen.config import text_config
from mlx_titans.qwen.random_model import HYBRIDS

M3_MAX = {"name": "Apple M3 Max", "bandwidth_gb_s": 400.0, "tflop_s": 10.6}  # 10.6: 8B 4-bit, 428 tok/s at 32K
METHODS = ("titans", "full", "rotating")
FLOAT32 = 4


EIGHT_BIT_ROUTERS = ("qwen3_moe", "qwen3_next", "qwen3_5_moe")  # mlx-lm's quant_predicate: routers at 8 bits


@dataclass(frozen=True)
class Shapes:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_layers: int  # the rest (hybrids) are Gated DeltaNet layers
    sparse_layers: int  # MoE layers; the rest have the dense MLP
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # the shared expert (qwen2_moe, qwen3_next, qwen3_5_moe)
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    conv_kernel: int = 0

    @classmethod
    def from_config(cls, config: dict) -> "Shapes":
        c, t = text_config(config), config["model_type"]
        L, experts = c["num_hidden_layers"], c.get("num_experts", 0)
        interval = c.get("full_attention_interval", 4) if t in HYBRIDS else 1
        sparse = [
            i
            for i in range(L)
            if experts and i not in c.get("mlp_only_layers", []) and (i + 1) % c.get("decoder_sparse_step", 1) == 0
        ]
        return cls(
            t,
            c["hidden_size"],
            L,
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            c["intermediate_size"],
            c["vocab_size"],
            c.get("tie_word_embeddings", False),
            L // interval,
            len(sparse),
            experts,
            c.get("num_experts_per_tok", 0),
            c.get("moe_intermediate_size", 0),
            c.get("shared_expert_intermediate_size", 0),
            *(c.get(f"linear_{k}", 0) for k in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim")),
            c.get("linear_conv_kernel_dim", 0),
        )

    @property
    def linear_layers(self) -> int:
        return self.layers - self.attention_layers

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in ("qwen2", "qwen2_moe")

    @property
    def gated(self) -> bool:
        """The hybrids' attention: q_proj also yields a gate on the output."""
        return self.model_type in HYBRIDS

    @property
    def linear_keys(self) -> int:
        return self.linear_key_heads * self.linear_key_dim

    @property
    def linear_values(self) -> int:
        return self.linear_value_heads * self.linear_value_dim


def expert_params(s: Shapes) -> int:
    """The routed experts' weights, all layers: a token reads experts_per_token of every layer's experts."""
    return s.sparse_layers * s.experts * 3 * s.hidden * s.expert_intermediate


def router_params(s: Shapes) -> int:
    """The routers (and shared-expert gates), all layers."""
    return s.sparse_layers * s.hidden * (s.experts + (s.shared_intermediate > 0))


def layer_matrix_params(s: Shapes) -> int:
    """The blocks' matrices, all layers, the routers left out (quantized in a 4-bit model): attention projections or
    the Gated DeltaNet's, and the SwiGLU MLP or the experts (and shared expert)."""
    attention = s.hidden * s.head_dim * ((2 + s.gated) * s.heads + 2 * s.kv_heads)
    linear = s.hidden * (2 * s.linear_keys + 3 * s.linear_values + 2 * s.linear_value_heads)
    moe = s.experts * 3 * s.hidden * s.expert_intermediate + 3 * s.hidden * s.shared_intermediate
    mlps = (s.layers - s.sparse_layers) * 3 * s.hidden * s.intermediate + s.sparse_layers * moe
    return s.attention_layers * attention + s.linear_layers * linear + mlps


def active_matrix_params(s: Shapes) -> int:
    """The blocks' matrices one token multiplies: the routers and experts_per_token experts per MoE layer."""
    unused = expert_params(s) * (1 - s.experts_per_token / s.experts) if s.experts else 0
    return layer_matrix_params(s) + router_params(s) - unused


def layer_vector_params(s: Shapes) -> int:
    """The blocks' vectors (never quantized), all layers: two RMSNorms each, Qwen2's q/k/v biases or the q/k norms,
    and the Gated DeltaNet's depthwise convolution, dt_bias, A_log and norm."""
    attention = (s.heads + 2 * s.kv_heads) * s.head_dim if s.qkv_bias else 2 * s.head_dim
    conv = (2 * s.linear_keys + s.linear_values) * s.conv_kernel
    linear = conv + 2 * s.linear_value_heads + s.linear_value_dim
    return 2 * s.hidden * s.layers + s.attention_layers * attention + s.linear_layers * linear


def matrix_bytes(n: int, bits, group_size: int, dtype_bytes: int) -> float:
    """Bytes of n weights: affine-quantized (bits per weight plus a scale and a bias per group) or plain."""
    return n * bits / 8 + n / group_size * 2 * dtype_bytes if bits else n * dtype_bytes


def base_weight_bytes(s: Shapes, bits, group_size: int, dtype_bytes: int) -> float:
    """The base model's parameter bytes: matrices at `bits`, the routers at 8 bits (group 64) where mlx-lm keeps
    them so (else at `bits`), vectors in the model dtype, and qwen3_5's A_log in float32 (its cast_predicate)."""
    routers = router_params(s) if s.model_type in EIGHT_BIT_ROUTERS else 0
    matrices = layer_matrix_params(s) + router_params(s) - routers + s.vocab * s.hidden * (1 if s.tied else 2)
    total = matrix_bytes(matrices, bits, group_size, dtype_bytes)
    total += matrix_bytes(routers, 8 if bits else None, 64, dtype_bytes)
    a_log = s.linear_layers * s.linear_value_heads * (s.model_type in ("qwen3_5", "qwen3_5_moe"))
    return total + (layer_vector_params(s) + s.hidden - a_log) * dtype_bytes + a_log * FLOAT32


def memory_sizes(titans: dict, hidden: int) -> dict:
    """Per memory layer (float32): 'matrices' read by every token (projections, gates), 'mlp' the memory MLP's
    weights over all heads, 'vectors' the rest (norms, biases, the residual gate)."""
    m = titans["memory"]
    heads, d = m["heads"], m["dim_head"] or hidden // m["heads"]
    inner = heads * d
    gates = 1 + m["momentum"] * m["momentum_order"] + m["weight_decay"] * (d if m["channelwise_decay"] else 1)
    matrices = 3 * hidden * inner + hidden * heads * gates
    matrices += hidden * heads * (heads > 1) + inner * hidden * (heads > 1 or inner != hidden)
    widths = [d] + [int(d * m["expansion"])] * (m["depth"] - 1) + [d]
    mlp = heads * (sum(a * b for a, b in zip(widths[:-1], widths[1:])) + d * m["residual_norm"])
    vectors = heads * gates + 2 * hidden * m["pre_norm"] + hidden  # gate biases, norms, memory_gate
    vectors += 3 * m["conv_size"] * inner + 2 * heads * d * m["qk_rmsnorm"] + heads * d * m["post_rmsnorm"]
    return {"matrices": matrices, "mlp": mlp, "vectors": vectors}


def weight_bytes(config: dict, method: str, titans: dict, bits=4, group_size=64, dtype_bytes=2) -> float:
    """All parameter bytes of the model (the memory weights only for titans)."""
    s = Shapes.from_config(config)
    total = base_weight_bytes(s, bits, group_size, dtype_bytes)
    if method == "titans":
        total += len(titans["memory_layers"]) * sum(memory_sizes(titans, s.hidden).values()) * FLOAT32
    return total


def attended(method: str, context: int, titans: dict, max_kv_size: int) -> float:
    """Keys a generated token attends at this context length (TitansQwen: averaged over a segment, since its
    window slides once per segment: the sinks, `window` tokens, and on average half a segment plus itself)."""
    if method == "full":
        return context
    if method == "rotating":
        return min(context, max_kv_size)
    return min(context, titans["sink_tokens"] + titans["window"] + (titans["segment_size"] + 1) / 2)


def kv_bytes_per_token(config: dict, dtype_bytes=2) -> int:
    """The keys and values of one token, in every attention layer (a hybrid's linear-attention layers keep none)."""
    s = Shapes.from_config(config)
    return 2 * s.attention_layers * s.kv_heads * s.head_dim * dtype_bytes


def linear_state_bytes(config: dict, batch: int = 1, dtype_bytes=2) -> int:
    """A hybrid's Gated DeltaNet layers' fixed-size state (mlx-lm's ArraysCache): the convolution's last
    kernel - 1 inputs (model dtype) and the float32 recurrent state, heads x value dim x key dim, per layer."""
    s = Shapes.from_config(config)
    conv = (s.conv_kernel - 1) * (2 * s.linear_keys + s.linear_values) * dtype_bytes
    recurrent = s.linear_value_heads * s.linear_value_dim * s.linear_key_dim * FLOAT32
    return batch * s.linear_layers * (conv + recurrent)


def decode_bytes(config, method, context, titans, max_kv_size, bits=4, group_size=64, dtype_bytes=2) -> float:
    """Bytes read to generate one token at this context: the weights (the embedding table only one row, of each MoE
    layer only the experts_per_token experts routed to) and the attended keys and values (in a hybrid only its
    attention layers', and its linear-attention state read and written); for titans also the memory layers, and per
    chunk (amortized) the memory MLP's weights and momentum read and written by its update."""
    s = Shapes.from_config(config)
    total = weight_bytes(config, method, titans, bits, group_size, dtype_bytes)
    if not s.tied:  # the input embedding: one row of a separate table
        total -= matrix_bytes(s.vocab * s.hidden, bits, group_size, dtype_bytes) * (1 - 1 / s.vocab)
    if s.experts:
        total -= matrix_bytes(expert_params(s), bits, group_size, dtype_bytes) * (1 - s.experts_per_token / s.experts)
    total += kv_bytes_per_token(config, dtype_bytes) * attended(method, context, titans, max_kv_size)
    total += 2 * linear_state_bytes(config, 1, dtype_bytes)
    if method == "titans":
        mem = memory_sizes(titans, s.hidden)
        total += len(titans["memory_layers"]) * 4 * mem["mlp"] * FLOAT32 / titans["memory"]["chunk_size"]
    return total


def mean_attended(method: str, context: int, titans: dict, max_kv_size: int) -> float:
    """Keys attended per query, averaged over a prompt of `context` tokens (causal: token t sees t keys)."""
    if method == "full":
        return (context + 1) / 2
    k = attended(method, context, titans, max_kv_size)
    if context <= k:
        return (context + 1) / 2
    return (k * (k + 1) / 2 + (context - k) * k) / context


def attention_flops(config, method, context, titans, max_kv_size) -> float:
    """Attention's FLOPs per token of a `context`-token prompt: scores and weighted values, 4 * heads * head_dim
    per attention layer for every key a query attends."""
    s = Shapes.from_config(config)
    return 4 * s.attention_layers * s.heads * s.head_dim * mean_attended(method, context, titans, max_kv_size)


def prefill_flops(config, method, context, titans, max_kv_size) -> float:
    """FLOPs per token of a `context`-token prompt (the output layer only runs on the last token: left out): 2 per
    weight a token multiplies (MoE: the routed experts only), attention, and a hybrid's Gated DeltaNet recurrence
    (about 4 passes over its state per token, 2 FLOPs per entry: decay, read, update, output). The memory: its
    projections, and per token a retrieval through the memory MLP plus the update's forward and backward of the keys
    (about 4 MLP passes)."""
    s = Shapes.from_config(config)
    flops = 2 * active_matrix_params(s) + attention_flops(config, method, context, titans, max_kv_size)
    flops += 8 * s.linear_layers * s.linear_value_heads * s.linear_value_dim * s.linear_key_dim
    if method == "titans":
        mem = memory_sizes(titans, s.hidden)
        flops += len(titans["memory_layers"]) * (2 * mem["matrices"] + 8 * mem["mlp"])
    return flops


# ---------------------------------------------------------------- one adapter training step (mlx_titans.adapt)
ADAPT_FORWARDS = 3  # the sweep, the recomputation, the backward (input gradients only): see adapt_flops


def adapt_flops(config, titans, sample_length: int) -> float:
    """FLOPs per trained token of one step of mlx_titans.adapt (segment by segment, its default).

    Counted as ADAPT_FORWARDS = 3 forwards, each with logits for every token (the loss reads them all), plus one
    more forward's attention:
    - the forward sweep (loss and the cache at each segment's start) and each segment's recomputation inside mx.vjp
      are one forward each;
    - the backward: the base is frozen, so it needs only input gradients, one product per weight (dx = dy W^T, as
      many FLOPs as the forward's y = x W; no weight gradients, which would be another forward's worth), but
      attention's backward takes four products per key (dV, dP, dQ, dK) where its forward takes two (S, PV).
    The memory layers (~2% of the FLOPs of Qwen2.5-0.5B or 7B with the default titans section) are counted at 3
    forwards too, though being trained and differentiated through their own update they cost more: a small
    under-count."""
    s = Shapes.from_config(config)
    forward = prefill_flops(config, "titans", sample_length, titans, None) + 2 * s.vocab * s.hidden
    return ADAPT_FORWARDS * forward + attention_flops(config, "titans", sample_length, titans, None)


def memory_state_bytes(titans: dict, hidden: int, batch: int = 1) -> int:
    """One memory layer's MemoryState at a chunk boundary (float32, nothing left in its remainder): per head the
    memory MLP's weights, as many again per momentum order and for the gradient reference (kept with mini-batches
    of other than one chunk), and the convolution's caches."""
    m = titans["memory"]
    inner = m["heads"] * (m["dim_head"] or hidden // m["heads"])
    reference = m["batch_size"] is not None and m["batch_size"] != m["chunk_size"]
    copies = 1 + m["momentum"] * m["momentum_order"] + reference
    conv = (m["conv_size"] - 1) * 3 * inner if m["conv_size"] else 0
    return batch * (copies * memory_sizes(titans, hidden)["mlp"] + conv) * FLOAT32


def cache_bytes(config: dict, titans: dict, offset: int, batch: int = 1, dtype_bytes=2) -> int:
    """All layers' cache arrays at a segment boundary `offset` > 0 tokens in: the TitansCaches' keys and values of the
    sinks and the window (of every token before the window fills), a hybrid's linear-attention state, and the
    memory layers' states. A RoPE whose rotations do not compose (YaRN) also keeps keys before RoPE: not counted."""
    held = min(offset, titans["sink_tokens"] + titans["window"])
    memory = len(titans["memory_layers"]) * memory_state_bytes(titans, Shapes.from_config(config).hidden, batch)
    linear = linear_state_bytes(config, batch, dtype_bytes)
    return batch * kv_bytes_per_token(config, dtype_bytes) * held + linear + memory


def segment_activation_bytes(config: dict, titans: dict, batch: int = 1, dtype_bytes=2) -> float:
    """A rough count of what one segment's backward holds (mx.vjp of the segment): per token, the logits, their
    float32 copy and its gradient, and per layer the residual stream and the two norms' outputs, the queries and
    attention output (a linear-attention layer: its queries, keys, values and output gate), the MLP's gate, up and
    their product (MoE: of the routed experts and the shared one) (model dtype); the keys and values attended (sinks,
    window and the segment); in memory layers per token the float32 queries, keys, values and the memory MLP's
    hidden activations (3 per hidden unit: the store's forward, its gradient, the read), and per chunk the memory
    weights after it, their momentum and the chunk's gradient; and one layer's attention probabilities and their
    gradient in float32 (assuming the backward of mx.fast.scaled_dot_product_attention is MLX's unfused fallback;
    a fused one would drop this term). Temporaries of the kernels and MLX's graph bookkeeping are not counted."""
    s, m, g = Shapes.from_config(config), titans["memory"], titans["segment_size"]
    memory_layers, keys = len(titans["memory_layers"]), titans["sink_tokens"] + titans["window"] + g
    inner = m["heads"] * (m["dim_head"] or s.hidden // m["heads"])
    per_token = s.vocab * (dtype_bytes + 2 * FLOAT32)
    mlp = (s.layers - s.sparse_layers) * s.intermediate
    mlp += s.sparse_layers * (s.experts_per_token * s.expert_intermediate + s.shared_intermediate)
    mixers = s.attention_layers * 2 * s.heads * s.head_dim + s.linear_layers * 2 * (s.linear_keys + s.linear_values)
    per_token += (3 * s.hidden * s.layers + mixers + 3 * mlp) * dtype_bytes
    per_token += memory_layers * (3 + 3 * m["expansion"] * (m["depth"] - 1)) * inner * FLOAT32
    chunk_states = (2 + m["momentum"] * m["momentum_order"]) * memory_sizes(titans, s.hidden)["mlp"] * FLOAT32
    chunk_states *= memory_layers * g // m["chunk_size"]
    probabilities = 2 * s.heads * g * keys * FLOAT32
    return batch * (g * per_token + kv_bytes_per_token(config, dtype_bytes) * keys + chunk_states + probabilities)


def adapt_peak_bytes(config, titans, sample_length: int, batch=1, bits=4, group_size=64, dtype_bytes=2) -> dict:
    """Peak memory of one step of mlx_titans.adapt, by part: 'weights' (the whole model at `bits`), 'gradients'
    (the memory layers' float32 gradients: the running sum and one segment's), 'optimizer' (AdamW's two moments of
    them), 'caches' (the cache at each segment's start, kept through the step: see cache_bytes), 'activations'
    (one segment's: see segment_activation_bytes), and their 'total'."""
    trainable = len(titans["memory_layers"]) * sum(memory_sizes(titans, Shapes.from_config(config).hidden).values())
    trainable *= FLOAT32
    size = titans["segment_size"]
    parts = {
        "weights": weight_bytes(config, "titans", titans, bits, group_size, dtype_bytes),
        "gradients": 2 * trainable,
        "optimizer": 2 * trainable,
        "caches": sum(
            cache_bytes(config, titans, min(start, sample_length), batch, dtype_bytes)
            for start in range(size, sample_length + size, size)
        ),
        "activations": segment_activation_bytes(config, titans, batch, dtype_bytes),
    }
    return {**parts, "total": sum(parts.values())}


def fit_time_per_token(work, seconds_per_token) -> dict:
    """Least-squares seconds/token = overhead + work / rate over measured rows; the fit and its worst error."""
    work, t = np.asarray(work, float), np.asarray(seconds_per_token, float)
    slope, overhead = np.polyfit(work, t, 1)
    predicted = overhead + slope * work
    return {
        "overhead_ms": 1e3 * float(overhead),
        "rate": float(1 / slope) if slope > 0 else float("inf"),
        "max_rel_error": float(np.max(np.abs(predicted - t) / t)),
        "predicted_tps": (1 / predicted).tolist(),
    }
