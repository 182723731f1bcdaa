"""Launch plans respect each backend's limits, for the shapes people run (no GPU needed).

The plans are built for Metal and for CUDA on blocks of the 2.9B and 7.2B
shapes in every storage form, and their launches are caught by a launch hook
instead of running: every launch passes the backend's rules (threads per group,
shared memory counted from the kernel text, device address space for every
input a helper may receive), and no block falls back to the pure-MLX path.
The kernels' numbers are tested elsewhere: on a GPU (tests/test_kernels_gpu.py)
and, for the Metal texts, under the CPU emulation.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from rwkv_mlx.kernels import dialect, forced_backend
from rwkv_mlx.kernels.decode import BlockPlan
from rwkv_mlx.kernels import layernorm_lerp
from rwkv_mlx.errors import InvalidArgumentError
from rwkv_mlx.kernels.matvec import MatvecPlan, Segment
from dataclasses import replace

from rwkv_mlx.arch import MATRIX_MODULES
from rwkv_mlx.layers import WeightFormat
from rwkv_mlx.model.rwkv7 import Block
from rwkv_mlx.testing.synthetic import G1_7_2B, G1B_2_9B

SHAPES = {"2.9B": G1B_2_9B, "7.2B": G1_7_2B}
FORMATS = {
    "Q4_K_M": WeightFormat("ggml", ggml_type=12),  # Q4_K blocks, as a GPU loads a GGUF
    "Q8_0": WeightFormat("ggml", ggml_type=8),
    "Q4_K-affine": WeightFormat("affine", "float32", bits=4),  # as a GPU loads a converted directory
    "Q8_0-f16-scales": WeightFormat("affine", "float16", bits=8),
    "Q6_K": WeightFormat("ggml", ggml_type=14),
    "F16": WeightFormat("dense", "float16"),
}


def block(shape: str, fmt: WeightFormat, layer: int = 1) -> Block:
    args = replace(SHAPES[shape], vocab_size=256, n_layer=layer + 1)
    formats = {f"blocks.{layer}.{m}": fmt for m in MATRIX_MODULES}
    return Block(args, layer, formats, mx.float16)


class Recorder:
    """A launch hook: keeps each launch, returns zeros of the output shapes."""

    def __init__(self):
        self.launches: list[dialect.Launch] = []

    def __call__(self, launch: dialect.Launch):
        self.launches.append(launch)
        return [mx.zeros(s, dtype=d) for s, d in zip(launch.output_shapes, launch.output_dtypes)]


def planned(blk: Block, batch: int, backend: str = "cuda") -> BlockPlan:
    """The block's plan for ``batch`` rows on ``backend``, its launches caught by a Recorder."""
    with dialect.launch_hook(Recorder()), forced_backend(backend):
        return BlockPlan(blk, batch, backend)


