"""One decoded token through one RWKV-7 block in seven kernel launches.

    1. r, k, v       = W_{r,k,v} @ lerp(LN1(x))               matvec, 3 segments, LN prologue
    2. LoRA down     = W_{w1,a1,v1,g1} @ lerp(LN1(x))         matvec, 4 segments, LN prologue
    3. LoRA up       = W_{w2,a2,v2,g2} @ act(down) + bias     matvec, 4 segments
    4. time mix      = WKV-7 with value mix, norm, bonus, gate wkv7 kernel
    5. x            += W_o @ y                                 matvec, residual epilogue
    6. h             = relu(W_k @ lerp(LN2(x)))^2              matvec, LN prologue, relu^2
    7. x            += W_v @ h                                 matvec, residual epilogue

It computes what ``Block.__call__`` computes for T = 1 (tests hold it to the
pure-MLX path); a block whose weights the kernels cannot take keeps that path.
"""

from __future__ import annotations

import mlx.core as mx

from . import fused_time_mix
from .matvec import Segment, matvec

LERP_R, LERP_W, LERP_K, LERP_V, LERP_A, LERP_G = range(6)
TANH, SIGMOID = 1, 2


class BlockPlan:
    """What a block's decode launches need that is not a parameter: built once per block."""

    def __init__(self, block):
        att = block.att
        self.has_v = hasattr(att, "v1")
        C = att.w0.shape[0]
        downs = [(att.w1, LERP_W), (att.a1, LERP_A)] + ([(att.v1, LERP_V)] if self.has_v else []) + [(att.g1, LERP_G)]
        self.down = [Segment(w, mode=m) for w, m in downs]
        ranks = [w.shape[0] for w, _ in downs]
        offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        ups = [(att.w2, TANH), (att.a2, 0)] + ([(att.v2, 0)] if self.has_v else []) + [(att.g2, SIGMOID)]
        self.up = [Segment(w, x_offset=o, mode=m) for (w, m), o in zip(ups, offsets)]
        biases = [att.w0, att.a0] + ([att.v0] if self.has_v else []) + [mx.zeros((C,))]
        self.up_bias = mx.concatenate(biases).astype(mx.float32)
        self.rkv = [Segment(att.receptance, mode=LERP_R), Segment(att.key, mode=LERP_K),
                    Segment(att.value, mode=LERP_V)]
        self.ffn_mix = block.ffn.x_k.reshape(1, -1)
        self.sources = [id(a) for a in (att.w0, att.w1, att.receptance.weight, block.ffn.key.weight)]
        self.supported = True  # cleared when a launch cannot take these weights
        mx.eval(self.up_bias)

    def current(self, block) -> bool:
        att = block.att
        return self.sources == [id(a) for a in (att.w0, att.w1, att.receptance.weight, block.ffn.key.weight)]


def _plan(block) -> BlockPlan:
    plan = getattr(block, "_decode_plan", None)
    if plan is None or not plan.current(block):
        plan = BlockPlan(block)
        object.__setattr__(block, "_decode_plan", plan)  # a cache, not a parameter
    return plan


def _split(a: mx.array, parts: int) -> list[mx.array]:
    """Equal column blocks of a [B, parts*C] result as [B, 1, C] arrays (free views when B = 1)."""
    B, n = a.shape
    c = n // parts
    return [a.reshape(B, parts, c)[:, i].reshape(B, 1, c) for i in range(parts)]


def block_step(block, x, att_shift, ffn_shift, wkv_state, v_first, backend: str):
    """(x, att_shift, ffn_shift, wkv_state, v_first) after one token, or None if unsupported."""
    plan = _plan(block)
    if not plan.supported:
        return None
    result = _launches(plan, block, x, att_shift, ffn_shift, wkv_state, v_first, backend)
    plan.supported = result is not None
    return result


def _launches(plan, block, x, att_shift, ffn_shift, wkv_state, v_first, backend):
    att, ffn = block.att, block.ffn
    B, _, C = x.shape
    x2 = x.reshape(B, C)
    ln_eps = block.ln1.eps

    out = matvec(x2, plan.rkv, prologue=1, prev=att_shift, ln=block.ln1, mix=att.x_lerp, eps=ln_eps, backend=backend)
    down = out and matvec(x2, plan.down, prologue=1, prev=att_shift, ln=block.ln1, mix=att.x_lerp, eps=ln_eps,
                          backend=backend)
    up = down and matvec(down[0], plan.up, bias=plan.up_bias, backend=backend)
    if up is None:
        return None
    (rkv, xn) = out
    r, k, v = _split(rkv, 3)
    if plan.has_v:
        w_raw, a_raw, v_raw, g = _split(up, 4)
    else:
        (w_raw, a_raw, g), v_raw = _split(up, 3), None
        v_first = v
    mixed = fused_time_mix(r, k, v, w_raw, a_raw, g, att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias,
                           wkv_state, att.head_size, v_first=v_first if plan.has_v else None, v_raw=v_raw)
    if mixed is None:
        return None
    y, wkv_state = mixed
    x2 = matvec(y.reshape(B, C), [Segment(att.output)], epilogue=2, residual=x2, backend=backend)
    hidden = x2 is not None and matvec(x2, [Segment(ffn.key)], prologue=1, epilogue=1, prev=ffn_shift, ln=block.ln2,
                                       mix=plan.ffn_mix, eps=block.ln2.eps, backend=backend)
    if not hidden:
        return None
    h, xf = hidden
    x2 = matvec(h, [Segment(ffn.value)], epilogue=2, residual=x2, backend=backend)
    if x2 is None:
        return None
    return x2.reshape(B, 1, C), xn, xf, wkv_state, v_first
