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

import mlx.core as mx


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

    ``differentiable`` asks for a path MLX can take gradients through (training).
    """
    return wkv7_sequential(r, log_w, k, v, a, b, state)
