"""Writing files so that a failure or Ctrl-C never leaves a half-written one, and one-line CLI errors."""

import json
import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx


def save_safetensors_atomic(path, arrays: dict, metadata: dict) -> None:
    """mx.save_safetensors into a temporary file beside `path`, renamed into place once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj) -> None:
    """JSON into a temporary file beside `path`, renamed into place once complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_reporting_errors(action, errors=(OSError, ValueError, RuntimeError)) -> int:
    """Call action(); an expected failure prints one `error: ...` line (exit 1), Ctrl-C exits 130."""
    try:
        action()
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    except errors as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 1
    return 0


def load_safetensors_checked(path, file_format: str, what: str):
    """(arrays, metadata) of a file written with metadata {"format": file_format}; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).strip().splitlines()[0]})") from None
    found = metadata.get("format", "")
    if found.split("/")[0] == file_format.split("/")[0] and found != file_format:
        raise ValueError(f"{path} is a {what} file of another mlx-titans version (format {found}; this one reads "
                         f"{file_format})")
    if found != file_format:
        raise ValueError(f"{path} is not a {what} file")
    return arrays, metadata
