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
    from .matvec import MatvecPlan, Segment

    B = x.shape[0]
    plans = head.__dict__.setdefault("_head_plans", {})  # a cache, not a parameter
    plan = plans.get(B)
    if plan is None:
        rows = head.weight.shape[0]
        plan = plans[B] = MatvecPlan([Segment(head, mode=-1)], B, backend=backend, prologue=1, ln=ln_out,
                                     out_shape=(B, 1, rows))
    return plan(x)[0] if plan.ok else None


def compiled_decode_step(model, batch: int):
    """``(tokens [B], *state arrays) -> (logits [B, V], *state arrays)`` as one compiled graph, or None.

    Replaying a compiled graph spares the host rebuilding ~250 launches per token
    in Python. The launch plans hold evaluated constants, so they are built by an
    eager warm-up call before tracing. The weights are captured: a model whose
    weights change must drop ``model._compiled_steps``.
    """
    if kernel_backend() is None:
        return None
    cache = model.__dict__.setdefault("_compiled_steps", {})  # a cache, not a parameter
    step = cache.get(batch)
    if step is None:
        from ..model.state import State

        model(mx.zeros((batch, 1), dtype=mx.uint32), model.initial_state(batch), logits="last")

        def one_token(tokens, *arrays):
            logits, state = model(tokens[:, None], State.from_arrays(list(arrays)), logits="last")
            return (logits[:, -1], *state.arrays())

        step = cache[batch] = mx.compile(one_token)
    return step