@pytest.mark.parametrize("split", [0, 1])  # RWKV_MLX_SEPARATE_PROLOGUE
@pytest.mark.parametrize("backend", dialect.BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_plans_fit_the_backend(shape, fmt, backend, split, monkeypatch):
    monkeypatch.setattr(layernorm_lerp, "SEPARATE", split)
    blk = block(shape, FORMATS[fmt], layer=0 if fmt == "F16" else 1)  # layer 0: no value LoRA
    C = SHAPES[shape].n_embd
    rec = Recorder()
    with dialect.launch_hook(rec), forced_backend(backend):
        for batch in (1, 2, 4):
            plan = BlockPlan(blk, batch, backend)
            assert plan.ok, f"{shape} {fmt} B={batch}: a decode launch does not fit {backend}"
            z = mx.zeros((batch, 1, C))
            plan(z, z[:, 0], z[:, 0], mx.zeros((batch, C // 64, 64, 64)), z)
    # five launches a block, and two more where the LayerNorm prologues run as launches of their own
    assert len(rec.launches) == 3 * (5 + 2 * split)
    limits = dialect.LIMITS[backend]
    for launch in rec.launches:  # the hook saw them after Kernel.check; say so in numbers too
        assert launch.kernel.shared_bytes(launch.template) <= limits.shared_bytes
        assert launch.threadgroup[0] <= limits.threads
        if launch.kernel.name == "rwkv_wkv7":  # one token a row: no more staged (registers, occupancy)
            assert dict(launch.template)["TB"] == 1, launch.template


@pytest.mark.parametrize("fmt,batch", [("Q4_K_M", 64), ("Q8_0", 32), ("Q4_K-affine", 64), ("F16", 16), ("F16", 17),
                                       ("F16", 64)])
def test_default_bound_keeps_the_kernels(fmt, batch, monkeypatch):
    """The default bound (matvec.MAX_BATCH_DEFAULT): every block stays on the kernels at every batch size on both
    backends, up-projections included: for quantized matrices MLX's products would dequantize every matrix each
    step, and float matrices lost to them at 64 rows on CUDA too (kernel_log step 26). With the bound set, a block
    of float matrices hands its products to MLX above it."""
    from rwkv_mlx.kernels import matvec

    monkeypatch.delenv("RWKV_MLX_KERNEL_MAX_BATCH", raising=False)
    monkeypatch.setattr(matvec, "MAX_BATCH", None)
    blk = block("2.9B", FORMATS[fmt])
    for backend in ("cuda", "metal"):
        plan = planned(blk, batch, backend)
        assert plan.ok
        kinds = {type(p).__name__ for p in (plan.proj, plan.key, plan.value, plan.out, plan.ups)}
        assert kinds == {"MatvecPlan"}, (backend, kinds)
    monkeypatch.setenv("RWKV_MLX_KERNEL_MAX_BATCH", "16")
    plan = planned(blk, batch)
    kinds = {type(p).__name__ for p in (plan.proj, plan.key, plan.value, plan.out, plan.ups)}
    assert kinds == {"ProductPlan" if batch > 16 else "MatvecPlan"}, kinds


@pytest.mark.parametrize("batch,rpw", [(1, 4), (16, 4), (32, 2), (64, 1)])
def test_many_rows_take_fewer_rows_per_warp(batch, rpw, monkeypatch):
    """A lane's accumulators (rows per warp x activation rows) stay within MAX_ACCUMULATORS: the FFN key
    of the 2.9B shape (10,240 rows) takes 4 rows per warp up to 16 activation rows, then fewer (the float32
    loops, where the matrix units are turned off)."""
    from rwkv_mlx.kernels import matvec
    from rwkv_mlx.kernels.matvec import MAX_ACCUMULATORS

    monkeypatch.setattr(matvec, "MMA_MIN_ROWS", 0)

    blk = block("2.9B", FORMATS["Q4_K_M"])
    with dialect.launch_hook(Recorder()), forced_backend("metal"):
        plan = MatvecPlan([Segment(blk.ffn.key)], batch, backend="metal", prologue=1, epilogue=1, ln=blk.ln2,
                          mix=blk.ffn.x_k.reshape(1, -1))
    assert plan.ok and dict(plan.template)["RPW"] == rpw and rpw * batch <= max(MAX_ACCUMULATORS, batch)


def test_fewer_accumulators_give_fewer_rows_per_warp(monkeypatch):
    """$RWKV_MLX_MATVEC_ACCUMULATORS bounds rows per warp x activation rows (a setting to time, CUDA's
    16-row launches taking one group per SM at the default): 16 rows take 1 row a warp at 16, 4 at 64."""
    from rwkv_mlx.kernels import matvec

    monkeypatch.setattr(matvec, "MMA_MIN_ROWS", 0)
    blk = block("2.9B", FORMATS["Q4_K_M"])

    def rpw() -> int:
        with dialect.launch_hook(Recorder()), forced_backend("metal"):
            plan = MatvecPlan([Segment(blk.ffn.key)], 16, backend="metal", prologue=1, epilogue=1, ln=blk.ln2,
                              mix=blk.ffn.x_k.reshape(1, -1))
        return dict(plan.template)["RPW"]

    assert rpw() == 4
    monkeypatch.setenv("RWKV_MLX_MATVEC_ACCUMULATORS", "16")
    assert rpw() == 1
    monkeypatch.setenv("RWKV_MLX_MATVEC_ACCUMULATORS", "0")
    with pytest.raises(InvalidArgumentError, match="RWKV_MLX_MATVEC_ACCUMULATORS"):
        rpw()


def test_ffn_value_row_is_tiled_on_metal_only():
    """K = 10240 at one row needs 46,176 bytes staged whole: CUDA's 48 KB hold it, Metal's 32 KB don't."""
    blk = block("2.9B", FORMATS["Q4_K_M"])
    with dialect.launch_hook(Recorder()):
        kt = {b: dict(MatvecPlan([Segment(blk.ffn.value)], 1, backend=b, epilogue=2).template)["KT"]
              for b in dialect.BACKENDS}
    assert kt == {"cuda": 10240, "metal": 5120}


def test_small_input_in_a_device_slot_is_refused_on_metal():
    """MLX would pass a 1-element array as `constant`; a helper typed for device memory can't take it."""
    kernel = dialect.build("matvec", "metal", ("ONE_SEGMENT",))
    inputs = [mx.zeros((8,))] * len(kernel.rendered.inputs)
    inputs[kernel.rendered.inputs.index("s0")] = mx.zeros((1,))
    with pytest.raises(dialect.LaunchError, match="s0 has 1 elements"):
        kernel(inputs=inputs, template=[("NB", 1), ("RPW", 1), ("KT", 256), ("TILED", 0), ("PRO", 0), ("EPI", 0), ("BITS", 0),
                                        ("HAS_BIAS", 0)], grid=(32, 1, 1), threadgroup=(256, 1, 1),
               output_shapes=[(1, 8), (1,)], output_dtypes=[mx.float32] * 2)
    # eps is declared `//! constant:` (read by index only), so one element is fine there
    inputs[kernel.rendered.inputs.index("s0")] = mx.zeros((8,))
    inputs[kernel.rendered.inputs.index("eps")] = mx.zeros((1,))
    kernel.check(inputs, [("NB", 1), ("RPW", 1), ("KT", 256), ("TILED", 0), ("PRO", 0), ("EPI", 0), ("BITS", 0), ("HAS_BIAS", 0)],
                 (256, 1, 1))


def test_shared_bytes_are_read_from_the_kernel_text():
    """Stated by hand from matvec.kern: xs[NB * (KT + KT / 8)] floats plus red[3 * 8] floats."""
    t = [("NB", 1), ("RPW", 4), ("KT", 10240), ("PRO", 1), ("EPI", 0), ("BITS", 0), ("HAS_BIAS", 0)]
    assert dialect.shared_bytes("matvec", (), tuple(t)) == 4 * (10240 + 1280) + 4 * 24 == 46_176
    # wkv7: down_act[MAX_DOWN] + up_part[UP * 16 * N + 1] + stage[TB * 6 * SP] floats, SP = N interleaved (IL 1),
    # else N + 4
    t = [("H", 40), ("N", 64), ("UP", 1), ("MIX_V", 1), ("MAX_DOWN", 2048), ("TB", 16), ("IL", 1)]
    assert dialect.shared_bytes("wkv7", (), tuple(t)) == 4 * 2048 + 4 * 1025 + 4 * 16 * 6 * 64 == 36_868
    t[-1] = ("IL", 0)
    assert dialect.shared_bytes("wkv7", (), tuple(t)) == 4 * 2048 + 4 * 1025 + 4 * 16 * 6 * 68 == 38_404
    t[2] = ("UP", 0)  # (prefill: no up-projections, one float for up_part)
    assert dialect.shared_bytes("wkv7", (), tuple(t)) == 4 * 2048 + 4 + 4 * 16 * 6 * 68 == 34_308


def test_a_kernel_that_fails_to_build_leaves_its_layers_on_the_pure_path(caplog):
    """What a Mac user sees when a kernel does not compile: one warning line, the plan not taken."""
    kernel = dialect.build("matvec", "cuda")

    def broken():
        raise RuntimeError("error: use of undeclared identifier 'oops'\n  more compiler output")

    with caplog.at_level("WARNING", logger="rwkv_mlx"):
        assert dialect.launches(kernel, ("test-signature",), broken) is False
        assert dialect.launches(kernel, ("test-signature",), broken) is False  # once per signature
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "rwkv_matvec" in lines[0] and "rwkv-mlx doctor" in lines[0]
    assert "\n" not in lines[0] and "undeclared identifier" in lines[0]


@pytest.mark.parametrize("epilogue", [0, 1, 2])
@pytest.mark.parametrize("parts", [2, 4])
def test_parts_are_added_in_one_fused_kernel(parts, epilogue):
    """An MMA launch's parts of K, added with bias and epilogue (kernels/matvec.py add_parts): the same numbers
    as numpy's float64, and in a compiled step one elementwise kernel, no Gather."""
    import numpy as np

    from rwkv_mlx.bench.measure import count_primitives
    from rwkv_mlx.kernels.matvec import add_parts

    rng = np.random.default_rng(parts + 10 * epilogue)
    B, R = 16, 64
    raw = rng.standard_normal((parts * B, R)).astype(np.float32)
    bias = rng.standard_normal(R).astype(np.float32)
    res = rng.standard_normal((B, 1, R)).astype(np.float32)
    args = [mx.array(raw), mx.array(bias), mx.array(res)]
    mx.eval(*args)
    fn = mx.compile(lambda a, b, r: add_parts(a, parts, b, epilogue, r if epilogue == 2 else None, (B, 1, R),
                                              mx.float16))
    y = fn(*args)
    ops = count_primitives([y])
    kernels = {k: n for k, n in ops.items() if k not in ("Slice", "Reshape")}
    assert len(kernels) == 1 and next(iter(kernels)).startswith("Compiled") and sum(kernels.values()) == 1, ops
    want = raw.astype(np.float64).reshape(parts, B, R).sum(axis=0) + bias
    want = np.maximum(want, 0) ** 2 if epilogue == 1 else want
    want = want.reshape(B, 1, R) + (res if epilogue == 2 else 0)
    assert y.dtype == mx.float16 and y.shape == (B, 1, R)
    assert np.abs(np.array(y.astype(mx.float32)) - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q8_0", "F16"])
def test_key_takes_parts_from_its_rows(fmt, monkeypatch):
    """RWKV_MLX_KEY_PARTS_FROM_ROWS (default 32): below it the FFN key's matrix-unit launch takes no parts of K (its
    relu² then in its own epilogue, no sum to launch), and keeps the groups CUDA wants by shorter groups; from it,
    parts as every other launch; the other launches' parts never change."""
    from rwkv_mlx.kernels import decode, matvec

    blk = block("2.9B", FORMATS[fmt])

    def plans(batch):
        plan = planned(blk, batch)
        assert plan.ok
        return {k: getattr(plan, k).inner if k == "key" else getattr(plan, k) for k in ("key", "value", "out")}

    monkeypatch.setattr(decode, "KEY_PARTS_FROM_ROWS", 1)  # parts at every batch size
    everywhere = {b: plans(b) for b in (16, 32)}
    assert everywhere[16]["key"].parts == everywhere[32]["key"].parts == 3  # (160 groups of 64 rows: matvec.MMA_WAVE)
    monkeypatch.setattr(decode, "KEY_PARTS_FROM_ROWS", None)  # the default
    monkeypatch.delenv("RWKV_MLX_KEY_PARTS_FROM_ROWS", raising=False)
    for batch in (16, 32):
        after = plans(batch)
        key = after["key"]
        assert key.parts == (1 if batch < 32 else 3)
        assert key.grid[0] // key.threadgroup[0] >= matvec.mma_min_groups("cuda")
        assert key.epilogue == 1 and dict(key.template)["EPI"] == 1  # (relu² in the launch itself)
        assert [after[k].parts for k in ("value", "out")] == [everywhere[batch][k].parts for k in ("value", "out")]


def test_parts_fill_one_wave(monkeypatch):
    """RWKV_MLX_MMA_WAVE (528 on CUDA) at 64 rows of the 2.9B, by the rule stated at matvec.MMA_WAVE:
    each launch the most parts (any count, two tiles of K each at least) within one wave, and the MT that fills it
    most. The FFN key: 160 groups of 64 rows x 3 parts (480; MT 2's 320 groups take 1). The FFN value: 40 x 13
    (520; MT 2, 80 x 6 = 480). W_o: MT 4 has 16 tiles, so 40 x 8 = 320; MT 2, 80 x 6 = 480. The r/k/v launch
    (a 32-row LoRA segment: MT 2 at most): 258 x 2 = 516. The LoRA ups (one tile, no parts): MT 2's 320 groups,
    as MT 1's 640 exceed the wave. With 0: powers of two up to 4 parts for 256 groups, as before."""
    for name in ("RWKV_MLX_MMA_WAVE", "RWKV_MLX_MMA_K_PARTS", "RWKV_MLX_MMA_MIN_GROUPS"):
        monkeypatch.delenv(name, raising=False)
    blk = block("2.9B", FORMATS["Q4_K_M"])

    def plans(batch):
        plan = planned(blk, batch)
        assert plan.ok
        launches = {k: getattr(plan, k) for k in ("proj", "out", "value", "key", "ups")}
        launches = {k: p.inner if p.pre is not None else p for k, p in launches.items()}
        return {k: (dict(p.template)["MT"], p.grid[0] // p.threadgroup[0] // p.parts, p.parts)
                for k, p in launches.items()}

    assert plans(64) == {"key": (4, 160, 3), "value": (4, 40, 13), "out": (2, 80, 6), "proj": (2, 258, 2),
                         "ups": (2, 320, 1)}
    before = {"key": (4, 160, 2), "value": (2, 80, 4), "out": (2, 80, 4), "proj": (2, 258, 1), "ups": (2, 320, 1)}
    monkeypatch.setenv("RWKV_MLX_MMA_WAVE", "0")
    assert plans(64) == before
    monkeypatch.delenv("RWKV_MLX_MMA_WAVE")
    # 16 rows: the FFN key takes no parts there (RWKV_MLX_KEY_PARTS_FROM_ROWS), so MT 2's 320 groups; the FFN
    # value's 36 tiles of 288 in 13 parts would be 3 a part, which 12 parts give (none is left empty)
    assert plans(16) == {"key": (2, 320, 1), "value": (4, 40, 12), "out": (1, 160, 2), "proj": (2, 258, 2),
                         "ups": (2, 320, 1)}
