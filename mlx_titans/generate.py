"""Generate text with a memory-augmented model: TitansQwen (a converted Qwen) or a TitansLM checkpoint.

    python -m mlx_titans.generate --prompt "Once upon a time"            # the embedded default model
    python -m mlx_titans.generate --model qwen-titans-4bit --file book.txt -p "Who is the narrator?" -m 200

The flags follow mlx_lm.generate where they apply. Long contexts (--file) are prefilled in segments through
the model's bounded cache (attention window + memory state) with a progress bar; --memory-state-out saves that
state, and --memory-state-in starts a later run from it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .files import cache_root
from .prefill import prefill
from .prompt_cache import load_cache_file, save_cache_file

DEFAULT_MODEL = Path(__file__).parent / "default_model"
DEFAULT_MAX_CONTEXT = 524288


def load(path=None, *, window: int | None = None, adapter_path=None):
    """(model, tokenizer) as mlx_lm.load gives them, for either model kind: a TitansLM checkpoint folder (None: the
    embedded default model), or a TitansQwen / plain Qwen folder or Hub id (see mlx_titans.qwen.load; a Hub id is
    converted once). The tokenizer is mlx-lm's TokenizerWrapper, so mlx-lm's generation and server take the pair
    as they take their own. ValueError (FileNotFoundError for a missing weights file) for what cannot be loaded."""
    path = DEFAULT_MODEL if path is None else path
    if is_titans_lm(Path(path)):
        if window is not None or adapter_path is not None:
            raise ValueError("window and adapter_path apply to TitansQwen; a TitansLM's window is part of its model")
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from .model import load_model

        if not (Path(path) / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        return load_model(path), TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tokenizer))
    from . import qwen

    if not Path(path).exists():
        if str(path).startswith((".", "/", "~")):
            raise ValueError(f"no model at {path} (expected a folder with config.json)")
        path = converted_from_hub(str(path))
    model, tokenizer, _ = qwen.load(path, window=window, adapter_path=adapter_path)
    return model, tokenizer


def is_titans_lm(path: Path) -> bool:
    """Whether `path` is a TitansLM checkpoint folder (config.json's model_type "titans")."""
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "titans"


def prefill_step(model) -> int:
    """Tokens per prefill call: a TitansQwen's segment (the unit its conversion chose to bound the peak memory),
    else mlx-lm's default."""
    return model.titans.segment_size if hasattr(model, "titans") else 2048


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs):
    """mlx_lm.stream_generate for our models, with the same arguments and GenerationResponses; the prompt is
    prefilled prefill_step(model) tokens per call unless `prefill_step_size` says otherwise. A `prompt_cache`
    (model.make_cache(), or load_cache_file's) is updated in place: afterwards it has read the prompt and every
    token of the reply, so save_cache_file keeps the state and a later call continues from it."""
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    kwargs.setdefault("prefill_step_size", prefill_step(model))
    return mlx_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """mlx_lm.generate for our models: the reply's text (see stream_generate)."""
    from mlx_lm.generate import generate as mlx_generate

    kwargs.setdefault("prefill_step_size", prefill_step(model))
    return mlx_generate(model, tokenizer, prompt, verbose=verbose, **kwargs)


class UserError(Exception):
    """A bad input: reported as one line, exit status 1."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a TitansQwen or TitansLM folder, a Qwen folder or Hub id (default: embedded)")
    p.add_argument("--prompt", "-p", default=None, help="the prompt, or - to read it from stdin")
    p.add_argument("--file", help="a UTF-8 text file read as context before the prompt")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument(
        "--verbose",
        type=lambda s: s.lower() not in ("false", "0", "no"),
        default=True,
        help="print the text as it comes and the stats block (True/False)",
    )
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, help="refuse longer contexts")
    p.add_argument("--window", type=int, default=None, help="attention window (TitansQwen)")
    p.add_argument("--adapter-path", default=None, help="memory adapters trained by mlx_titans.adapt (TitansQwen)")
    p.add_argument("--prefill-step-size", type=int, default=None, help="tokens per prefill call")
    p.add_argument("--memory-state-in", help="start from a memory state saved by --memory-state-out")
    p.add_argument("--memory-state-out", help="save the memory state after generating")
    return p.parse_args(argv)


def read_context(args) -> str:
    prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt or "")
    context = ""
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        try:
            context = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        if not context.strip():
            raise UserError(f"{path} is empty")
    if not (context + prompt).strip():
        raise UserError("empty prompt: give --prompt TEXT, --prompt - (stdin) or --file")
    return context + ("\n\n" if context and prompt else "") + prompt


class TitansLMRunner:
    """A TitansLM checkpoint with its tokenizer.json."""

    def __init__(self, path: Path, args):
        from tokenizers import Tokenizer

        from .model import load_model

        if args.window is not None:
            raise UserError("--window applies to TitansQwen; a TitansLM's window is part of its architecture")
        if args.adapter_path is not None:
            raise UserError("--adapter-path applies to TitansQwen; a TitansLM is trained whole (mlx_titans.train)")
        try:
            self.model = load_model(path)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.segment = args.prefill_step_size or 2048
        self.eos = None

    def detokenizer(self):
        """mlx-lm's streaming detokenizer for any tokenizer (it re-decodes only the current line)."""
        from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer
        from transformers import PreTrainedTokenizerFast

        return NaiveStreamingDetokenizer(PreTrainedTokenizerFast(tokenizer_object=self.tokenizer))

    def encode(self, text, args):
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids)


