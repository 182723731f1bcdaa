"""Launches of the fused WKV-7 time-mix kernel (custom_kernels/wkv7.kern).

Prefill passes a whole prompt, its pre-activations computed by MLX's matmuls;
decode (kernels/decode.py) passes one token with the LoRA down outputs, and the
kernel computes the up-projections itself. Either way one thread group of 4N
threads owns one (batch row, head), and the template is chosen here from the
backend's limits.
"""

from __future__ import annotations

import mlx.core as mx

from .dialect import LIMITS, Kernel, build, launches, placeholder

MAX_STAGED_TOKENS = 16  # tokens staged per step of the serial loop; more gained nothing on CUDA
# Head sizes whose state rows the kernel holds interleaved (wkv7.kern IL): whole sectors a warp, but
# at N = 128 ptxas gave 168 registers a thread, too many for the group's 512 threads.
INTERLEAVED_MAX_N = 64


def supports(head_size: int, backend: str) -> bool:
    """A group is 4N threads (a warp per 8 state rows) and N must split into 32-lane warps."""
    return head_size % 32 == 0 and head_size <= 128 and 4 * head_size <= LIMITS[backend].threads


def template(kernel: Kernel, heads: int, head_size: int, *, up: bool, mix_v: bool, max_down: int,
             tokens: int = MAX_STAGED_TOKENS):
    """The kernel's template for this model, or None if its shared memory can't hold it.

    Staging fewer tokens at a time (TB) is what gives way: the LoRA down outputs (max_down
    floats) must be staged whole. ``tokens``: the most a launch walks (decode: 1), so that TB
    stages no more. TB 16 costs registers whether used or not: ptxas gives a decode instantiation
    250 a thread at TB 16, so one 256-thread group fits an SM at a time.
    """
    t = {"H": heads, "N": head_size, "UP": int(up), "MIX_V": int(mix_v), "MAX_DOWN": max(1, max_down),
         "IL": int(head_size <= INTERLEAVED_MAX_N)}
    tb = 1 << (min(MAX_STAGED_TOKENS, max(1, tokens)).bit_length() - 1)  # (a power of two, as halving gives)
    while tb >= 1:
        if kernel.shared_bytes({**t, "TB": tb}.items()) <= kernel.limits.shared_bytes:
            return list({**t, "TB": tb}.items())
        tb //= 2
    return None


def prefill(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size: int, backend: str):
    """``wkv.time_mix_core_reference`` for a whole prompt, or None where the kernel can't run it.

    Inputs [B, T, C]; the kernel reads them packed per token, as the decode launches write
    them, so they are concatenated here.
    """
    if not supports(head_size, backend):
        return None
    kernel = build("wkv7", backend)
    B, T, C = r.shape
    N, H = head_size, C // head_size
    tmpl = template(kernel, H, N, up=False, mix_v=False, max_down=1)
    if tmpl is None:
        return None
    channel = [a.astype(mx.float32) for a in (k_k, k_a, r_k, ln_w, ln_b)]
    no_lora = placeholder(mx.uint8)
    up_info = mx.zeros((4, 3), dtype=mx.int32)  # rank 0: no LoRA is applied in the kernel

    def run(r, k, v, w_raw, a_raw, g, state):
        B, T, _ = r.shape
        rows = B * T
        proj = mx.concatenate([r, k, v], axis=-1).reshape(rows, 3 * C).astype(mx.float32)
        pre = mx.concatenate([w_raw, a_raw, g], axis=-1).reshape(rows, 3 * C).astype(mx.float32)
        y, state_out, _ = kernel(
            inputs=[proj, pre, proj, up_info, no_lora, no_lora, no_lora, no_lora, pre, *channel,
                    state.astype(mx.float32)],
            template=tmpl,
            grid=(B * H * 4 * N, 1, 1),
            threadgroup=(4 * N, 1, 1),
            output_shapes=[(B, T, C), (B, H, N, N), (B * H * T * 10 * N,)],
            output_dtypes=[mx.float32, mx.float32, mx.float32],
        )
        return y, state_out

    if not launches(kernel, tuple(tmpl), lambda: run(*[mx.zeros((1, 1, C))] * 6, mx.zeros((1, H, N, N)))):
        return None  # (the trial's arrays are made only on the first launch of this template)
    return run(r, k, v, w_raw, a_raw, g, state)
