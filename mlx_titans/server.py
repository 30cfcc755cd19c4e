"""mlx_lm.server's OpenAI-compatible API for TitansQwen and TitansLM, with named memories.

    python -m mlx_titans.server --model qwen-titans --memory-dir memories      # or mlx-titans-server
    curl localhost:8080/v1/completions -d '{"prompt": "<a book>", "max_tokens": 1, "memory": "book-a"}'
    curl localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Who?"}], "memory": "book-a"}'

The endpoints, their fields, streaming and the generation thread are mlx_lm.server's own. A request whose JSON body
has "memory": NAME continues from that memory: the model's cache saved in --memory-dir (a fresh one for a new name)
has read everything sent under NAME so far, prompts and replies, and the request's prompt tokens (for chat: its
messages through the chat template) are appended after it; once the reply is sent, the cache, now holding the reply
too, is saved atomically. So send a long document once, then only the new question. Requests are served one at a
time in arrival order, so a request on a memory in use waits for the one before it and continues from its state.
A request without "memory" is mlx-lm's: a fresh cache, or a cached prefix of its prompt.
"""

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, replace
from http.server import ThreadingHTTPServer
from pathlib import Path

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import APIHandler, CompletionRequest, ModelProvider, ResponseGenerator
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .files import command_name
from .generate import DEFAULT_MODEL, load, model_path, prefill_step
from .prompt_cache import check_cache_file, load_cache_file, save_cache_file

MEMORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def memory_path(memory_dir, name) -> Path:
    """The file of memory `name`, refusing a name that could leave memory_dir (ValueError)."""
    if not isinstance(name, str) or not MEMORY_NAME.fullmatch(name):
        raise ValueError(
            f"memory must be a name of 1-100 letters, digits, '_', '-' or '.' (not first), not {name!r:.120}"
        )
    return Path(memory_dir) / f"{name}.safetensors"


class TitansModelProvider(ModelProvider):
    """mlx_lm.server's model provider for the one model this server loads at start. The key it gives the prompt
    cache is (model, memory): the memory a request continues, or None."""

    def __init__(self, cli_args):
        super().__init__(cli_args)
        self.model, self.tokenizer = load(cli_args.model, window=cli_args.window, adapter_path=cli_args.adapter_path)
        self.model_key = (cli_args.model, None)
        if cli_args.prefill_step_size is None:
            cli_args.prefill_step_size = prefill_step(self.model)

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        """The loaded model; the generation thread calls this just before serving each request, with
        ModelDescription.model, which MemoryResponseGenerator makes (model, memory)."""
        memory = model_path[1] if isinstance(model_path, tuple) else None
        self.model_key = (self.cli_args.model, memory)
        return self.model, self.tokenizer


class MemoryPromptCache(LRUPromptCache):
    """mlx-lm's prompt cache, except for requests naming a memory: those fetch the memory's saved cache with every
    prompt token left to read, and save the cache after the reply."""

    def __init__(self, provider: TitansModelProvider, memory_dir, max_size: int):
        super().__init__(max_size)
        self.provider, self.memory_dir = provider, memory_dir

    def fetch_nearest_cache(self, model, tokens):
        if model[1] is None:
            return super().fetch_nearest_cache(model, tokens)
        path = memory_path(self.memory_dir, model[1])
        cache = load_cache_file(path, self.provider.model) if path.exists() else self.provider.model.make_cache()
        return cache, tokens

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        if model[1] is None:
            return super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        try:
            save_cache_file(memory_path(self.memory_dir, model[1]), self.provider.model, prompt_cache)
        except OSError:  # the reply has gone out: only the log can tell
            logging.getLogger(__name__).exception(f"memory {model[1]!r} not saved; it keeps its previous state")


@dataclass
class MemoryRequest(CompletionRequest):
    """mlx-lm's request with the memory it continues (None: none)."""

    memory: str | None = None


class MemoryResponseGenerator(ResponseGenerator):
    def generate(self, request, generation_args, progress_callback=None):
        """mlx-lm's, with the request's memory joined to the model it names: the one field mlx_lm.server hands the
        model provider in the generation thread (see TitansModelProvider.load)."""
        model = replace(generation_args.model, model=(generation_args.model.model, request.memory))
        return super().generate(request, replace(generation_args, model=model), progress_callback)