class QwenRunner:
    """A TitansQwen folder, or a plain Qwen one (memory added, gate closed)."""

    def __init__(self, path: str, args):
        from . import qwen

        try:
            if not Path(path).exists():
                path = converted_from_hub(path)
            self.model, self.tokenizer, config = qwen.load(path, window=args.window, adapter_path=args.adapter_path)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        self.segment = args.prefill_step_size or config["titans"]["segment_size"]
        self.eos = set(self.tokenizer.eos_token_ids)

    def detokenizer(self):
        """mlx-lm's streaming detokenizer for this tokenizer (BPE, SentencePiece or naive)."""
        return self.tokenizer.detokenizer

    def encode(self, text, args):
        tok = self.tokenizer
        if args.ignore_chat_template or tok.chat_template is None:
            return tok.encode(text)
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        messages.append({"role": "user", "content": text})
        return tok.apply_chat_template(messages, add_generation_prompt=True)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def converted_from_hub(hub_id: str) -> Path:
    """A Hub id is downloaded and converted (4-bit) once, into ~/.cache/mlx-titans (or $MLX_TITANS_CACHE)."""
    from .qwen.convert import convert

    out = cache_root() / (hub_id.replace("/", "--") + "-4bit")
    if not (out / "config.json").is_file():
        convert(hub_id, out, quantize=True)
    return out


def open_model(args):
    if args.model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise UserError("this install has no embedded default model; pass --model")
        return TitansLMRunner(DEFAULT_MODEL, args)
    path = Path(args.model)
    if path.is_dir() and (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type == "titans":
            return TitansLMRunner(path, args)
    elif path.exists() or args.model.startswith((".", "/", "~")):
        raise UserError(f"no model at {args.model} (expected a folder with config.json)")
    return QwenRunner(args.model, args)


def run(args) -> int:
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    if args.seed is not None:
        mx.random.seed(args.seed)
    text = read_context(args)
    runner = open_model(args)
    ids = runner.encode(text, args)
    cache = runner.model.make_cache()
    if args.memory_state_in:
        try:
            cache = load_cache_file(args.memory_state_in, runner.model)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
    if cache[0].offset + len(ids) > args.max_context:
        raise UserError(f"context of {cache[0].offset + len(ids)} tokens is over --max-context {args.max_context}")

    mx.reset_peak_memory()
    tic = time.perf_counter()
    context = len(ids) - 1  # the last token starts the generation
    if context:
        bar = tqdm(total=context, unit="tok", desc="prefill", disable=not args.verbose or context <= runner.segment)
        prefill(runner.model, mx.array(ids[:-1])[None], cache, runner.segment, lambda done, _: bar.update(done - bar.n))
        bar.close()
    sampler = make_sampler(args.temp, args.top_p)
    out, prompt_time = [], None
    stream = runner.detokenizer() if args.verbose else None
    steps = generate_step(
        mx.array(ids[-1:]), runner.model, max_tokens=args.max_tokens, sampler=sampler, prompt_cache=cache
    )
    if args.verbose:
        print("=" * 10)
    for n, (token, _) in enumerate(steps):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            tic = time.perf_counter()
        if runner.eos and token in runner.eos:
            break
        out.append(token)
        if args.verbose:
            stream.add_token(token)
            print(stream.last_segment, end="", flush=True)
    gen_time = time.perf_counter() - tic
    if prompt_time is None:  # nothing generated (--max-tokens 0): all the time went into the prompt
        prompt_time, gen_time = gen_time, 0.0
    if not args.verbose:
        print(runner.decode(out))
    if args.memory_state_out:
        save_cache_file(args.memory_state_out, runner.model, cache)
    if args.verbose:
        stream.finalize()
        print(stream.last_segment)
        print("=" * 10)
        print(f"Prompt: {len(ids)} tokens, {len(ids) / prompt_time:.3f} tokens-per-sec")
        print(f"Generation: {len(out)} tokens, {len(out) / max(gen_time, 1e-9):.3f} tokens-per-sec")
        print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
