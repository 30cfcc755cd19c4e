"""Generate text with a memory-augmented model: TitansQwen (a converted Qwen) or a TitansLM checkpoint.

    python -m mlx_titans.generate --prompt "Once upon a time"            # the embedded default model
    python -m mlx_titans.generate --model qwen-titans-4bit --file book.txt -p "Who is the narrator?" -m 200

The flags follow mlx_lm.generate where they apply. Long contexts (--file) are prefilled in segments through
the model's bounded cache (attention window + memory state) with a progress bar; --memory-state-out saves that
state, and --memory-state-in starts a later run from it. --model also takes a training run folder (its newest
checkpoint). Exit status: 0 done; 1 bad input or a damaged file, one `error:` line before any long work; 2 a
malformed command line; 130 Ctrl-C.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .files import cache_root, check_writable, command_name, run_reporting_errors
from .prefill import prefill, tokens_seen
from .prompt_cache import load_cache_file, save_cache_file

DEFAULT_MODEL = Path(__file__).parent / "default_model"
# models shipped inside the package, by the name --model takes (a local path of that name comes first)
EMBEDDED_MODELS = {"demo-qwen": Path(__file__).parent / "demo_qwen"}
DEFAULT_MAX_CONTEXT = 524288
# mlx_lm.generate's sampling, and the embedded default model's: greedy, that small model repeats one sentence for ever;
# sampled with a mild repetition penalty and a fixed seed, it writes on, the same text at every run
SAMPLING = {"temp": 0.0, "top_p": 1.0, "repetition_penalty": None, "seed": None}
DEFAULT_MODEL_SAMPLING = {"temp": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 0}
VERBOSE = {"true": True, "t": True, "false": False, "f": False}  # mlx_lm.generate's False/F; anything else is refused


def load(path=None, *, window: int | None = None, adapter_path=None):
    """(model, tokenizer) as mlx_lm.load gives them, for either model kind: a TitansLM checkpoint folder (None: the
    embedded default model), or a TitansQwen / plain Qwen folder or Hub id (see mlx_titans.qwen.load; a Hub id is
    converted once). The tokenizer is mlx-lm's TokenizerWrapper, so mlx-lm's generation and server take the pair
    as they take their own. ValueError (FileNotFoundError for a missing weights file) for what cannot be loaded."""
    path = DEFAULT_MODEL if path is None else model_path(path)
    folder = titans_lm_checkpoint(Path(path)) if Path(path).is_dir() else None
    if folder is not None:
        if window is not None or adapter_path is not None:
            raise ValueError("window and adapter_path apply to TitansQwen; a TitansLM's window is part of its model")
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from .model import load_model

        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return load_model(folder), TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tokenizer))
    from . import qwen

    if not Path(path).exists():
        if str(path).startswith((".", "/", "~")):
            raise ValueError(f"no model at {path} (expected a folder with config.json)")
        path = converted_from_hub(str(path))
    model, tokenizer, _ = qwen.load(path, window=window, adapter_path=adapter_path)
    return model, tokenizer


def model_path(name):
    """The folder of an embedded model's name (EMBEDDED_MODELS) where no local path has that name, else `name`."""
    if isinstance(name, str) and name in EMBEDDED_MODELS and not Path(name).exists():
        return EMBEDDED_MODELS[name]
    return name


