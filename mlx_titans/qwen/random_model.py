"""Qwen models with random weights, built offline: for tests, benchmarks and trying the converter without a download.

    python -m mlx_titans.qwen.random_model OUT [qwen2|qwen3|qwen2_moe|...]   # a tiny checkpoint in Hugging Face layout

make_tiny_qwen writes a Hugging Face checkpoint (numpy, tokenizers, safetensors): a ByteLevel BPE tokenizer trained
on a few sentences, float32 weights (std 0.02) under the HF names, config.json and generation_config.json as
transformers writes them. Its defaults, hidden 64 and intermediate 128, keep every Linear divisible by the
quantization group size 64. random_model builds a TitansQwen or a stock mlx-lm model in memory from a Qwen config,
e.g. one of PRESETS (the shapes of real Hugging Face configs), cast and quantized as the converter does.
"""

import copy
import importlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import quantize_model
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from . import get_model_classes
from .convert import cast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Titans neural memory learns at test time.",
    "Hello world! Long context generation with memory augmented Qwen models.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(out: Path, vocab_size: int):
    """Write tokenizer.json and tokenizer_config.json; return the ids of <|im_end|> (eos) and <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 50, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")


HYBRIDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")  # Gated DeltaNet layers, then one full-attention layer


def make_tiny_qwen(
    out,
    arch="qwen2",
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    inter=128,
    vocab=1000,
    tie=False,
    model_type=None,
    seed=0,
    experts=4,
) -> Path:
    """Write a random `arch` checkpoint into `out`, under the Hugging Face names and layout of that type: "qwen2"
    (q/k/v bias), "qwen3" (q/k norms, head_dim), their MoEs "qwen2_moe" (a shared expert; always an lm_head) and
    "qwen3_moe" (`experts` experts of size `inter` // 2, 2 per token), and the hybrids of HYBRIDS, whose layers
    alternate Gated DeltaNet and gated full attention (full_attention_interval 2): "qwen3_next" (MoE), "qwen3_5"
    (dense) and "qwen3_5_moe" (fused experts), the last two as vision-language checkpoints (text_config; the language
    model's weights under model.language_model, and a vision weight that loading drops). Hybrids store their
    RMSNorm weights centred on 0, as Qwen3-Next does. model_type overrides config.json's (to make one not Qwen)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eos, pad = make_tokenizer(out, vocab)
    rng = np.random.default_rng(seed)
    head_dim, moe_inter, hybrid = hidden // heads, inter // 2, arch in HYBRIDS
    lk_heads, lv_heads, l_dim, conv = 2, 4, 16, 4  # Gated DeltaNet: key heads, value heads, head size, conv kernel

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm(n):  # RMSNorm weights: 1, or 0 where the model adds 1 (hybrids)
        return np.zeros(n, np.float32) if hybrid else np.ones(n, np.float32)

    def glu(prefix, size):
        return {f"{prefix}{n}.weight": normal(size, hidden) for n in ("gate_proj", "up_proj")} | {
            f"{prefix}down_proj.weight": normal(hidden, size)
        }

    def mlp(p):
        if arch in ("qwen2", "qwen3", "qwen3_5"):
            return glu(f"{p}mlp.", inter)
        w = {f"{p}mlp.gate.weight": normal(experts, hidden)}
        if arch == "qwen3_5_moe":  # transformers 5 fuses the experts
            w[f"{p}mlp.experts.gate_up_proj"] = normal(experts, 2 * moe_inter, hidden)
            w[f"{p}mlp.experts.down_proj"] = normal(experts, hidden, moe_inter)
        else:
            for e in range(experts):
                w |= glu(f"{p}mlp.experts.{e}.", moe_inter)
        if arch != "qwen3_moe":
            w |= glu(f"{p}mlp.shared_expert.", moe_inter)
            w[f"{p}mlp.shared_expert_gate.weight"] = normal(1, hidden)
        return w

    def attention(p):
        w = {}
        for name, n in (("q", heads * (2 if hybrid else 1)), ("k", kv_heads), ("v", kv_heads)):  # hybrids: q + gate
            w[f"{p}self_attn.{name}_proj.weight"] = normal(n * head_dim, hidden)
            if arch in ("qwen2", "qwen2_moe"):
                w[f"{p}self_attn.{name}_proj.bias"] = normal(n * head_dim)
        if arch not in ("qwen2", "qwen2_moe"):
            w[f"{p}self_attn.q_norm.weight"] = norm(head_dim)
            w[f"{p}self_attn.k_norm.weight"] = norm(head_dim)
        w[f"{p}self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        return w

    def linear_attention(p):
        p, keys, values = f"{p}linear_attn.", lk_heads * l_dim, lv_heads * l_dim
        w = {
            f"{p}conv1d.weight": normal(2 * keys + values, 1, conv),
            f"{p}dt_bias": np.ones(lv_heads, np.float32),
            f"{p}A_log": np.log(rng.uniform(1, 16, lv_heads)).astype(np.float32),
            f"{p}norm.weight": np.ones(l_dim, np.float32),
            f"{p}out_proj.weight": normal(hidden, values),
        }
        if arch == "qwen3_next":
            w[f"{p}in_proj_qkvz.weight"] = normal(2 * keys + 2 * values, hidden)
            w[f"{p}in_proj_ba.weight"] = normal(2 * lv_heads, hidden)
        else:
            w[f"{p}in_proj_qkv.weight"] = normal(2 * keys + values, hidden)
            w[f"{p}in_proj_z.weight"] = normal(values, hidden)
            w[f"{p}in_proj_b.weight"] = normal(lv_heads, hidden)
            w[f"{p}in_proj_a.weight"] = normal(lv_heads, hidden)
        return w

    root = "model.language_model." if arch in ("qwen3_5", "qwen3_5_moe") else "model."
    w = {f"{root}embed_tokens.weight": normal(vocab, hidden), f"{root}norm.weight": norm(hidden)}
    if not tie:
        w["lm_head.weight"] = normal(vocab, hidden)
    if root != "model.":
        w["model.visual.patch_embed.proj.weight"] = normal(hidden, 3, 2, 2)
    for i in range(layers):
        p = f"{root}layers.{i}."
        w |= linear_attention(p) if hybrid and i % 2 == 0 else attention(p)
        w |= mlp(p)
        w[f"{p}input_layernorm.weight"] = norm(hidden)
        w[f"{p}post_attention_layernorm.weight"] = norm(hidden)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": model_type or arch,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "bos_token_id": pad,
        "eos_token_id": eos,
    }
    if arch != "qwen2":
        config["head_dim"] = head_dim
    if arch not in ("qwen2", "qwen3", "qwen3_5"):
        shared = {} if arch == "qwen3_moe" else {"shared_expert_intermediate_size": moe_inter}
        config |= {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": moe_inter, **shared}
        config |= {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    if hybrid:
        config |= {
            "full_attention_interval": 2,
            "partial_rotary_factor": 0.25,
            "linear_num_key_heads": lk_heads,
            "linear_num_value_heads": lv_heads,
            "linear_key_head_dim": l_dim,
            "linear_value_head_dim": l_dim,
            "linear_conv_kernel_dim": conv,
        }
    if root != "model.":  # transformers 5's vision-language layout: RoPE settings in rope_parameters
        rope = {"rope_type": "default", "rope_theta": config.pop("rope_theta"), "mrope_section": [1, 1, 0]}
        rope["partial_rotary_factor"] = config.pop("partial_rotary_factor")
        text = {**config, "model_type": f"{arch}_text", "rope_parameters": rope}
        config = {"model_type": model_type or arch, "text_config": text, "vision_config": {"hidden_size": hidden}}
        config |= {"tie_word_embeddings": tie, "torch_dtype": "bfloat16", "eos_token_id": eos}
    name = arch.title().replace("_", "")  # Qwen2Moe, Qwen3Next; Qwen3_5 and Qwen3_5Moe keep their underscore
    name = name.replace("Qwen35", "Qwen3_5")
    config["architectures"] = [f"{name}ForCausalLM" if root == "model." else f"{name}ForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, pad]}))
    return out


PRESETS = {  # the shapes of the Hugging Face configs (the qwen3.6 ones partly inferred: see their notes)
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen3-8b": dict(
        model_type="qwen3",
        hidden_size=4096,
        num_hidden_layers=36,
        intermediate_size=12288,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    # Qwen/Qwen3-30B-A3B's config.json (every layer sparse: decoder_sparse_step 1, no mlp_only_layers)
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        num_hidden_layers=48,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        vocab_size=151936,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # Qwen3.6-35B-A3B (qwen3_5_moe), a text-only config. From shared/reference/paper-and-peers.md §8: 40 layers of
    # which 10 attend (full_attention_interval 4), a KV cache of ~20 KB per token (2 x 10 layers x 2 KV heads x
    # head_dim 256 x 2 bytes), vocab 248,320. The rest is inferred, not read from the published config (no Hub
    # here): Qwen3-Next-80B-A3B's published widths (hidden 2048, 16 query heads, linear attention 16 key / 32 value
    # heads of 128, experts of 512 with a shared one of 512, 10 of 512 routed) with 256 experts, 8 routed, which
    # gives ~35B parameters, ~3B active. partial_rotary_factor 0.25 and rope_theta 1e7 as Qwen3-Next.
    "qwen3.6-35b-a3b": dict(
        model_type="qwen3_5_moe",
        hidden_size=2048,
        num_hidden_layers=40,
        intermediate_size=512,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        full_attention_interval=4,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        norm_topk_prob=True,
        vocab_size=248320,
        tie_word_embeddings=False,
        max_position_embeddings=262144,
        rope_theta=1e7,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    ),
    # Qwen3.6-27B (qwen3_5, dense hybrid), a text-only config. From §8: the qwen3_5 architecture (3 Gated DeltaNet
    # layers to 1 attention layer), vocab 248,320. The widths are inferred, not read from the published config:
    # hidden 5120, 64 layers, 24 query / 4 KV heads of 256, linear attention 16 key / 48 value heads of 128, MLP
    # 17,408, which gives ~27B parameters; RoPE as the preset above.
    "qwen3.6-27b": dict(
        model_type="qwen3_5",
        hidden_size=5120,
        num_hidden_layers=64,
        intermediate_size=17408,
        num_attention_heads=24,
        num_key_value_heads=4,
        head_dim=256,
        full_attention_interval=4,
        linear_num_key_heads=16,
        linear_num_value_heads=48,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        vocab_size=248320,
        tie_word_embeddings=False,
        max_position_embeddings=262144,
        rope_theta=1e7,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    ),
    "tiny": dict(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
    "cpu-128": dict(  # issue 21's CPU speed models: a memory wider than the model, and one that is a small part
        model_type="qwen2",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=True,
    ),
    "cpu-1024": dict(
        model_type="qwen2",
        hidden_size=1024,
        num_hidden_layers=16,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=1000,
        tie_word_embeddings=True,
    ),
}
COMMON = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768)


def preset_config(name: str) -> dict:
    """The Qwen config of a preset: its shapes and the settings every preset shares (a copy: mlx-lm's qwen3_5
    rewrites rope_parameters in place)."""
    return copy.deepcopy({**COMMON, **PRESETS[name]})


def random_model(config: dict, titans=None, bits=None, group_size: int = 64, dtype: str = "bfloat16"):
    """A model of the Qwen config's shapes with random weights (seed 0): TitansQwen with the `titans` section, or
    stock mlx-lm's model when `titans` is None; cast to `dtype` and quantized to `bits` as the converter does."""
    if titans is not None:
        model_class, args_class = get_model_classes(config)
        args = args_class.from_dict({**config, "titans": titans})
    else:
        base = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        model_class, args_class = base.Model, base.ModelArgs
        args = args_class.from_dict(config)
    mx.random.seed(0)
    model = model_class(args)
    cast(model, dtype)
    if bits:
        model, _ = quantize_model(model, config, group_size, bits)
    mx.eval(model.parameters())
    return model


if __name__ == "__main__":
    make_tiny_qwen(sys.argv[1], *sys.argv[2:3])
