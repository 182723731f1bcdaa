"""Which MLX backend arrays run on (Apple GPU (Metal), NVIDIA GPU (CUDA) or CPU), and choosing the device."""

from __future__ import annotations

import mlx.core as mx

from .errors import InvalidArgumentError


def active_backend() -> str:
    """'metal', 'cuda' or 'cpu', for the current default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def device_name() -> str:
    """A human-readable name of the device computing now (for benchmark logs)."""
    backend = active_backend()
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        name = info.get("device_name") or info.get("architecture")
        if name and backend != "cpu":
            return str(name)
    except Exception:
        pass
    if backend == "cpu":
        import platform

        return f"CPU ({platform.processor() or platform.machine()})"
    return backend.upper()


def select_device(device: str) -> None:
    if device == "cpu":
        mx.set_default_device(mx.cpu)
    elif device == "gpu":
        if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
            raise InvalidArgumentError("--device gpu: no GPU backend in this MLX build (install rwkv-mlx[cuda] on NVIDIA)")
        mx.set_default_device(mx.gpu)
    elif device != "auto":
        raise InvalidArgumentError(f"--device must be auto, gpu or cpu, got {device!r}")