def titans_lm_checkpoint(path: Path) -> Path | None:
    """The TitansLM checkpoint the folder `path` names (itself, or a training run's newest), or None for a folder
    of another model (a Qwen's); FileNotFoundError where it holds no model at all."""
    from .model import checkpoint_folder, read_config

    folder = checkpoint_folder(path)
    return folder if read_config(folder).get("model_type") == "titans" else None


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
    p = argparse.ArgumentParser(
        prog=command_name("mlx_titans.generate"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def sampling(name):
        default = "none" if SAMPLING[name] is None else SAMPLING[name]
        return f"(default: {default}; {DEFAULT_MODEL_SAMPLING[name]} with the embedded default model)"

    p.add_argument(
        "--model",
        help="a TitansQwen or TitansLM folder, a training run folder (its newest checkpoint), a Qwen folder or Hub id "
        "(default: the embedded TitansLM)",
    )
    p.add_argument("--prompt", "-p", default=None, help="the prompt, or - to read it from stdin")
    p.add_argument("--file", help="a UTF-8 text file read as context before the prompt")
    p.add_argument(
        "--max-tokens", "-m", type=int, default=100, help="tokens to generate at most (default: %(default)s)"
    )
    p.add_argument("--temp", type=float, help=f"sampling temperature, 0 for greedy {sampling('temp')}")
    p.add_argument("--top-p", type=float, help=f"sampling top-p, 1 for off {sampling('top_p')}")
    p.add_argument("--min-p", type=float, default=0.0, help="sampling min-p, 0 for off (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k, 0 for off (default: %(default)s)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"penalise the last 20 tokens by this factor (mlx-lm's) {sampling('repetition_penalty')}",
    )
    p.add_argument("--seed", type=int, help=f"PRNG seed {sampling('seed')}")
    p.add_argument("--extra-eos-token", nargs="+", default=(), help="more tokens (text or id) that end the generation")
    p.add_argument("--system-prompt", default=None, help="system prompt of the chat template (TitansQwen)")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt (TitansQwen)")
    p.add_argument(
        "--chat-template-config",
        help="JSON object of extra arguments to the chat template, e.g. '{\"enable_thinking\": false}' (TitansQwen)",
    )
    p.add_argument(
        "--verbose",
        type=str.lower,
        default="true",
        help="True/T: print the text as it comes and the stats block; False/F: print the reply only (default: True)",
    )
    p.add_argument(
        "--max-context", type=int, default=DEFAULT_MAX_CONTEXT, help="refuse longer contexts (default: %(default)s)"
    )
    p.add_argument("--window", type=int, default=None, help="attention window (TitansQwen; default: the model's)")
    p.add_argument("--adapter-path", default=None, help="memory adapters trained by mlx_titans.adapt (TitansQwen)")
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=None,
        help="tokens per prefill call (default: the model's segment size, 2048 for a TitansLM)",
    )
    p.add_argument("--memory-state-in", help="start from a memory state saved by --memory-state-out")
    p.add_argument("--memory-state-out", help="save the memory state after generating")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Every flag's value checked before anything is loaded; the model-dependent sampling defaults filled in."""
    if args.verbose not in VERBOSE:
        raise UserError(f"--verbose takes True/T or False/F (as mlx_lm.generate), got {args.verbose!r}")
    args.verbose = VERBOSE[args.verbose]
    for name, value in (SAMPLING if args.model else DEFAULT_MODEL_SAMPLING).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    at_least = lambda low: (lambda v: v >= low, f">= {low}")
    rules = {
        "--max-tokens": (args.max_tokens, *at_least(0)),
        "--temp": (args.temp, *at_least(0)),
        "--top-p": (args.top_p, lambda v: 0 <= v <= 1, "in [0, 1]"),
        "--min-p": (args.min_p, lambda v: 0 <= v <= 1, "in [0, 1]"),
        "--top-k": (args.top_k, *at_least(0)),
        "--repetition-penalty": (args.repetition_penalty, lambda v: v > 0, "positive"),
        "--max-context": (args.max_context, *at_least(1)),
        "--window": (args.window, *at_least(1)),
        "--prefill-step-size": (args.prefill_step_size, *at_least(1)),
    }
    for flag, (value, ok, bound) in rules.items():
        if value is not None and not ok(value):  # NaN fails every bound
            raise UserError(f"{flag} must be {bound}, got {value}")
    if args.chat_template_config is not None:
        try:
            args.chat_template_config = json.loads(args.chat_template_config)
        except json.JSONDecodeError as e:
            raise UserError(f"--chat-template-config is not valid JSON ({e})") from None
        if not isinstance(args.chat_template_config, dict):
            raise UserError("--chat-template-config must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    if args.memory_state_out:
        check_writable(args.memory_state_out)


def read_context(args) -> str:
    prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt or "")
    context = ""
    if args.file:
        path = Path(args.file)
        if path.is_dir():
            raise UserError(f"--file {path} is a folder; give a text file")
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
    if context and prompt:  # a file's own last newlines would make the blank line before the question three
        return context.rstrip("\r\n") + "\n\n" + prompt
    return context + prompt


class TitansLMRunner:
    """A TitansLM checkpoint with its tokenizer.json."""

    def __init__(self, path: Path, args):
        from .model import load_model
        from .tokenizer import EOS, load_tokenizer

        for flag in ("window", "adapter_path", "system_prompt", "chat_template_config"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} applies to TitansQwen, not to a TitansLM checkpoint")
        self.tokenizer = load_tokenizer(path / "tokenizer.json", require_eos=False)
        self.model = load_model(path)
        self.segment = args.prefill_step_size or 2048
        eos = self.tokenizer.token_to_id(EOS)  # mlx_titans.train's tokenizers end each document with it
        self.eos = set() if eos is None else {eos}

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

        if not Path(path).exists():
            path = converted_from_hub(path)
        self.model, self.tokenizer, config = qwen.load(path, window=args.window, adapter_path=args.adapter_path)
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
        return tok.apply_chat_template(messages, add_generation_prompt=True, **(args.chat_template_config or {}))

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def token_ids(tokens, vocab: dict) -> set:
    """The ids of --extra-eos-token's tokens, each given as text or as its id (as mlx_lm.generate takes them). An
    unknown one is refused: mlx-lm's tokenizers map it to the unknown token's id, which would end the text there."""
    ids = set(vocab.values())
    found = {token: int(token) if token.isdigit() else vocab.get(token) for token in tokens}
    for token, number in found.items():
        if number not in ids:
            raise UserError(f"--extra-eos-token {token!r} is not a token of this tokenizer")
    return set(found.values())


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
    path = Path(model_path(args.model))
    if args.model in EMBEDDED_MODELS and not path.exists():
        raise UserError(f"this install has no embedded {args.model} model; pass a model folder or Hub id")
    if path.is_dir():
        try:
            folder = titans_lm_checkpoint(path)
        except FileNotFoundError:
            raise UserError(f"no model at {path} (expected a folder with config.json, or a training run's)") from None
        if folder is not None:
            return TitansLMRunner(folder, args)
    elif path.exists() or args.model.startswith((".", "/", "~")):
        raise UserError(f"no model at {args.model} (expected a folder with config.json)")
    return QwenRunner(str(path) if path.exists() else args.model, args)


def run(args) -> int:
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    check_args(args)
    text = read_context(args)
    runner = open_model(args)
    runner.eos |= token_ids(args.extra_eos_token, runner.tokenizer.get_vocab())
    ids = runner.encode(text, args)
    cache = runner.model.make_cache()
    if args.memory_state_in:
        cache = load_cache_file(args.memory_state_in, runner.model)
    if tokens_seen(cache) + len(ids) > args.max_context:
        raise UserError(f"context of {tokens_seen(cache) + len(ids)} tokens is over --max-context {args.max_context}")

    mx.reset_peak_memory()
    tic = time.perf_counter()
    context = len(ids) - 1  # the last token starts the generation
    if context:
        show = args.verbose and context > runner.segment
        with tqdm(total=context, unit="tok", desc="prefill", disable=not show) as bar:  # closed on Ctrl-C too
            prefill(runner.model, mx.array(ids[:-1])[None], cache, runner.segment, lambda n, _: bar.update(n - bar.n))
    if args.seed is not None:  # here, after loading: building a model draws from the generator
        mx.random.seed(args.seed)
    out, prompt_time = [], None
    stream = runner.detokenizer() if args.verbose else None
    steps = generate_step(
        mx.array(ids[-1:]),
        runner.model,
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k),
        logits_processors=make_logits_processors(repetition_penalty=args.repetition_penalty),
        prompt_cache=cache,
    )
    if args.verbose:
        print("=" * 10)
    for n, (token, _) in enumerate(steps):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            tic = time.perf_counter()
        if token in runner.eos:
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
    """The command line; exit status 0, 1 on bad input (one `error:` line), 130 on Ctrl-C."""
    args = parse_args(argv)
    return run_reporting_errors(lambda: run(args), (UserError, OSError, ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
