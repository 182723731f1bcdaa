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


def fused_time_mix(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size: int,
                   v_first=None, v_raw=None):
    """The fused WKV-7 kernel (custom_kernels/wkv7.kern), or None where it does not run.

    With ``v_first`` and ``v_raw`` the value-residual mix happens inside the kernel.
    """
    backend = kernel_backend()
    if backend is None or head_size % 32:
        return None
    from .dialect import build

    B, T, C = r.shape
    N, H = head_size, C // head_size
    mix = v_first is not None
    if not mix:
        v_first = v_raw = v
    inputs = [a.astype(mx.float32) for a in (r, k, v, v_first, v_raw, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state)]
    y, state_out, _ = build("wkv7", backend)(
        inputs=inputs,
        template=[("H", H), ("N", N), ("MIX_V", int(mix))],
        grid=(B * H * 4 * N, 1, 1),
        threadgroup=(4 * N, 1, 1),
        output_shapes=[(B, T, C), (B, H, N, N), (B * H * T * 6 * N,)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return y, state_out


def fused_block_step(block, x, att_shift, ffn_shift, wkv_state, v_first):
    """One token through ``block`` by the decode kernels (kernels/decode.py), or None."""
    backend = kernel_backend()
    if backend is None:
        return None
    from .decode import block_step

    return block_step(block, x, att_shift, ffn_shift, wkv_state, v_first, backend)


def fused_head(ln_out, head, x):
    """logits = head(LayerNorm(x)) for one token in one launch, or None."""
    backend = kernel_backend()
    if backend is None:
        return None
    from .matvec import Segment, matvec

    B, _, C = x.shape
    out = matvec(x.reshape(B, C), [Segment(head, mode=-1)], prologue=1, ln=ln_out, eps=ln_out.eps, backend=backend)
    return None if out is None else out[0].reshape(B, 1, -1)
