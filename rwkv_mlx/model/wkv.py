"""The RWKV-7 WKV recurrence: the pure-MLX reference, and the one place that picks an implementation.

Per head, with S[i, j] indexed (value i, key j) and vectors of length N:

    sa   = S @ a                      (removal: uses the old state)
    S'   = S * w[None, :] + v k^T + sa b^T
    y    = S' @ r

``a = -kk`` and ``b = kk * iclr`` (spec 1.2).  The decay arrives in log form
(``log_w = -e^-0.5 * sigmoid(z)`` in (-0.6065, 0)) and is exponentiated in
float32, never stored rounded: fp16 cannot hold 0.9999.
"""

from __future__ import annotations

import math

import mlx.core as mx

DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^-0.5 * sigmoid(z)): decays in (0.545, 1)
GROUP_NORM_EPS = 64e-5  # fixed in llama.cpp and BlinkDL's code (head size 64 x 1e-5), whatever the head size


def wkv7_step(r, log_w, k, v, a, b, state):
    """One token. Vectors [B, H, N], state [B, H, N, N]; all float32."""
    sa = state @ a[..., None]  # [B, H, N, 1]
    state = state * mx.exp(log_w)[..., None, :] + v[..., :, None] * k[..., None, :] + sa * b[..., None, :]
    return (state @ r[..., None])[..., 0], state


def wkv7_sequential(r, log_w, k, v, a, b, state):
    """T tokens one after another. Inputs [B, T, H, N], state [B, H, N, N] -> (y [B, T, H, N], state)."""
    ys = []
    for t in range(r.shape[1]):
        y, state = wkv7_step(r[:, t], log_w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        ys.append(y)
    return mx.stack(ys, axis=1), state


def wkv7(r, log_w, k, v, a, b, state, *, differentiable: bool = False):
    """The WKV recurrence by the best implementation for this backend and length.

    ``differentiable`` asks for a path MLX can take gradients through (training):
    the chunked matrix form, whose graph has a few ops per 32 tokens instead of
    several per token (forward and backward).
    """
    if differentiable and r.shape[1] > 1:
        from .wkv_chunked import wkv7_chunked

        return wkv7_chunked(r, log_w, k, v, a, b, state)
    return wkv7_sequential(r, log_w, k, v, a, b, state)


def time_mix_core_reference(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size: int,
                            differentiable: bool = False):
    """Everything between the projections and the output matrix, in plain MLX ops.

    Inputs [B, T, C] float32 (``w_raw = w0 + LoRA``, ``a_raw = a0 + LoRA``, ``v`` already
    mixed with v_first), per-channel parameters [C], state [B, H, N, N].
    Returns (gated output [B, T, C], new state): the function the fused kernel computes.
    """
    B, T, C = r.shape
    N = head_size
    heads = (B, T, C // N, N)
    log_w = -DECAY_SCALE * mx.sigmoid(w_raw)
    iclr = mx.sigmoid(a_raw)
    kk = (k * k_k).reshape(heads)
    kk = kk / mx.maximum(mx.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    k = k * (1 + (iclr - 1) * k_a)
    r4, k4, v4 = r.reshape(heads), k.reshape(heads), v.reshape(heads)
    y, state = wkv7(r4, log_w.reshape(heads), k4, v4, -kk, kk * iclr.reshape(heads), state,
                    differentiable=differentiable)
    y = mx.fast.layer_norm(y, None, None, GROUP_NORM_EPS).reshape(B, T, C) * ln_w + ln_b
    bonus = (r4 * k4 * r_k.reshape(-1, N)).sum(axis=-1, keepdims=True) * v4
    return (y + bonus.reshape(B, T, C)) * g, state


def time_mix_core(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size: int,
                  differentiable: bool = False):
    """``time_mix_core_reference`` by the fused GPU kernel where one runs, else the reference."""
    if not differentiable:
        from ..kernels import fused_time_mix

        out = fused_time_mix(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size)
        if out is not None:
            return out
    return time_mix_core_reference(r, k, v, w_raw, a_raw, g, k_k, k_a, r_k, ln_w, ln_b, state, head_size,
                                   differentiable)
