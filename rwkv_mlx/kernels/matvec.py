"""One-token matrix-vector products by the segmented kernel (custom_kernels/matvec.kern).

A launch multiplies up to four weight matrices, each by its own input vector,
with optional LayerNorm + token-shift prologue and relu^2 / residual epilogues.
Layers of every storage form (rwkv_mlx/layers.py) take part: dense, affine
(MLX's packed codes), and GGUF Q6_K blocks as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..layers import AffineLinear, GGMLLinear, Linear

Q6_K = 14
WARPS = 8
SHARED_FLOATS = 11_900  # 48 KB of static shared memory, less the reduction scratch
_DENSE_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}


@dataclass
class Segment:
    """One matrix of a launch. ``weight`` is a layer or a bare (rows, K) float array."""

    weight: nn.Module | mx.array
    x_offset: int = 0
    mode: int = 0  # PRO 0: 1 tanh, 2 sigmoid on the input; PRO 1: lerp row (-1: none)

    def arrays(self):
        """(bytes, scales, offsets) of the weight, plus its format key, rows and columns."""
        w = self.weight
        if isinstance(w, mx.array):
            return w.view(mx.uint8), None, None, ("dense", 0), w.shape[0], w.shape[1], _DENSE_CODES[w.dtype]
        if isinstance(w, AffineLinear):
            rows, k = w.scales.shape[0], w.scales.shape[1] * w.group_size
            if w.group_size != 32:
                return None
            return w.weight.view(mx.uint8), w.scales, w.biases, ("affine", w.bits), rows, k, 0
        if isinstance(w, GGMLLinear):
            if w.ggml_type != Q6_K:
                return None
            return w.weight.view(mx.uint8), None, None, ("q6_k", 0), w.weight.shape[0], w.in_dims, 0
        if isinstance(w, Linear):
            return self.__class__(w.weight, self.x_offset, self.mode).arrays()
        return None


def _rows_per_warp(segment_rows: list[int]) -> int | None:
    total = sum(segment_rows)
    for rpw in (4, 2, 1):
        if all(r % (WARPS * rpw) == 0 for r in segment_rows) and (total // (WARPS * rpw) >= 264 or rpw == 1):
            return rpw
    return None


def matvec(x: mx.array, segments: list[Segment], *, prologue: int = 0, epilogue: int = 0,
           bias: mx.array | None = None, residual: mx.array | None = None, prev: mx.array | None = None,
           ln: nn.LayerNorm | None = None, mix: mx.array | None = None, eps: float = 1e-5,
           backend: str = "cuda"):
    """y [B, rows] = concat_s(W_s @ x_s) (+ bias, epilogue), or None if these weights don't fit the kernel.

    prologue 1 normalizes x [B, K] with ``ln`` and lerps towards ``prev`` by ``mix[mode]``;
    its second result is the normalized x (the next token-shift state).
    """
    from .dialect import build

    parts = [s.arrays() for s in segments]
    if any(p is None for p in parts) or len({p[3] for p in parts}) != 1:
        return None
    kind, bits = parts[0][3]
    B = x.shape[0]
    rows = [p[4] for p in parts]
    ks = [p[5] for p in parts]
    rpw = _rows_per_warp(rows)
    kmax = -(-max(ks) // 32) * 32
    if rpw is None or any(k % 32 for k in ks) or B * kmax * 33 // 32 > SHARED_FLOATS:
        return None
    if kind == "q6_k" and any(k % 256 for k in ks):
        return None

    starts, table = 0, []
    for seg, p in zip(segments, parts):
        table.append([starts, p[5], seg.x_offset, seg.mode, p[6]])
        starts += p[4]
    table.append([starts, 0, 0, 0, 0])
    dummy = mx.zeros((1,), dtype=mx.float32)
    scale_dtype = parts[0][1].dtype if parts[0][1] is not None else mx.float32

    def four(i, fill):
        vals = [p[i] if p[i] is not None else fill for p in parts]
        return vals + [vals[-1]] * (4 - len(vals))

    k_ln = x.shape[1]
    inputs = [
        x.astype(mx.float32),
        (prev if prev is not None else dummy).astype(mx.float32),
        ln.weight if ln is not None else dummy,
        ln.bias if ln is not None else dummy,
        (mix if mix is not None else dummy).astype(mx.float32),
        mx.array([eps], dtype=mx.float32),
        mx.array(table, dtype=mx.int32),
        bias if bias is not None else dummy,
        residual.astype(mx.float32) if residual is not None else dummy,
        *four(0, None),
        *four(1, dummy.astype(scale_dtype)),
        *four(2, dummy.astype(scale_dtype)),
    ]
    defines = {"dense": ("FMT_DENSE",), "affine": ("FMT_AFFINE",), "q6_k": ("FMT_Q6_K",)}[kind]
    y, xn = build("matvec", backend, defines)(
        inputs=inputs,
        template=[("NB", B), ("RPW", rpw), ("KMAX", kmax), ("PRO", prologue), ("EPI", epilogue),
                  ("BITS", bits), ("HAS_BIAS", int(bias is not None))],
        grid=(starts // rpw * 32, 1, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(B, starts), (B, k_ln) if prologue == 1 else (1,)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return (y, xn) if prologue == 1 else y
