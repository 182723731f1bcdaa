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
from .dialect import hook_active

_enabled = True
_forced: str | None = None


def kernels_enabled() -> bool:
    return _enabled


def kernel_backend() -> str | None:
    """'cuda' or 'metal' when custom kernels should run now, else None (pure-MLX path)."""
    if not _enabled:
        return None
    backend = _forced or active_backend()
    return backend if backend in ("cuda", "metal") else None


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Plan and launch kernels for ``backend`` whatever MLX runs on.

    Only meaningful inside ``dialect.launch_hook``, which then receives the launches
    (the Metal proof records and emulates them on a machine without an Apple GPU).
    """
    global _forced
    saved, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = saved


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
    """``wkv.time_mix_core_reference`` by the fused WKV-7 kernel (kernels/wkv7.py), or None."""
    backend = kernel_backend()
    if backend is None:
        return None
    from .wkv7 import prefill

    return prefill(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size, backend)


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
    if kernel_backend() is None or hook_active():  # a launch hook needs concrete arrays
        return None
    cache = model.__dict__.setdefault("_compiled_steps", {})  # a cache, not a parameter
    step = cache.get(batch)
    if step is None:
        from ..state import State

        model(mx.zeros((batch, 1), dtype=mx.uint32), model.initial_state(batch), logits="last")

        def one_token(tokens, *arrays):
            logits, state = model(tokens[:, None], State.from_arrays(list(arrays)), logits="last")
            return (logits[:, -1], *state.arrays())

        step = cache[batch] = mx.compile(one_token)
    return step
