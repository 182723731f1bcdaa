"""A matvec launch's work done by MLX's own matrix products, for batches of many rows.

The decode kernels (matvec.kern) keep RPW x B accumulators a warp and re-read the staged input
for every row, so their cost grows with B almost linearly; past ``matvec.MAX_BATCH`` rows a
decoded token's products go to MLX (each layer's own ``__call__``: dense, affine or GGUF blocks)
while the rest of the block keeps its kernels: the whole time mix (LoRA up-projections, WKV-7,
GroupNorm, gate) stays one launch. Without this, a batch above the bound fell back to the whole
pure-MLX block: about three times the graph (245 nodes a layer against 84 here, a 2-layer model's
uncompiled decode step at 32 rows, counted on the CPU with the launches recorded).

``ProductPlan`` takes a ``MatvecPlan``'s arguments and is called the same way, so a block plan
(kernels/decode.py) holds either; it computes what the pure path computes (same LayerNorm, same
products), so it matches ``Block.__call__`` to float32 rounding.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..layers import product
from .matvec import Segment, epilogue_ops


class ProductPlan:
    """y [B, rows] = concat_s(W_s @ x_s) (+ bias) with MatvecPlan's prologues and epilogues, by MLX operations."""

    def __init__(self, segments: list[Segment], batch: int, *, prologue: int = 0, epilogue: int = 0,
                 ln: nn.LayerNorm | None = None, mix: mx.array | None = None,
                 out_shape: tuple[int, ...] | None = None, half_input: bool = False,
                 out_dtype: mx.Dtype = mx.float32, bias: mx.array | None = None):
        # (half_input and out_dtype as MatvecPlan takes them: MLX's products read and write float32 rows here)
        self.segments, self.prologue, self.epilogue, self.ln = segments, prologue, epilogue, ln
        self.bias = bias.astype(mx.float32) if bias is not None else None
        self.x_dtype = mx.float32
        # Each segment's lerp row, taken out once: indexing ``mix`` at every step was a gather launch per
        # segment (224 of a 2.9B step's ~2,000 launches on an H100, results/raw/*-65272d1-profile-batch16.log).
        self.mix_rows = {s.mode: mix[s.mode] for s in segments if prologue == 1 and s.mode >= 0}
        mx.eval(*self.mix_rows.values())
        rows = sum(s.weight.shape[0] for s in segments)  # (a matrix layer's shape is (out, in) as an array's)
        k = segments[0].weight.shape[1]
        self.out_shapes = [out_shape or (batch, rows), (batch, k) if prologue == 1 else (1,)]
        self.ok = True

    def _input(self, x: mx.array, xn: mx.array | None, prev: mx.array | None, seg: Segment, k: int) -> mx.array:
        if self.prologue == 1:  # LayerNorm, then the token-shift lerp by mix[mode] (mode < 0: none)
            return xn if seg.mode < 0 else xn + (prev - xn) * self.mix_rows[seg.mode]
        v = x[:, seg.x_offset : seg.x_offset + k]
        return mx.tanh(v) if seg.mode == 1 else mx.sigmoid(v) if seg.mode == 2 else v

    def __call__(self, x: mx.array, prev: mx.array | None = None, residual: mx.array | None = None):
        B = x.shape[0]
        x = x.reshape(B, -1).astype(mx.float32)
        xn = self.ln(x) if self.prologue == 1 else None
        ys = []
        for seg in self.segments:
            w = seg.weight
            inp = self._input(x, xn, prev, seg, w.shape[1])
            ys.append(product(inp, w) if isinstance(w, mx.array) else w(inp).astype(mx.float32))
        y = ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=-1)
        if self.bias is not None:
            y = y + self.bias
        y = epilogue_ops(y, self.epilogue, residual, self.out_shapes[0])
        return (y, xn) if self.prologue == 1 else y
