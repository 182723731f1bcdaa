"""Custom GPU kernels and the dispatch that picks them: Metal, CUDA, or the pure-MLX path.

Kernel bodies live in ``custom_kernels/`` (one shared dialect); this package
turns them into Metal and CUDA sources.  On the CPU backend -- wherever a
kernel is missing, or inside ``kernels_disabled()`` -- the pure-MLX reference
path runs instead.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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


def fused_time_mix(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size: int):
    """``wkv.time_mix_core_reference`` by the fused WKV-7 kernel (custom_kernels/wkv7.kern), or None.

    Inputs [B, T, C]; the kernel reads them packed per token, as the decode
    launches write them, so they are concatenated here (prefill only; the
    LoRA up-projections were MLX matmuls, so the kernel copies them in).
    """
    backend = kernel_backend()
    if backend is None or head_size % 32 or head_size > 128:  # group of 4N threads, staging in 48 KB
        return None
    from .dialect import build

    B, T, C = r.shape
    N, H = head_size, C // head_size
    rows = B * T
    proj = mx.concatenate([r, k, v], axis=-1).reshape(rows, 3 * C).astype(mx.float32)
    pre = mx.concatenate([w_raw, a_raw, g], axis=-1).reshape(rows, 3 * C).astype(mx.float32)
    channel = [a.astype(mx.float32) for a in (k_k, k_a, r_k, ln_w, ln_b)]
    no_lora = mx.zeros((1,), dtype=mx.uint8)
    y, state_out, _ = build("wkv7", backend)(
        inputs=[proj, pre, proj, mx.zeros((4, 3), dtype=mx.int32), no_lora, no_lora, no_lora, no_lora, pre,
                *channel, state.astype(mx.float32)],
        template=[("H", H), ("N", N), ("UP", 0), ("MIX_V", 0), ("MAX_DOWN", 1)],
        grid=(B * H * 4 * N, 1, 1),
        threadgroup=(4 * N, 1, 1),
        output_shapes=[(B, T, C), (B, H, N, N), (B * H * T * 10 * N,)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return y, state_out


def head_plan(ln_out, head, batch: int, backend: str):
    """The one-launch plan of ``logits = head(LayerNorm(x))`` for ``batch`` tokens (its ``ok`` says if it runs)."""
    from .matvec import MatvecPlan, Segment

    rows = head.weight.shape[0]
    return MatvecPlan([Segment(head, mode=-1)], batch, backend=backend, prologue=1, ln=ln_out,
                      out_shape=(batch, 1, rows))
