"""One decoded token through one RWKV-7 block in five kernel launches.

    1. r | k | v | LoRA down = W @ lerp(LN1(x))            matvec, 7 segments, LN prologue
    2. time mix               = LoRA up, WKV-7, value mix,   wkv7 kernel (reads 1 as written)
                                norm, bonus, gate
    3. x                     += W_o @ y                      matvec, residual epilogue
    4. h                      = relu(W_k @ lerp(LN2(x)))^2   matvec, LN prologue, relu^2
    5. x                     += W_v @ h                      matvec, residual epilogue

From ``matvec.uses_mma`` rows, and above the kernels' bound (MLX's products), the LoRA up-projections of
launch 2 are a plan of their own, four segments (a matvec launch on the matrix units, or MLX's products),
whose output the time-mix kernel reads as ``pre``: inside the time-mix kernel each (row, head) group reads its
head's up rows, so their cost grew with the rows (103 us a 16-row launch, 361 at 64, against 40-57 us for the
r/k/v launch; Q4_K_M on an H100, results/kernel_log.md step 16).

Fewer launches first made decode faster (seven a block gave 229 tok/s on Q4_K_M in a probe);
at five, a CUPTI profile showed the step GPU-bound, so the kernels' own time came next
(results/kernel_log.md, steps 5 and 6).
It computes what ``Block.__call__`` computes for T = 1 (tests hold it to the
pure-MLX path); a block whose weights the kernels cannot take keeps that path.
Everything constant is prepared once per block and batch size (``BlockPlan``); the model's
decode runtime (rwkv_mlx/model/runtime.py) holds the plans and drops them when weights change.
"""

from __future__ import annotations

import mlx.core as mx

from . import matvec, wkv7
from ..settings import env_int
from .dialect import build, launches, placeholder
from .layernorm_lerp import LayerNormLerpPlan
from .matvec import _DENSE_CODES, HalfCopies, MatvecPlan, Segment
from .products import ProductPlan

LERP_R, LERP_W, LERP_K, LERP_V, LERP_A, LERP_G = range(6)
# the activation of each LoRA's down output before its up-projection (w, a, v, g), as matvec.kern's PRO 0
# modes: 1 tanh, 0 as is, 2 sigmoid (the time-mix kernel applies the same ones with UP)
UP_MODES = (1, 0, 0, 2)
# Whether the parts of K of W_o and of the FFN value (matrix-unit launches', kernels/matvec.py k_parts) are added
# in the LayerNorm launch that reads their sum (layernorm_lerp.kern without WHOLE: the FFN key's, and the next
# block's r/k/v) rather than by matvec.add_parts in a launch of their own: two launches a block fewer for the host
# to queue, where at 16 rows on an H100 the host took 4.0 ms to queue a step and the GPU 4.5 ms to run it
# (results/kernel_log.md step 28). The same values either way (tests). On an H100, Q4_K_M at 64 rows: 8,606.5 tok/s
# against 8,449.8 apart (+1.9%, results/kernel_log.md step 29). None: $RWKV_MLX_PARTS_IN_PROLOGUE or 1.
PARTS_IN_PROLOGUE: int | None = None


def parts_in_prologue() -> bool:
    return bool(env_int("RWKV_MLX_PARTS_IN_PROLOGUE", 1, override=PARTS_IN_PROLOGUE))


# The fewest activation rows from which the FFN key's matrix-unit launch may split K into parts. Its relu² needs
# their sum, so with parts it waits for an elementwise launch of its own (add_parts: a Compiled primitive, two
# Slices and two Reshapes a block, each one more for the host to replay and queue), and at 16 rows the host sets
# the pace (results/kernel_log.md steps 28-29). Below it the key keeps its groups by shorter ones (the 2.9B key:
# MT 2 without parts instead of MT 4 in two, three under matvec.MMA_WAVE). On an H100, Q4_K_M at 16 rows: 3,904.6 and
# 3,811.5 tok/s in two processes against 3,653.4 with parts (results/kernel_log.md step 30); at 64 rows the key
# without parts (65) lost 4%: 8,267 against 8,622 (step 31, before the wave was the default).
# None: $RWKV_MLX_KEY_PARTS_FROM_ROWS or 32 (1: parts at every batch size).
KEY_PARTS_FROM_ROWS: int | None = None


def key_parts_from_rows() -> int:
    return env_int("RWKV_MLX_KEY_PARTS_FROM_ROWS", 32, minimum=1, override=KEY_PARTS_FROM_ROWS)


