"""Custom GPU kernels and the dispatch that picks them: Metal, CUDA, or the pure-MLX path.

Kernel bodies live in ``custom_kernels/`` (one shared dialect); this package
turns them into Metal and CUDA sources.  On the CPU backend -- wherever a
kernel is missing, or inside ``kernels_disabled()`` -- the pure-MLX reference
path runs instead.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .. import layers
from ..backend import active_backend

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


def expand_blocks(weight, ggml_type: int, in_dims: int, dtype):
    """GGUF blocks as a float32 or float16 matrix by the dequant kernel (kernels/dequant.py), or None."""
    backend = kernel_backend()
    if backend is None:
        return None
    from .dequant import expand

    return expand(weight, ggml_type, in_dims, backend, dtype)


def expand_affine(weight, scales, biases, bits: int, group_size: int, dtype):
    """MLX affine codes as a float32 or float16 matrix by the dequant kernel (kernels/dequant.py), or None."""
    backend = kernel_backend()
    if backend is None:
        return None
    from .dequant import expand_affine as expand

    return expand(weight, scales, biases, bits, group_size, backend, dtype)


# (layers sit below the kernels and can't import them)
layers.BLOCK_EXPANDER, layers.AFFINE_EXPANDER = expand_blocks, expand_affine


def head_plan(ln_out, head, batch: int, backend: str):
    """The one-launch plan of ``logits = head(LayerNorm(x))`` for ``batch`` tokens (its ``ok`` says if it runs)."""
    from .matvec import MatvecPlan, Segment

    rows = head.weight.shape[0]
    return MatvecPlan([Segment(head, mode=-1)], batch, backend=backend, prologue=1, ln=ln_out,
                      out_shape=(batch, 1, rows))
