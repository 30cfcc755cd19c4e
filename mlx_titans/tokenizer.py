"""A byte-level BPE tokenizer (the `tokenizers` library) trained on text files and stored as tokenizer.json.

    tokenizer = train_tokenizer(files, vocab_size=8192); save_tokenizer(tokenizer, "tokenizer.json")
    tokenizer = load_tokenizer("tokenizer.json"); ids = tokenizer.encode(text).ids; tokenizer.decode(ids) == text

Byte-level: every byte is in the vocabulary, so any text encodes without unknown tokens and decodes back exactly.
"""

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOS = "<|endoftext|>"  # id 0; separates documents in a token stream


def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files, vocab_size: int) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab size must be at least {len(alphabet) + 1} (every byte plus {EOS}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
    )  # its own progress bars print blank lines to stdout when it is not a terminal
    with tqdm(total=len(files), desc="tokenizer: read", unit="file", disable=None) as bar:  # on a terminal only

        def texts():
            for f in files:
                yield read_text(f)
                bar.update()
            bar.set_description("tokenizer: merges")

        tokenizer.train_from_iterator(texts(), trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path) -> None:
    """Written to a temporary file renamed into place, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)


def load_tokenizer(path, require_eos: bool = True) -> Tokenizer:
    """A tokenizer.json; training needs its EOS between documents (`require_eos`), generation does not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{path} is not a tokenizers JSON file: {str(e).strip().splitlines()[0]}") from None
    if require_eos and tokenizer.token_to_id(EOS) is None:
        raise ValueError(f"tokenizer {path} has no {EOS} token")
    return tokenizer
