"""Custom GPU kernels and the dispatch that picks them: Metal, CUDA, or the pure-MLX path.

Kernel bodies live in ``custom_kernels/`` (one shared dialect); this package
turns them into Metal and CUDA sources.  On the CPU backend -- and wherever a
kernel is missing -- the pure-MLX reference path runs instead.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


def ggml_matmul(x: mx.array, blocks: mx.array, ggml_type: int, in_dims: int,
                fallback: Callable[[], mx.array]) -> mx.array:
    """x @ W.T for W stored as GGUF blocks (rows of ``blocks``)."""
    w = fallback()
    return (x.astype(mx.float32) @ w.T).astype(x.dtype)
