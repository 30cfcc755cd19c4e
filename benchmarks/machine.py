"""The machine a benchmark ran on, as its results record it."""

import platform

import mlx.core as mx


def device_name() -> str:
    """e.g. 'NVIDIA H100 80GB HBM3, mlx 0.32.4 on Device(gpu, 0); Linux-...'"""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return f"{info.get('device_name', '?')}, mlx {mx.__version__} on {mx.default_device()}; {platform.platform()}"
