"""python -m mlx_titans.server: mlx_lm.server's API over HTTP on 127.0.0.1, and its named memories."""

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from threading import Thread

import pytest

from mlx_titans import generate, load, load_cache_file, save_cache_file, stream_generate
from mlx_titans.server import main, make_server, parse_args

PART1 = "Titans neural memory learns at test time. The quick brown fox jumps over the lazy dog. " * 3
PART2 = "Hello world! Long context generation with memory augmented Qwen models."
QUESTION = "What did the fox jump over?"


@contextmanager
def serving(model, *argv):
    """A server on a free port of 127.0.0.1 in this process; its URL. Leaving stops it and waits for its generation
    thread, so that every memory has been saved."""
    httpd, generator = make_server(parse_args(["--model", str(model), "--port", "0", *map(str, argv)]))
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        generator.stop_and_join()


def post(url, path, body):
    """(status, the JSON reply or the raw text of a stream)."""
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    return status, text if body.get("stream") else json.loads(text)


def reply_ids(url, memory=None, max_tokens=4, **body):
    """The token ids of a greedy reply (a completion for `prompt`, a chat reply for `messages`)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body.update(max_tokens=max_tokens, temperature=0.0, logprobs=True, **({"memory": memory} if memory else {}))
    status, reply = post(url, path, body)
    assert status == 200, reply
    return [t["id"] for t in reply["choices"][0]["logprobs"]["content"]]


@pytest.fixture(scope="module")
def qwen(titans_qwen):
    return load(titans_qwen)


def library_ids(qwen, prompt, max_tokens):
    model, tokenizer = qwen
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]


@pytest.fixture(scope="module")
def server(titans_qwen, tmp_path_factory):
    memory_dir = tmp_path_factory.mktemp("memories")
    with serving(titans_qwen, "--memory-dir", memory_dir) as url:
        yield url, memory_dir


def test_greedy_completion_and_chat_equal_the_library(server, qwen):
    url, _ = server
    model, tokenizer = qwen
    status, reply = post(url, "/v1/completions", {"prompt": PART1, "max_tokens": 10, "temperature": 0.0})
    assert status == 200 and reply["choices"][0]["text"] == generate(model, tokenizer, PART1, max_tokens=10)
    assert reply_ids(url, prompt=PART1, max_tokens=10) == library_ids(qwen, PART1, 10)
    messages = [{"role": "user", "content": QUESTION}]
    status, reply = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8})
    chat_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert status == 200 and reply["choices"][0]["message"]["content"] == generate(
        model, tokenizer, chat_prompt, max_tokens=8
    )


def text_of(choice) -> str:
    """A choice's text: a completion's, or a chat message's or delta's content."""
    return choice["text"] if "text" in choice else (choice.get("message") or choice["delta"]).get("content") or ""


def test_streaming_sends_the_same_reply(server):
    """Server-sent events, completion and chat, with a memory or without: the pieces make the whole reply."""
    url, _ = server
    chat = {"messages": [{"role": "user", "content": QUESTION}]}
    for path, body in [("/v1/completions", {"prompt": PART2}), ("/v1/chat/completions", chat)]:
        body.update(max_tokens=10, temperature=0.0)
        whole = post(url, path, body)[1]["choices"][0]
        status, stream = post(url, path, {**body, "stream": True, "memory": "streamed" + path.replace("/", "-")})
        events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
        assert status == 200 and stream.rstrip().endswith("data: [DONE]") and len(events) > 1
        assert "".join(text_of(e["choices"][0]) for e in events) == text_of(whole)
        assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_a_memory_continues_one_stream_across_requests_and_restarts(titans_qwen, qwen, tmp_path):
    """A memory holds every token read under its name, prompts and replies: part 1, then part 2 on the same server,
    then a chat question on a new server reading the memory from disk, each reply is what one generation over the
    whole stream gives. A chat request's messages, through the chat template, are appended after the memory."""
    tokenizer = qwen[1]
    p1, p2 = tokenizer.encode(PART1), tokenizer.encode(PART2)
    with serving(titans_qwen, "--memory-dir", tmp_path) as url:
        r1 = reply_ids(url, "book", max_tokens=2, prompt=PART1)
        r2 = reply_ids(url, "book", prompt=PART2)
    assert r2 == library_ids(qwen, p1 + r1 + p2, 4)
    assert (tmp_path / "book.safetensors").is_file()
    messages = [{"role": "user", "content": QUESTION}]
    with serving(titans_qwen, "--memory-dir", tmp_path) as url:
        r3 = reply_ids(url, "book", messages=messages)
    question = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r3 == library_ids(qwen, p1 + r1 + p2 + r2 + question, 4)
    assert load_cache_file(tmp_path / "book.safetensors", qwen[0])[0].offset == len(p1 + r1 + p2 + r2 + question + r3)


