"""Custom GPU kernels and the dispatch that picks them: Metal, CUDA, or the pure-MLX path.

Kernel bodies live in ``custom_kernels/`` (one shared dialect); this package
turns them into Metal and CUDA sources.  On the CPU backend -- wherever a
kernel is missing, or inside ``kernels_disabled()`` -- the pure-MLX reference
path runs instead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import mlx.core as mx

_enabled = True


def kernels_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Run the pure-MLX reference path (the benchmark's quality reference uses this)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def ggml_matmul(x: mx.array, blocks: mx.array, ggml_type: int, in_dims: int,
                fallback: Callable[[], mx.array]) -> mx.array:
    """x @ W.T for W stored as GGUF blocks (rows of ``blocks``)."""
    w = fallback()
    return (x.astype(mx.float32) @ w.T).astype(x.dtype)
