"""A small Qwen3-architecture base model pretrained from scratch with mlx-lm: its tokenizer, random init and data.

    write_tokenizer("runs/qwen_base/tokenizer", text_files("../shared/data/books/train"), vocab_size=8192)
    write_random_model("runs/qwen_base/model", "runs/qwen_base/tokenizer")   # PRESET sizes, mlx-lm's qwen3 init
    write_data("runs/qwen_base/data", tokenizer, "../shared/data/books/train", "../shared/data/books/valid",
               seq_len=512, tokens=2_000_000, valid_tokens=100_000, needle_fraction=0.1, seed=0)
    python -m mlx_titans.corpus -c train.yaml        # mlx-lm's `lora` command line, every weight trained
    python -m mlx_lm fuse --model runs/qwen_base/model --adapter-path ADAPTERS --save-path runs/qwen_base/base

The data is mlx-lm's `text` format (train.jsonl / valid.jsonl of {"text": ...}): windows of about `seq_len` tokens
of the books, decoded, and a `needle_fraction` of text needle rows (mlx_titans.text_needles.training_row, the task
drawn uniformly, its haystack from the same split), so that the base model learns to retrieve within its context.
Every row re-encodes to at most `seq_len` tokens, so with mlx-lm's appended eos it fits --max-seq-length seq_len + 1
and no answer is truncated.
"""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3
from mlx_lm.utils import save_config, save_model
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from mlx_titans.files import atomic_folder
from mlx_titans.text_needles import TASKS, make_haystack, training_row
from mlx_titans.tokenizer import EOS, save_tokenizer, train_tokenizer

PRESET = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 768,
}


def text_files(folder) -> list:
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise ValueError(f"no .txt files in {folder}")
    return files


def write_tokenizer(folder, files, vocab_size: int) -> None:
    """A byte-level BPE trained on `files`, as a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json)
    that mlx_lm.utils.load_tokenizer and transformers.AutoTokenizer read; <|endoftext|> is its eos."""
    tokenizer = train_tokenizer(files, vocab_size)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
    }
    with atomic_folder(folder) as tmp:
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_hf_tokenizer(folder) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def model_config(vocab_size: int, eos_token_id: int, **sizes) -> dict:
    """A Hugging Face qwen3 config.json: PRESET sizes, overridden by `sizes` (hidden_size=64, ...)."""
    unknown = set(sizes) - set(PRESET)
    if unknown:
        raise ValueError(f"unknown model sizes {sorted(unknown)}; choose from {', '.join(PRESET)}")
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        **PRESET,
        **sizes,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "torch_dtype": "float32",
    }


def write_random_model(folder, tokenizer_folder, seed: int = 0, **sizes) -> dict:
    """mlx-lm's own qwen3 Model with MLX's default init (float32), saved with the tokenizer's files into `folder`
    so that mlx_lm.load reads it. Returns the config."""
    tokenizer_folder = Path(tokenizer_folder)
    tokenizer = load_hf_tokenizer(tokenizer_folder)
    config = model_config(len(tokenizer), tokenizer.eos_token_id, **sizes)
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    with atomic_folder(folder) as tmp:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_folder / name, tmp / name)
    return config


def encode_files(files, tokenizer) -> list:
    """Token ids (an int32 array) of each file's text."""
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    return [np.array(ids, np.int32) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def book_windows(ids_per_file, seq_len: int) -> np.ndarray:
    """(windows, seq_len): non-overlapping stretches of each file's ids, a file's tail shorter than seq_len left out."""
    windows = np.concatenate([ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len) for ids in ids_per_file])
    if not len(windows):
        raise ValueError(f"no text file is {seq_len} tokens long")
    return windows


def fitted_text(ids, tokenizer, seq_len: int) -> str:
    """The decoded text of `ids`, cut at its end until it re-encodes to at most seq_len tokens (a decoded window
    can re-encode a token or two longer where the BPE merges across the window's edges differently)."""
    ids = list(ids[:seq_len])
    while True:
        text = tokenizer.decode(ids)
        excess = len(tokenizer.encode(text, add_special_tokens=False)) - seq_len
        if excess <= 0:
            return text
        ids = ids[:-excess]


