"""Every GGUF block type the decode kernels read as stored, by the Metal text under the CPU emulation.

Blocks are random bytes (every bit pattern of codes, scales and high bits), with
their fp16 fields set to finite values; the gguf package dequantizes them (an
implementation independent of ours and of the kernel) and float64 numpy
multiplies. Each block type runs through the matvec kernel at B = 1 and 2, and
once with the LayerNorm + token-shift prologue (each case compiles the readers of
its own types: the KINDS template constant). The dequant kernel expands each block type,
and MLX's affine codes, for the products of many rows.
"""

from __future__ import annotations

import platform

import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from conftest import layer_norm64, lerp_inputs

from rwkv_mlx import quants
from rwkv_mlx.kernels.matvec import STORED_BLOCK_TYPES, MatvecPlan, Segment
from rwkv_mlx.layers import GGMLLinear, WeightFormat

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulator's context switch is x86-64 assembly")

# byte offsets of each block's fp16 fields (d, and dmin or m where present), from gguf-py's layouts
FP16_FIELDS = {8: (0,), 2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 20: (0,), 12: (0, 2), 13: (0, 2), 23: (0,),
               14: (208,), 11: (108,), 10: (80, 82)}
NEW_TYPES = [8, 2, 3, 6, 7, 20, 12, 13, 23]  # Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 IQ4_NL Q4_K Q5_K IQ4_XS


