"""Files: writing so that a failure or Ctrl-C never leaves a half-written one, fingerprints of configs, a
NeuralMemory's state files, and one-line CLI errors."""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

MEMORY_STATE_FORMAT = "mlx-titans-memory-state/2"


def cache_root() -> Path:
    """Where mlx-titans keeps what it can make again (converted Hub models, tokenized documents):
    $MLX_TITANS_CACHE, default ~/.cache/mlx-titans."""
    return Path(os.environ.get("MLX_TITANS_CACHE", Path.home() / ".cache" / "mlx-titans"))


def fingerprint(obj) -> str:
    """16 hex characters of the sha256 of obj as sorted JSON: equal for equal configs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def check_field_types(config) -> None:
    """Raise ValueError unless every field of the dataclass `config` holds a value of its annotated type: a config
    read from JSON with a string where a number belongs would otherwise fail later, deep in the model, with a message
    about something else."""
    for f in fields(config):
        value = getattr(config, f.name)
        allowed = typing.get_args(f.type) or (f.type,)  # Optional[int] -> (int, NoneType)
        if float in allowed:
            allowed += (int,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(
                "null" if t is type(None) else t.__name__ for t in allowed if t is not int or float not in allowed
            )
            raise ValueError(f"{type(config).__name__}: {f.name} must be {names}, got {value!r}")


def check_writable(path) -> None:
    """Raise ValueError now if a file cannot be written at `path` later (a folder there, a file where a folder should
    be, no write permission), so that a long run does not fail at its very end."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: no write permission in {parent}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_safetensors(path):
    """Yields a temporary .safetensors file name beside `path` to write; on success it is renamed to `path` (whatever
    its suffix), on failure (or Ctrl-C) removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; the result should not be
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors_atomic(path, arrays: dict, metadata: dict) -> None:
    """mx.save_safetensors into a temporary file beside `path`, renamed into place once complete."""
    with atomic_safetensors(path) as tmp:
        mx.save_safetensors(tmp, arrays, metadata=metadata)


@contextmanager
def atomic_folder(path):
    """Yields a temporary folder beside `path` to write into; on success it replaces `path`, on failure (or Ctrl-C)
    it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; the result should not be
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(file, what: str = "") -> dict:
    """A JSON file holding an object, as a dict; one clear error naming it (after `what`, e.g. "config file ")
    otherwise."""
    file = Path(file)
    try:
        value = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}{file} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}{file} is not a JSON object")
    return value


def write_json_atomic(path, obj) -> None:
    """JSON into a temporary file beside `path`, renamed into place once complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def command_name(module: str) -> str:
    """The command a user types to run `module`'s command line, for its usage line: argparse's default is the file's
    name (`generate.py`), which `python -m mlx_titans.generate` never shows."""
    script = Path(sys.argv[0])
    if script.suffix != ".py":  # a console script, e.g. mlx-titans-generate
        return script.name
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin is not None and script.resolve() == Path(spec.origin).resolve():
        return f"python -m {module}"
    return f"python {sys.argv[0]}"  # a thin script of its own: convert/qwen.py


def run_reporting_errors(action, errors=(OSError, ValueError, RuntimeError), interrupted="nothing written") -> int:
    """Call action(); an expected failure prints one `error: ...` line (exit 1), Ctrl-C one line saying what was
    kept (exit 130). The exit statuses of every mlx-titans command line."""
    try:
        action()
    except KeyboardInterrupt:
        print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except errors as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 1
    return 0


def read_safetensors(path, what: str = "safetensors"):
    """(arrays, metadata) of a .safetensors file; a missing or damaged one is one error naming it (mx.load raises a
    RuntimeError that does not)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        return mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).strip().splitlines()[0]})") from None


def read_metadata_checked(path, file_format: str, what: str, format_key: str = "format") -> dict:
    """The metadata of a file written with {format_key: file_format}, from its header alone (no arrays, no MLX: a
    server checks files in its HTTP threads, where MLX would start a stream thread per request); one clear error
    otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).strip().splitlines()[0]})") from None
    check_format(path, metadata, file_format, what, format_key)
    return metadata


def load_safetensors_checked(path, file_format: str, what: str, format_key: str = "format"):
    """(arrays, metadata) of a file written with metadata {format_key: file_format}; one clear error otherwise."""
    arrays, metadata = read_safetensors(path, what)
    check_format(path, metadata, file_format, what, format_key)
    return arrays, metadata


def check_format(path, metadata: dict, file_format: str, what: str, format_key: str) -> None:
    found = metadata.get(format_key, "")
    if found.split("/")[0] == file_format.split("/")[0] and found != file_format:
        raise ValueError(
            f"{path} is a {what} file of another mlx-titans version (format {found}; this one reads {file_format})"
        )
    if found != file_format:
        raise ValueError(f"{path} is not a {what} file")


def save_state(path, state, config) -> None:
    """Write a NeuralMemory's MemoryState, with its MemoryConfig's fields and fingerprint, atomically."""
    arrays = dict(tree_flatten(state.arrays()))
    metadata = {
        "format": MEMORY_STATE_FORMAT,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "fingerprint": config.fingerprint(),
        "position": str(state.position),
    }
    save_safetensors_atomic(path, arrays, metadata)


def load_state(path, config):
    """The MemoryState written by `save_state`, refusing one saved from a memory with another config."""
    from .neural_memory import MemoryState  # here, not above: neural_memory's config imports this module

    arrays, metadata = load_safetensors_checked(path, MEMORY_STATE_FORMAT, "NeuralMemory state")
    if metadata.get("fingerprint") != config.fingerprint():
        saved = json.loads(metadata.get("config", "{}"))
        ours = config.to_dict()
        diff = {k: (saved.get(k), ours.get(k)) for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)}
        detail = ", ".join(f"{k}: saved {a!r}, this memory {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"memory state {path} was saved by a memory with another config ({detail})")
    return MemoryState.from_tree({**tree_unflatten(list(arrays.items())), "position": int(metadata["position"])})