def needle_text(task: str, tokenizer, haystack, seq_len: int, rng) -> str:
    """The decoded text of a training_row of `task` (haystack with the needle, the question, the answer sentence),
    at most seq_len tokens when re-encoded: a row that re-encodes longer is drawn again, shorter by the excess."""
    length = seq_len
    while True:
        inputs, targets, _ = training_row(task, tokenizer, haystack, length - 1, rng)
        text = tokenizer.decode(np.concatenate([inputs[:1], targets]).tolist())
        excess = len(tokenizer.encode(text, add_special_tokens=False)) - seq_len
        if excess <= 0:
            return text
        length -= excess


def write_rows(
    path, tokenizer, files, tokens: int, seq_len: int, needle_fraction: float, rng, desc: str, tasks=TASKS
) -> dict:
    """`tokens // seq_len` rows of about seq_len tokens into a jsonl file: book windows of `files` in a shuffled order
    (another shuffle each time the windows run out) and, with probability needle_fraction each, text needle rows whose
    haystack is the same text, their task drawn uniformly from `tasks`. Returns {"rows", "needle_rows",
    "book_windows"}."""
    ids_per_file = encode_files(files, tokenizer)
    windows = book_windows(ids_per_file, seq_len)
    haystack = make_haystack(np.concatenate(ids_per_file), tokenizer)
    rows = tokens // seq_len
    if rows < 1:
        raise ValueError(f"{tokens} tokens make no row of {seq_len}")
    is_needle = rng.uniform(size=rows) < needle_fraction
    order = np.concatenate([rng.permutation(len(windows)) for _ in range(-(-rows // len(windows)))])
    with open(path, "w") as f:
        for i in tqdm(range(rows), desc=desc, unit="row"):
            if is_needle[i]:
                text = needle_text(tasks[rng.integers(len(tasks))], tokenizer, haystack, seq_len, rng)
            else:
                text = fitted_text(windows[order[i]], tokenizer, seq_len)
            f.write(json.dumps({"text": text}) + "\n")
    return {"rows": rows, "needle_rows": int(is_needle.sum()), "book_windows": len(windows)}


def write_data(
    folder,
    tokenizer,
    train_dir,
    valid_dir,
    seq_len: int,
    tokens: int,
    valid_tokens: int,
    needle_fraction: float,
    seed: int,
    tasks=TASKS,
) -> dict:
    """train.jsonl (`tokens` tokens of train_dir) and valid.jsonl (`valid_tokens` of valid_dir) in mlx-lm's text
    format, deterministic by seed. Returns a summary of both, also written as summary.json."""
    if not 0 <= needle_fraction <= 1:
        raise ValueError(f"needle fraction must be in [0, 1], got {needle_fraction}")
    train_rng, valid_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    with atomic_folder(folder) as tmp:
        summary = {
            "train": write_rows(
                tmp / "train.jsonl",
                tokenizer,
                text_files(train_dir),
                tokens,
                seq_len,
                needle_fraction,
                train_rng,
                "train.jsonl",
                tasks,
            ),
            "valid": write_rows(
                tmp / "valid.jsonl",
                tokenizer,
                text_files(valid_dir),
                valid_tokens,
                seq_len,
                needle_fraction,
                valid_rng,
                "valid.jsonl",
                tasks,
            ),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def lora_all_weights(argv) -> None:
    """mlx-lm's `lora` command line (`python -m mlx_lm lora ARGS`) with every weight trained. mlx-lm's
    --fine-tune-type full unfreezes model.layers only, leaving the embedding (tied to the output head) and the final
    norm at their random init: fine for fine-tuning, not for pretraining from scratch. The whole model is unfrozen
    where mlx-lm prints the trainable parameters (after its freezing and any --resume-adapter-file, before the
    optimizer and training). The adapter file then holds every weight, which `mlx_lm fuse` and
    --resume-adapter-file load as they load a full fine-tune's."""
    import mlx_lm.lora as lora

    print_trainable_parameters = lora.print_trainable_parameters

    def unfreeze_and_print(model):
        model.unfreeze()
        print_trainable_parameters(model)

    lora.print_trainable_parameters = unfreeze_and_print
    sys.argv = ["mlx_lm.lora", *argv]
    lora.main()


if __name__ == "__main__":
    lora_all_weights(sys.argv[1:])
