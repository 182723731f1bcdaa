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

from ..backend import active_backend

_enabled = True


def kernels_enabled() -> bool:
    return _enabled


def kernel_backend() -> str | None:
    """'cuda' or 'metal' when custom kernels should run now, else None (pure-MLX path)."""
    if not _enabled:
        return None
    backend = active_backend()
    return backend if backend in ("cuda", "metal") else None


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


def fused_time_mix(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size: int):
    """The fused WKV-7 kernel (see custom_kernels/wkv7.kern), or None where it does not run."""
    backend = kernel_backend()
    if backend is None or head_size % 32:
        return None
    from .dialect import build

    B, T, C = r.shape
    N, H = head_size, C // head_size
    f32 = [x.astype(mx.float32) for x in (r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state)]
    y, state_out, _ = build("wkv7", backend)(
        inputs=f32,
        template=[("H", H), ("N", N)],
        grid=(B * H * 4 * N, 1, 1),
        threadgroup=(4 * N, 1, 1),
        output_shapes=[(B, T, C), (B, H, N, N), (B * H * T * 6 * N,)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return y, state_out