def random_blocks(ggml_type: int, rows: int, k: int, rng) -> np.ndarray:
    block = quants.BLOCK_TYPES[ggml_type]
    n = rows * k // block.block_elems
    raw = rng.integers(0, 256, (n, block.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[ggml_type]:
        d = (rng.uniform(0.5, 1.0, n) * rng.choice([-1, 1], n) / 64).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def block_layer(ggml_type: int, rows: int, k: int, rng) -> tuple[GGMLLinear, np.ndarray]:
    blocks = random_blocks(ggml_type, rows, k, rng)
    layer = GGMLLinear(k, rows, WeightFormat("ggml", ggml_type=ggml_type))
    layer.weight = mx.array(blocks)
    return layer, gguf_dequantize(blocks, ggml_type).astype(np.float64).reshape(rows, k)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp16_fields_cover_every_stored_type():
    assert set(FP16_FIELDS) == STORED_BLOCK_TYPES and set(NEW_TYPES) <= STORED_BLOCK_TYPES


@pytest.mark.parametrize("B", [1, 2, 4])  # 4: the loop that decodes each weight once for all rows (NB > 2)
def test_each_block_type_matches_gguf_dequantize(B):
    from rwkv_mlx.testing.metal_proof.emulate import Emulator

    rng = np.random.default_rng(18 + B)
    K, rows = 512, 64
    x = rng.standard_normal((B, K)).astype(np.float32)
    with Emulator().running():
        for t in NEW_TYPES:
            layer, w = block_layer(t, rows, K, rng)
            plan = MatvecPlan([Segment(layer)], B, backend="metal")
            assert plan.ok, quants.BLOCK_TYPES[t].name
            y = np.array(plan(mx.array(x)))
            err = rel_err(y, x.astype(np.float64) @ w.T)
            assert err < 1e-5, (quants.BLOCK_TYPES[t].name, err)


@pytest.mark.parametrize("B", [1, 4])
def test_q8_0_rows_of_odd_block_counts_take_the_group_reader(B):
    """Q8_0 rows of a multiple of 64 weights are read a pair of blocks a lane (q8_pair_rows); a row of an
    odd number of blocks is not 4-byte aligned and keeps the group reader, in the same launch."""
    from rwkv_mlx.testing.metal_proof.emulate import Emulator

    rng = np.random.default_rng(40 + B)
    (paired, w_paired), (odd, w_odd) = block_layer(8, 64, 512, rng), block_layer(8, 64, 480, rng)
    x = rng.standard_normal((B, 512 + 480)).astype(np.float32)
    with Emulator().running():
        plan = MatvecPlan([Segment(paired), Segment(odd, x_offset=512)], B, backend="metal", x_stride=992)
        assert plan.ok
        y = np.array(plan(mx.array(x)))
    want = np.concatenate([x[:, :512].astype(np.float64) @ w_paired.T, x[:, 512:].astype(np.float64) @ w_odd.T], 1)
    assert rel_err(y, want) < 1e-5


def test_block_types_with_layernorm_prologue_in_one_launch():
    """Eight block types as the eight segments of one launch (the r|k|v|LoRA launch's shape), after
    LayerNorm and the token-shift lerp, against float64 numpy."""
    from rwkv_mlx.testing.metal_proof.emulate import Emulator

    rng = np.random.default_rng(7)
    K, B = 256, 2
    types = [t for t in NEW_TYPES if t != 23][:8]  # eight slots; IQ4_XS shares IQ4_NL's levels
    layers = [block_layer(t, 32, K, rng) for t in types]
    x, prev, mix, ln = lerp_inputs(rng, B, K, len(types))
    with Emulator().running():
        plan = MatvecPlan([Segment(layer, mode=i) for i, (layer, _) in enumerate(layers)], B, backend="metal",
                          prologue=1, ln=ln, mix=mx.array(mix))
        assert plan.ok
        y, _ = (np.array(a) for a in plan(mx.array(x), mx.array(prev)))
    norm = layer_norm64(x, ln)
    want = np.concatenate([(norm + (prev - norm) * mix[i]) @ w.T for i, (_, w) in enumerate(layers)], axis=1)
    for i, t in enumerate(types):
        cols = slice(32 * i, 32 * (i + 1))
        assert rel_err(y[:, cols], want[:, cols]) < 1e-5, quants.BLOCK_TYPES[t].name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_block_type_expands_for_prompts(dtype):
    """The dequant kernel (a prompt's products of blocks kept as stored) by its Metal text: every block type
    the decode kernels read, against the gguf package's dequantization, to float32 rounding; in float16
    (what CUDA's prompt products take), exactly numpy's rounding of that to nearest."""
    from rwkv_mlx.kernels.dequant import expand
    from rwkv_mlx.testing.metal_proof.emulate import Emulator

    rng = np.random.default_rng(5)
    with Emulator().running():
        for t in sorted(STORED_BLOCK_TYPES):
            blocks = random_blocks(t, 3, 512, rng)
            got = expand(mx.array(blocks), t, 512, "metal", getattr(mx, dtype))
            want = gguf_dequantize(blocks, t).reshape(3, 512)
            name = quants.BLOCK_TYPES[t].name
            assert got is not None and got.dtype == getattr(mx, dtype), name
            if dtype == "float32":
                np.testing.assert_allclose(np.array(got), want, rtol=1e-6, atol=1e-30, err_msg=name)
            else:  # float16 of the float32 expansion (every block type decodes to float32 exactly)
                np.testing.assert_array_equal(np.array(got), want.astype(np.float32).astype(np.float16), err_msg=name)


def affine_codes64(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine layout in numpy: each row's uint32 words are a little-endian bit stream of ``bits``-bit
    codes, 32 to a group of one scale and one offset; weight = scale * code + offset, in float64."""
    rows = words.shape[0]
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=1, bitorder="little")
    codes = stream.reshape(rows, -1, bits) @ (1 << np.arange(bits))
    s = np.repeat(scales.astype(np.float64), 32, axis=1)
    return s * codes + np.repeat(biases.astype(np.float64), 32, axis=1)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_affine_codes_expand_for_many_rows(scale_dtype):
    """The dequant kernel's affine variant (CUDA's products of many rows: layers.AffineLinear) by its Metal
    text: every code width, against the layout's math in numpy, float32 to rounding; float16 rounded once,
    to nearest, from that float32 value."""
    from rwkv_mlx.kernels.dequant import expand_affine
    from rwkv_mlx.testing.metal_proof.emulate import Emulator

    rng = np.random.default_rng(11)
    rows, k = 3, 256
    with Emulator().running():
        for bits in (2, 3, 4, 5, 6, 8):
            words = rng.integers(0, 2**32, (rows, k * bits // 32), dtype=np.uint32)
            scales = mx.array(rng.uniform(-0.1, 0.1, (rows, k // 32)).astype(np.float32)).astype(getattr(mx, scale_dtype))
            biases = mx.array(rng.uniform(-0.5, 0.5, (rows, k // 32)).astype(np.float32)).astype(getattr(mx, scale_dtype))
            want = affine_codes64(words, np.array(scales.astype(mx.float32)), np.array(biases.astype(mx.float32)), bits)
            got = expand_affine(mx.array(words), scales, biases, bits, 32, "metal", mx.float32)
            assert got is not None and got.dtype == mx.float32
            np.testing.assert_allclose(np.array(got), want, rtol=1e-6, atol=1e-7, err_msg=f"{bits} bits")
            half = expand_affine(mx.array(words), scales, biases, bits, 32, "metal", mx.float16)
            assert half is not None and half.dtype == mx.float16
            np.testing.assert_array_equal(np.array(half), np.array(got).astype(np.float16), err_msg=f"{bits} bits")



def test_embedding_rows_expand_in_one_launch():
    """A stored embedding's lookup (one row a decoded token) expands the gathered blocks by one dequant launch,
    as the gguf package dequantizes those rows. MLX's operations took 57 primitives for a Q4_K row (225 a
    decoded token in all for a 2.9B Q4_K_M file, against 176 in the affine form: kernel_log step 21)."""
    from rwkv_mlx.bench.measure import count_primitives
    from rwkv_mlx.testing.metal_proof.emulate import Emulator

    rng = np.random.default_rng(9)
    ids = mx.array([[5, 0, 6], [2, 5, 5]], dtype=mx.uint32)
    for t in sorted(STORED_BLOCK_TYPES):
        layer, want = block_layer(t, 7, 512, rng)
        name = quants.BLOCK_TYPES[t].name
        emu = Emulator()
        with emu.running():
            out = layer.rows(ids)
            ops = count_primitives([out])
            got = np.array(out)
        assert sum(ops.values()) <= 4, (name, dict(ops))
        assert [b.inst.kernel.name for b in emu.built.values()] == [f"rwkv_dequant_no_scales_read_{name.lower()}"]
        assert got.shape == (2, 3, 512) and got.dtype == np.float32, name
        np.testing.assert_allclose(got, want[np.array(ids)], rtol=1e-6, atol=1e-30, err_msg=name)
