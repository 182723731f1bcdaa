"""One decoded token through one RWKV-7 block in seven kernel launches.

    1. r | k | v      = W_{r,k,v} @ lerp(LN1(x))              matvec, 3 segments, LN prologue
    2. LoRA down      = W_{w1,a1,v1,g1} @ lerp(LN1(x))        matvec, 4 segments, LN prologue
    3. LoRA up        = W_{w2,a2,v2,g2} @ act(down) + bias    matvec, 4 segments
    4. time mix       = WKV-7 with value mix, norm, bonus, gate (reads 1 and 3 as written)
    5. x             += W_o @ y                                matvec, residual epilogue
    6. h              = relu(W_k @ lerp(LN2(x)))^2             matvec, LN prologue, relu^2
    7. x             += W_v @ h                                matvec, residual epilogue

It computes what ``Block.__call__`` computes for T = 1 (tests hold it to the
pure-MLX path); a block whose weights the kernels cannot take keeps that path.
Everything constant is prepared once per block and batch size (``BlockPlan``).
"""

from __future__ import annotations

import mlx.core as mx

from .dialect import build
from .matvec import MatvecPlan, Segment

LERP_R, LERP_W, LERP_K, LERP_V, LERP_A, LERP_G = range(6)
TANH, SIGMOID = 1, 2


class BlockPlan:
    """The seven launches of one block for one batch size."""

    def __init__(self, block, batch: int, backend: str):
        att, ffn = block.att, block.ffn
        C, N = att.w0.shape[0], att.head_size
        B = batch
        self.mix_v = hasattr(att, "v1")
        self.C, self.N, self.H, self.B = C, N, C // N, B
        downs = [(att.w1, LERP_W), (att.a1, LERP_A)] + ([(att.v1, LERP_V)] if self.mix_v else []) + [(att.g1, LERP_G)]
        ranks = [w.shape[0] for w, _ in downs]
        offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        ups = [(att.w2, TANH), (att.a2, 0)] + ([(att.v2, 0)] if self.mix_v else []) + [(att.g2, SIGMOID)]
        up_bias = mx.concatenate([att.w0, att.a0] + ([att.v0] if self.mix_v else []) + [mx.zeros((C,))])
        ln1 = dict(prologue=1, ln=block.ln1, mix=att.x_lerp)
        self.rkv = MatvecPlan([Segment(att.receptance, mode=LERP_R), Segment(att.key, mode=LERP_K),
                               Segment(att.value, mode=LERP_V)], B, backend=backend, **ln1)
        self.down = MatvecPlan([Segment(w, mode=m) for w, m in downs], B, backend=backend, **ln1)
        self.up = MatvecPlan([Segment(w, x_offset=o, mode=m) for (w, m), o in zip(ups, offsets)], B,
                             backend=backend, bias=up_bias, x_stride=sum(ranks))
        self.out = MatvecPlan([Segment(att.output)], B, backend=backend, epilogue=2, out_shape=(B, 1, C))
        self.key = MatvecPlan([Segment(ffn.key)], B, backend=backend, prologue=1, epilogue=1, ln=block.ln2,
                              mix=ffn.x_k.reshape(1, -1))
        self.value = MatvecPlan([Segment(ffn.value)], B, backend=backend, epilogue=2, out_shape=(B, 1, C))
        self.ok = N % 32 == 0 and all(p.ok for p in (self.rkv, self.down, self.up, self.out, self.key, self.value))
        self.wkv = build("wkv7", backend)
        self.channel = [att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias]
        self.dummy = mx.zeros((1,))
        mx.eval(self.dummy)

    def __call__(self, x, att_shift, ffn_shift, wkv_state, v_first):
        B, C, H, N = self.B, self.C, self.H, self.N
        rkv, xn = self.rkv(x, att_shift)
        pre = self.up(self.down(x, att_shift)[0])
        if not self.mix_v:
            v_first = rkv[:, 2 * C:].reshape(B, 1, C)
        y, wkv_state, _ = self.wkv(
            inputs=[rkv, pre, v_first if self.mix_v else self.dummy, *self.channel, wkv_state],
            template=[("H", H), ("N", N), ("MIX_V", int(self.mix_v))],
            grid=(B * H * 4 * N, 1, 1),
            threadgroup=(4 * N, 1, 1),
            output_shapes=[(B, C), (B, H, N, N), (B * H * 6 * N,)],
            output_dtypes=[mx.float32, mx.float32, mx.float32],
        )
        x = self.out(y, residual=x)
        h, xf = self.key(x, ffn_shift)
        return self.value(h, residual=x), xn, xf, wkv_state, v_first


def block_step(block, x, att_shift, ffn_shift, wkv_state, v_first, backend: str):
    """(x, att_shift, ffn_shift, wkv_state, v_first) after one token, or None if unsupported."""
    plans = block.__dict__.get("_decode_plans")
    if plans is None:
        plans = {}
        object.__setattr__(block, "_decode_plans", plans)  # a cache, not a parameter
    plan = plans.get(x.shape[0])
    if plan is None:
        plan = plans[x.shape[0]] = BlockPlan(block, x.shape[0], backend)
    return plan(x, att_shift, ffn_shift, wkv_state, v_first) if plan.ok else None