def test_concurrent_clients_on_four_memories_and_two_on_one(titans_qwen, qwen, tmp_path):
    """Four clients at once on four memories each get the reply their prompt gives alone, and every memory is saved
    with its prompt and reply. Two at once on one memory: the later waits for the earlier and continues from it."""
    tokenizer = qwen[1]
    prompts = [f"{PART2} Number {i}." * (i + 1) for i in range(4)]
    with serving(titans_qwen, "--memory-dir", tmp_path) as url, ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: reply_ids(url, f"client-{i}", prompt=prompts[i]), range(4)))
        a, b = pool.map(lambda p: reply_ids(url, "shared", prompt=p), [PART1, PART2])
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        assert reply == library_ids(qwen, prompt, 4)
        cache = load_cache_file(tmp_path / f"client-{i}.safetensors", qwen[0])
        assert cache[0].offset == len(tokenizer.encode(prompt)) + len(reply)
    p1, p2 = tokenizer.encode(PART1), tokenizer.encode(PART2)
    assert b == library_ids(qwen, p1 + a + p2, 4) or a == library_ids(qwen, p2 + b + p1, 4)
    assert load_cache_file(tmp_path / "shared.safetensors", qwen[0])[0].offset == len(p1 + a + p2 + b)


def test_bad_memory_names_and_foreign_memories_are_400(server, titans_qwen):
    url, memory_dir = server
    for name in ["../escape", "a/b", "", ".hidden", "x" * 101, "a\\b", "nul\0", 5, ["m"]]:
        status, reply = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "memory": name})
        assert status == 400 and reply["error"].startswith("memory must be a name of"), (name, reply)
    assert not any(p.name.startswith("escape") for p in memory_dir.parent.iterdir())
    other, tokenizer = load(titans_qwen, window=8)
    cache = other.make_cache()
    generate(other, tokenizer, "hi", max_tokens=1, prompt_cache=cache)
    save_cache_file(memory_dir / "other.safetensors", other, cache)
    (memory_dir / "junk.safetensors").write_text("not a safetensors file")
    for name, message in [("other", "was saved for another model"), ("junk", "is not a readable safetensors file")]:
        status, reply = post(
            url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "memory": name}
        )
        assert status == 400 and message in reply["error"], reply
    status, reply = post(url, "/v1/completions", {"prompt": "hi", "model": "another/model"})
    assert status == 400 and "this server serves" in reply["error"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_memory_requests_start_no_threads(server):
    """The handler checks a saved memory from the file's header, without MLX: MLX in an HTTP thread (one per request)
    starts a stream thread that outlives it, one more per request."""
    url, _ = server
    reply_ids(url, "counted", max_tokens=1, prompt="hi")
    before = len(list(Path("/proc/self/task").iterdir()))
    for _ in range(8):
        reply_ids(url, "counted", max_tokens=1, prompt="hi")
    assert len(list(Path("/proc/self/task").iterdir())) <= before + 2


def test_openai_client(server, qwen):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    url, _ = server
    model, tokenizer = qwen
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [str(server_model(url))]
    messages = [{"role": "user", "content": QUESTION}]
    expected = generate(
        model, tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True), max_tokens=6
    )
    chat = client.chat.completions.create(model="default_model", messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="default_model", messages=messages, max_tokens=6, temperature=0, stream=True, extra_body={"memory": "oa"}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def server_model(url):
    with urllib.request.urlopen(url + "/v1/models") as reply:
        return json.loads(reply.read())["data"][0]["id"]


def test_titans_lm_checkpoint_without_memory_dir(checkpoint):
    model, tokenizer = load(checkpoint / "mac")
    with serving(checkpoint / "mac") as url:
        status, reply = post(url, "/v1/completions", {"prompt": "hello there", "max_tokens": 12})
        assert status == 200 and reply["choices"][0]["text"] == generate(model, tokenizer, "hello there", max_tokens=12)
        status, reply = post(url, "/v1/completions", {"prompt": "hello", "memory": "m"})
        assert status == 400 and "start it with --memory-dir" in reply["error"]


def test_bad_model_or_port_is_one_error_line(checkpoint, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, message in [
            (["--model", tmp_path / "nope"], "no model at"),
            (["--model", checkpoint / "mac", "--window", 8], "window and adapter_path apply to TitansQwen"),
            (["--model", checkpoint / "mac", "--port", port], "Address already in use"),
        ]:
            assert main([str(a) for a in argv]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def test_the_command_serves_until_ctrl_c_and_keeps_the_memory(titans_qwen, qwen, tmp_path):
    """python -m mlx_titans.server --port 0 says where it serves and answers; Ctrl-C stops it, exit status 0, once
    the request in hand is done and its memory saved."""
    command = ["-m", "mlx_titans.server", "--model", titans_qwen, "--port", "0", "--memory-dir", tmp_path]
    server = subprocess.Popen(
        [sys.executable, *map(str, command)], cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True
    )
    try:
        url = next(m[1] for line in server.stderr if (m := re.search(r"serving .* at (http://\S+)", line)))
        reply = reply_ids(url, "cli", prompt=PART2)
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=120)
    assert server.returncode == 0, err
    assert reply == library_ids(qwen, PART2, 4)
    cache = load_cache_file(tmp_path / "cli.safetensors", qwen[0])
    assert cache[0].offset == len(qwen[1].encode(PART2)) + len(reply)