class BlockPlan:
    """The five launches of one block for one batch size (above ``matvec.max_batch(backend, dense)`` rows
    launches 1, 3, 4 and 5 are MLX's products, kernels/products.py). On the matrix units (from
    ``matvec.mma_min_rows()`` rows) and above the bound, the LoRA up-projections are a sixth, ``ups``: a
    matrix-unit launch, or MLX's products. ``halves``: the float16 copies its matrix-unit launches take of the
    LoRA matrices (matvec.HalfCopies; the decode runtime shares one between the plans of every batch size)."""

    def __init__(self, block, batch: int, backend: str, halves: HalfCopies | None = None):
        att, ffn = block.att, block.ffn
        C, N = att.w0.shape[0], att.head_size
        B = batch
        halves = halves if halves is not None else HalfCopies()  # (one cache for the plans below)
        self.mix_v = hasattr(att, "v1")
        self.C, self.N, self.H, self.B = C, N, C // N, B
        downs = [(att.w1, LERP_W), (att.a1, LERP_A), (att.v1 if self.mix_v else None, LERP_V), (att.g1, LERP_G)]
        ups = [att.w2, att.a2, att.v2 if self.mix_v else None, att.g2]
        segments = [Segment(att.receptance, mode=LERP_R), Segment(att.key, mode=LERP_K),
                    Segment(att.value, mode=LERP_V)] + [Segment(w, mode=m) for w, m in downs if w is not None]
        # Many rows: MLX's products instead of the matvec kernel (kernels/products.py), the time mix unchanged.
        # The bound is the block's: quantized if any of its matrices is, for each of its plans.
        dense = matvec.all_dense([att.receptance, att.key, att.value, att.output, ffn.key, ffn.value])
        products = not matvec.kernel_rows(B, backend, dense)

        def plan(segs, max_parts=None, **options):
            return (ProductPlan(segs, B, **options) if products else
                    MatvecPlan(segs, B, backend=backend, dense=dense, halves=halves, max_parts=max_parts, **options))

        self.proj = plan(segments, prologue=1, ln=block.ln1, mix=att.x_lerp)
        # On the matrix units W_o stages float16 rows: the time-mix launch writes them so (the rounding staging did)
        self.out = plan([Segment(att.output)], epilogue=2, out_shape=(B, 1, C), half_input=True)
        # On the matrix units the FFN value stages float16 rows (half the bytes): the key launch writes them so
        self.value = plan([Segment(ffn.value)], epilogue=2, out_shape=(B, 1, C), half_input=True)
        self.key = plan([Segment(ffn.key)], prologue=1, epilogue=1, ln=block.ln2, mix=ffn.x_k.reshape(1, -1),
                        out_dtype=self.value.x_dtype, max_parts=None if B >= key_parts_from_rows() else 1)
        self.ok = wkv7.supports(N, backend) and all(p.ok for p in (self.proj, self.out, self.key, self.value))
        # PARTS_IN_PROLOGUE: W_o's parts added by the FFN key's prologue launch, which normalizes their sum with the
        # residual and returns that sum too (the FFN value's residual); and the FFN value's parts handed to the next
        # block (``step``), whose r/k/v prologue launch adds them the same way (``ln1_pre``: for parts as many as
        # this block's value has, as a block before it of the same formats gives)
        def summing(launch, key, ln, mix):
            if not (self.ok and parts_in_prologue() and isinstance(launch, MatvecPlan) and launch.parts > 1
                    and launch.bias is None and launch.out_dtype == mx.float32 and key.pre is not None):
                return None
            pre = LayerNormLerpPlan(ln, mix, B, backend, xin_dtype=key.inner.x_dtype, parts=launch.parts)
            return pre if pre.ok else None

        self.ffn_pre = summing(self.out, self.key, block.ln2, ffn.x_k.reshape(1, -1))
        self.ln1_pre = summing(self.value, self.proj, block.ln1, att.x_lerp)

        # The time-mix kernel reads the LoRA down outputs where launch 1 wrote them (after r|k|v).
        info, column = [], 0
        for w in ups:
            rank = 0 if w is None else w.shape[1]
            info.append([rank, column, 0 if w is None else _DENSE_CODES[w.dtype]])
            column += rank
        zero = mx.zeros((C,))
        self.bias0 = mx.concatenate([att.w0, att.a0, att.v0 if self.mix_v else zero, zero]).astype(mx.float32)
        self.ups = None
        if self.ok and (matvec.uses_mma(B) or products):
            # Many rows (module docstring): the up-projections as a plan of their own, act(down) @ W_up + bias,
            # its rows w_raw | a_raw | [v_raw |] g (the time-mix kernel's pre; layer 0 has no v LoRA). Modes:
            # tanh, as is, sigmoid.
            present = [(w, i) for i, w in enumerate(ups) if w is not None]
            segs = [Segment(w, x_offset=3 * C + info[i][1], mode=UP_MODES[i]) for w, i in present]
            bias = mx.concatenate([self.bias0[i * C:(i + 1) * C] for _, i in present])
            self.ups = (ProductPlan(segs, B, bias=bias) if products else
                        MatvecPlan(segs, B, backend=backend, x_stride=self.proj.out_shapes[0][-1], bias=bias,
                                   dense=dense, halves=halves))
            if not self.ups.ok:  # (ranks that are not whole 32-element groups): the kernel's own up-projections
                self.ups = None
        self.wkv = build("wkv7", backend, ("ONE_TOKEN",))  # (a token a row: its vectors in shared memory)
        self.wkv_template = wkv7.template(self.wkv, self.H, N, up=self.ups is None, mix_v=self.mix_v,
                                          max_down=column if self.ups is None else 1, tokens=1)
        self.ok = self.ok and self.wkv_template is not None
        if not self.ok:
            return
        self.dummy = placeholder()
        if self.ups is None:
            self.lora = [mx.array(info, dtype=mx.int32)] + [
                placeholder(mx.uint8) if w is None else w.view(mx.uint8) for w in ups]
        else:  # (rank 0 everywhere: the kernel applies no LoRA)
            self.lora = [mx.zeros((4, 3), dtype=mx.int32)] + [placeholder(mx.uint8)] * 4
        self.channel = [att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias]
        mx.eval(self.dummy, self.bias0, *self.lora)
        signature = (tuple(self.wkv_template), tuple(str(a.dtype) for a in self.lora), str(self.out.x_dtype))
        self.ok = launches(self.wkv, signature, lambda: self._time_mix(
            mx.zeros((B, self.proj.out_shapes[0][-1])), mx.zeros((B, 1, C)), mx.zeros((B, self.H, N, N))))

    def _time_mix(self, proj, v_first, wkv_state):
        B, C, H, N = self.B, self.C, self.H, self.N
        pre = self.dummy if self.ups is None else self.ups(proj)
        y, wkv_state = self.wkv(
            inputs=[proj, pre, v_first if self.mix_v else self.dummy, *self.lora, self.bias0, *self.channel,
                    wkv_state],
            template=self.wkv_template,
            grid=(B * H * 4 * N, 1, 1),
            threadgroup=(4 * N, 1, 1),
            output_shapes=[(B, C), (B, H, N, N)],
            output_dtypes=[self.out.x_dtype, mx.float32],
        )
        return y, wkv_state

    def __call__(self, x, att_shift, ffn_shift, wkv_state, v_first):
        return self.step(x, att_shift, ffn_shift, wkv_state, v_first)[0]

    def step(self, x, att_shift, ffn_shift, wkv_state, v_first, parts_of_x=None):
        """(what ``Block.__call__`` returns, ``(raw, residual, parts)`` or None). ``parts_of_x``: the block
        before's FFN value parts that x (computed lazily by add_parts) sums, which this block's prologue
        launch adds itself where ``ln1_pre`` takes as many parts; x is then never computed unless something
        else reads it. The second item hands this block's own value parts on the same way
        (PARTS_IN_PROLOGUE)."""
        B, C = self.B, self.C
        if parts_of_x is not None and self.ln1_pre is not None and parts_of_x[2] == self.ln1_pre.parts:
            xn, xin, x = self.ln1_pre(parts_of_x[0], att_shift, residual=parts_of_x[1])
            proj = self.proj.inner(xin)
        else:
            proj, xn = self.proj(x, att_shift)
        if not self.mix_v:
            # made contiguous once: every later block's time-mix launch reads it, and MLX copied the strided
            # slice of many rows for each of them (31 copies of a 2.9B step in a CUPTI profile at 16 rows)
            v_first = mx.contiguous(proj[:, 2 * C : 3 * C]).reshape(B, 1, C)
        y, wkv_state = self._time_mix(proj, v_first, wkv_state)
        if self.ffn_pre is not None:
            xf, xin, x = self.ffn_pre(self.out.launch(y)[0], ffn_shift, residual=x)
            h = self.key.inner(xin)
        else:
            x = self.out(y, residual=x)
            h, xf = self.key(x, ffn_shift)
        if self.ln1_pre is None:
            return (self.value(h, residual=x), xn, xf, wkv_state, v_first), None
        raw = self.value.launch(h)[0]
        return (self.value.finish(raw, x), xn, xf, wkv_state, v_first), (raw, x, self.value.parts)
