"""The LayerNorm + token-shift prologue of a matvec launch, as a launch of its own (custom_kernels/layernorm_lerp.kern).

With the prologue fused (matvec.kern PRO 1) every group of the launch normalizes and lerps the
whole input again: 498 groups for a 2.9B block's r/k/v + LoRA down launch at one row, 320 for its
FFN key. Split, one small launch writes each activation row's lerped inputs once, side by side
(``xin`` [B, M + 1, K]), and the matvec launch reads its segments' rows from there (PRO 0, each
segment's x_offset at its mix row). ``separate(backend)`` says which way a backend goes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..settings import env_int
from .dialect import build, device_constant, launches, placeholder

WARPS = 8  # layernorm_lerp.kern's WARPS: a group is 32 * WARPS threads, a thread per element of a row
# Whether a launch's LayerNorm prologue runs as a launch of its own (1) or in every group (0).
# Measured on an H100 (results/kernel_log.md step 13, 196d720, CUPTI): split, the two matvec launches
# with a prologue took 12.5 and 14.9 us instead of 28.6 and 32.7, and the prologue launches 7.4 and
# 7.2 us, so a Q4_K_M token kept the GPU busy 3.1 ms instead of about 4.0. But decode did not get
# faster (F16 202 tok/s split against 233 fused, Q8_0 186-224 against 189-252, alternating in one
# process): the split adds 65 launches a token, and at about 20 us of MLX host time a launch (inferred
# from those rates) the host sets the pace. So both backends keep the prologue fused until a token's launches cost the host
# less; Apple GPUs are unmeasured. None: $RWKV_MLX_SEPARATE_PROLOGUE or the backend's default.
SEPARATE_DEFAULT = {"cuda": 0, "metal": 0}
SEPARATE: int | None = None


def separate(backend: str) -> bool:
    """Whether ``backend``'s matvec plans take their LayerNorm prologue from a launch of its own."""
    return bool(env_int("RWKV_MLX_SEPARATE_PROLOGUE", SEPARATE_DEFAULT[backend], override=SEPARATE))


def lerp_row(mode: int, mixes: int) -> int:
    """The row of ``xin`` a segment of lerp ``mode`` reads (mode < 0: the normalized input itself)."""
    return mode if mode >= 0 else mixes


def shape(ln: nn.LayerNorm, mix: mx.array | None) -> tuple[int, int]:
    """(M, K): the lerps and the row length of a prologue (no mix, as the head's: M = 0, xin = xn)."""
    K = ln.weight.shape[0]
    return (0 if mix is None else mix.size // K), K


class LayerNormLerpPlan:
    """``(x [B, K], prev [B, K]) -> (xn [B, K], xin [B, M + 1, K])`` in one launch, for a fixed B
    (``mix`` [M, K]; None for a LayerNorm alone, as the head's: M = 0). ``xin_dtype`` float16: the rows
    rounded for a launch on the matrix units, which would round them the same way when staging them.

    ``parts`` P > 0: x is a matvec launch's raw sums of P parts of K (``x [P * B, K]``, part p's rows first, as
    matvec.add_parts takes them) and the call also takes their residual [B, K]: the row normalized is
    ``add_parts``' sum, ((x_0 + x_1) + ...) + residual in float32, which the call returns third
    (``xsum`` [B, 1, K], shaped as the block's x it is: a reshape is one more primitive for the host to replay
    and queue a block). So a block's W_o parts are added in its FFN key's prologue launch, not one of their
    own."""

    def __init__(self, ln: nn.LayerNorm, mix: mx.array | None, batch: int, backend: str,
                 xin_dtype: mx.Dtype = mx.float32, parts: int = 0):
        M, K = shape(ln, mix)
        self.K, self.M, self.B, self.xin_dtype, self.parts = K, M, batch, xin_dtype, parts
        self.kernel = build("layernorm_lerp", backend, () if parts else ("WHOLE",))
        # (P and NB serve only the parts: 0 for a whole row, so one text serves every batch size)
        self.template = [("K", self.K), ("M", self.M), ("P", parts), ("NB", batch if parts else 0)]
        self.consts = [ln.weight.astype(mx.float32), ln.bias.astype(mx.float32),
                       placeholder() if mix is None else mix.reshape(self.M, K).astype(mx.float32),
                       device_constant([ln.eps], mx.float32)]
        mx.eval(*self.consts)
        rows = max(parts, 1) * batch
        self.ok = self.K % 32 == 0 and launches(self.kernel, (tuple(self.template), str(xin_dtype)), lambda: self(
            mx.zeros((rows, self.K)), mx.zeros((batch, self.K)), mx.zeros((batch, self.K)) if parts else None))

    def __call__(self, x: mx.array, prev: mx.array | None, residual: mx.array | None = None):
        B, K, M = self.B, self.K, self.M
        given = [x] + ([residual] if self.parts else [])
        return self.kernel(
            inputs=[*given, self.consts[2] if prev is None else prev, *self.consts],  # (no prev: M = 0, never read)
            template=self.template,
            grid=(B * -(-K // (32 * WARPS)) * 32 * WARPS, 1, 1),  # a thread per element, whole groups
            threadgroup=(32 * WARPS, 1, 1),
            output_shapes=[(B, K), (B, (M + 1) * K)] + ([(B, 1, K)] if self.parts else []),
            output_dtypes=[mx.float32, self.xin_dtype] + ([mx.float32] if self.parts else []),
        )
