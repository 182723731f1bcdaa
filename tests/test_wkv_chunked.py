"""The chunked (matrix) WKV against the token recurrence: outputs, final state and gradients.

References: ``wkv7_sequential`` (MLX, the model's exact path), an independent
float64 numpy loop written from the recurrence in spec 1.2, and MLX autograd
of the sequential path for the gradients.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx.model.wkv import wkv7, wkv7_sequential
from rwkv_mlx.model.wkv_chunked import wkv7_chunked

LOG_DECAY_MIN = -0.6065306597126334  # -e^-0.5: the fastest decay RWKV-7 can express


def make_inputs(B, T, H, N, seed=0, fastest=False):
    """Realistic inputs: r, k, v Gaussian, log decays in [-0.61, 0), a = -kk (unit), b = kk * iclr."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((B, T, H, N))
    k = 0.5 * rng.standard_normal((B, T, H, N))
    v = rng.standard_normal((B, T, H, N))
    lw = np.full((B, T, H, N), LOG_DECAY_MIN) if fastest else rng.uniform(LOG_DECAY_MIN, 0, (B, T, H, N))
    kk = rng.standard_normal((B, T, H, N))
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = rng.uniform(0, 1, (B, T, H, N))
    s = 0.3 * rng.standard_normal((B, H, N, N))
    return [x.astype(np.float32) for x in (r, lw, k, v, -kk, kk * iclr, s)]


def numpy_wkv(r, lw, k, v, a, b, s):
    """float64 token loop: S' = S diag(w) + v k^T + (S a) b^T, y = S' r (per batch row and head)."""
    r, lw, k, v, a, b, S = (x.astype(np.float64) for x in (r, lw, k, v, a, b, s))
    B, T, H, N = r.shape
    y = np.zeros((B, T, H, N))
    S = S.copy()
    for t in range(T):
        w = np.exp(lw[:, t])
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * w[:, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
        y[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("B,T,H,N,L", [
    (2, 37, 2, 16, 8),    # T not a multiple of the chunk: padded tail
    (1, 64, 2, 64, 32),   # the model's head size, two chunks
    (1, 100, 1, 64, 64),  # chunk 64 with mid-chunk centring
    (2, 5, 1, 8, 16),     # shorter than one chunk
    (1, 1, 1, 8, 16),     # one token
])
def test_forward_matches_recurrence(B, T, H, N, L):
    x = make_inputs(B, T, H, N, seed=T)
    y, s = wkv7_chunked(*(mx.array(a) for a in x), chunk_size=L)
    y_ref, s_ref = numpy_wkv(*x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5
    y_seq, s_seq = wkv7_sequential(*(mx.array(a) for a in x))
    assert rel_err(y, y_seq) < 1e-5 and rel_err(s, s_seq) < 1e-5


@pytest.mark.parametrize("L", [16, 32, 64])
def test_fastest_decay_stays_finite_and_exact(L):
    """Every channel at the decay bound: the largest exponents the factorisation can meet."""
    x = make_inputs(1, 2 * L, 1, 64, seed=1, fastest=True)
    y, s = wkv7_chunked(*(mx.array(a) for a in x), chunk_size=L)
    y_ref, s_ref = numpy_wkv(*x)
    assert np.isfinite(np.array(y)).all()
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def _loss(fn, wy, ws):
    def f(*inputs):
        y, s = fn(*inputs)
        return (y * wy).sum() + (s * ws).sum()  # weights every output and every state entry differently
    return f


@pytest.mark.parametrize("B,T,H,N,L", [(2, 37, 2, 16, 8), (1, 70, 2, 32, 32)])
def test_gradients_match_autograd_of_the_recurrence(B, T, H, N, L):
    x = [mx.array(a) for a in make_inputs(B, T, H, N, seed=7)]
    rng = np.random.default_rng(8)
    wy = mx.array(rng.standard_normal((B, T, H, N)).astype(np.float32))
    ws = mx.array(rng.standard_normal((B, H, N, N)).astype(np.float32))
    argnums = list(range(7))  # r, log_w, k, v, a, b and the initial state
    want = mx.grad(_loss(wkv7_sequential, wy, ws), argnums=argnums)(*x)
    got = mx.grad(_loss(lambda *a: wkv7_chunked(*a, chunk_size=L), wy, ws), argnums=argnums)(*x)
    for name, g, w in zip(("r", "log_w", "k", "v", "a", "b", "state"), got, want):
        assert rel_err(g, w) < 1e-4, name


def test_dispatch_uses_chunked_form_when_differentiable():
    x = [mx.array(a) for a in make_inputs(1, 40, 1, 16, seed=3)]
    y_d, s_d = wkv7(*x, differentiable=True)
    y_c, s_c = wkv7_chunked(*x)
    assert np.array_equal(np.array(y_d), np.array(y_c)) and np.array_equal(np.array(s_d), np.array(s_c))
    y_i, _ = wkv7(*x)  # inference keeps the exact token loop
    y_s, _ = wkv7_sequential(*x)
    assert np.array_equal(np.array(y_i), np.array(y_s))
