"""The machine a benchmark runs on: its name as results record it, and processes that share its GPU."""

import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx


def device_name() -> str:
    """e.g. 'NVIDIA H100 80GB HBM3, mlx 0.32.4 on Device(gpu, 0); Linux-...'"""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return f"{info.get('device_name', '?')}, mlx {mx.__version__} on {mx.default_device()}; {platform.platform()}"


def command_line(module: str, argv=None) -> str:
    """The command that made a result, as a user types it (`python -m benchmarks.NAME ARGS`), for its "command"
    field: `argv` when main was called with it, else the process's own arguments."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


class GPUs:
    """n GPUs shared by processes started from several threads: `least_busy()` holds the one with the fewest
    processes on it while its block runs and gives its CUDA_VISIBLE_DEVICES value (the first n of those already
    visible, if that was set), or None when n is 1: the process then sees every GPU, as without this."""

    def __init__(self, n: int = 1):
        if n < 1:
            raise ValueError(f"the number of GPUs must be at least 1, got {n}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.names = visible.split(",")[:n] if visible else [str(i) for i in range(n)]
        if len(self.names) < n:
            raise ValueError(f"{n} GPUs asked for, but CUDA_VISIBLE_DEVICES={visible} shows fewer")
        self.busy, self.lock = [0] * n, threading.Lock()

    @contextmanager
    def least_busy(self):
        if len(self.busy) == 1:
            yield None
            return
        with self.lock:
            gpu = self.busy.index(min(self.busy))
            self.busy[gpu] += 1
        try:
            yield self.names[gpu]
        finally:
            with self.lock:
                self.busy[gpu] -= 1


def run_logged(commands: list, folder: Path, name: str, gpus: GPUs = None) -> int:
    """Run the commands one after the other in processes of their own, output to FOLDER/log.txt, stopping at the
    first failure; returns its exit code (0 if none failed). Given several `gpus`, the processes see only the least
    busy one (through CUDA_VISIBLE_DEVICES). On MLX's CUDA backend they get a copy of MLX_PTX_CACHE_DIR named after
    NAME: three processes sharing one kernel cache crashed once with illegal memory accesses (H100); three with
    copies of their own ran."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if env.get("MLX_PTX_CACHE_DIR"):
        own = f"{env['MLX_PTX_CACHE_DIR'].rstrip('/')}-{name}"
        if Path(env["MLX_PTX_CACHE_DIR"]).is_dir():
            shutil.copytree(env["MLX_PTX_CACHE_DIR"], own, dirs_exist_ok=True)
        env["MLX_PTX_CACHE_DIR"] = own
    with (gpus or GPUs()).least_busy() as gpu, open(folder / "log.txt", "w") as log:
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        for command in commands:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if code:
                return code
    return 0


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