class MemoryAPIHandler(APIHandler):
    """mlx_lm.server's handler, taking a "memory" field and refusing what this server cannot serve (400)."""

    def validate_model_parameters(self):
        super().validate_model_parameters()
        args, provider = self.response_generator.cli_args, self.response_generator.model_provider
        if self.requested_model not in ("default_model", args.model, model_id(args)):
            raise ValueError(f"this server serves {model_id(args)} (or 'default_model'), not {self.requested_model!r}")
        if self.body.get("draft_model", "default_model") != "default_model" or self.adapter is not None:
            raise ValueError("this server takes no draft_model or adapters per request (see --adapter-path)")
        self.memory = self.body.get("memory")
        if self.memory is not None:
            if args.memory_dir is None:
                raise ValueError("this server keeps no memories: start it with --memory-dir DIR")
            path = memory_path(args.memory_dir, self.memory)
            if path.exists():  # refused here, with a 400, rather than in the generation thread mid-reply
                check_cache_file(path, provider.model)

    def handle_chat_completions(self):
        return MemoryRequest(**vars(super().handle_chat_completions()), memory=self.memory)

    def handle_text_completions(self):
        return MemoryRequest(**vars(super().handle_text_completions()), memory=self.memory)

    def handle_models_request(self):
        """The one model served (mlx-lm lists every model in the Hugging Face cache)."""
        self._set_completion_headers(200)
        self.end_headers()
        model = {"id": model_id(self.response_generator.cli_args), "object": "model", "created": self.created}
        self.wfile.write(json.dumps({"object": "list", "data": [model]}).encode())


def model_id(args) -> str:
    """The served model's name in /v1/models: its resolved folder, as mlx-lm names a local model, or its Hub id."""
    path = Path(model_path(args.model) if args.model else DEFAULT_MODEL)
    return str(path.resolve()) if path.exists() else args.model


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=command_name("mlx_titans.server"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="a TitansQwen or TitansLM folder, a Qwen folder or Hub id (default: embedded)")
    p.add_argument("--adapter-path", default=None, help="memory adapters trained by mlx_titans.adapt (TitansQwen)")
    p.add_argument("--window", type=int, default=None, help="attention window (TitansQwen)")
    p.add_argument("--memory-dir", default=None, help="where named memories are kept (none: requests may not name one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0: any free port")
    p.add_argument("--allowed-origins", type=lambda x: x.split(","), default="*")
    p.add_argument("--temp", type=float, default=0.0, help="default sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=512, help="default maximum tokens per reply")
    p.add_argument("--chat-template-args", type=json_object, default={}, help="JSON for apply_chat_template")
    p.add_argument("--prefill-step-size", type=int, default=None, help="tokens per prefill call (default: a segment)")
    p.add_argument("--prompt-cache-size", type=int, default=10, help="caches kept for requests without a memory")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    # What mlx_lm.server's classes read and this server does not offer: one model, served one request at a time.
    p.set_defaults(
        draft_model=None,
        num_draft_tokens=0,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        pipeline=False,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
        prompt_cache_bytes=None,
        decode_concurrency=1,
        prompt_concurrency=1,
    )
    return p.parse_args(argv)


def json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError("not a JSON object")
    return value


def make_server(args):
    """(the HTTP server, its response generator): mlx_lm.server's handler and generation thread serving our model
    with its memories. serve_forever() serves; shutdown() and the generator's stop_and_join() stop."""
    provider = TitansModelProvider(args)
    httpd = ThreadingHTTPServer((args.host, args.port), lambda *a, **kw: MemoryAPIHandler(generator, *a, **kw))
    # The generation thread starts last: once it runs, the process does not exit until it is stopped.
    generator = MemoryResponseGenerator(provider, MemoryPromptCache(provider, args.memory_dir, args.prompt_cache_size))
    return httpd, generator


def main(argv=None) -> int:
    """The command: serves until Ctrl-C, then ends the process (see below); 1 and one error line if it cannot start."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s - %(levelname)s - %(message)s")
    maybe_set_recommended_wired_limit()  # as mlx_lm.server does: on Metal, keeps the weights resident
    try:
        httpd, generator = make_server(args)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    log = logging.getLogger(__name__)
    log.warning("like mlx_lm.server, this server implements only basic security checks: keep it off the internet")
    log.info(f"serving {model_id(args)} at http://{args.host}:{httpd.server_address[1]}")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        generator.stop_and_join()
    # Every memory is saved. Exit without the interpreter's finalization: as the generation thread ends, MLX frees its
    # thread's compile cache, which calls into Python, and if finalization has begun by then the process aborts
    # ("terminate called without an active exception"; mlx_lm.server 0.32.2 ends so after any request).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
