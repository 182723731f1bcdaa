"""The custom kernels against the pure-MLX path, on a GPU backend (CUDA here, Metal on Macs).

Every kernel must compute the function its reference computes, to 1e-5
relative (float32 throughout), on many shapes: sequence lengths 1 to 4096,
1 to 64 heads, batch > 1, state carried across calls, every weight format.
The whole model, decoding token by token through the fused kernels, must stay
within the oracle tolerances. Skipped where no GPU backend exists.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import (ORACLE, UP_RANK_IDS, UP_RANKS, half_rounded, layer_norm64, make_layer, oracle_logits, oracle_models,
                      oracle_tokens, parts_prologue_case, rounded_products, run_core, tiny_model_path,
                      up_projection_case, wkv_inputs)

import rwkv_mlx
from rwkv_mlx.kernels import fused_time_mix, kernel_backend, kernels_disabled
from rwkv_mlx.kernels.matvec import Segment, matvec
from rwkv_mlx.model.weights import LoadOptions
from rwkv_mlx.model.wkv import time_mix_core_reference

BACKEND = kernel_backend()
pytestmark = pytest.mark.gpu  # skipped where no GPU backend exists (conftest.py)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


WKV_SHAPES = [(1, 1, 40), (1, 2, 4), (3, 7, 2), (2, 64, 1), (1, 1000, 8), (1, 4096, 2), (2, 33, 64), (1, 1, 64)]


@pytest.mark.parametrize("B,T,H", WKV_SHAPES, ids=lambda v: str(v))
def test_wkv7_kernel_matches_reference(B, T, H):
    rng = np.random.default_rng(B * 1000 + T + H)
    seq, chan, state = wkv_inputs(rng, B, T, H)
    y, s = run_core(fused_time_mix, seq, chan, state)
    with kernels_disabled():
        y_ref, s_ref = run_core(time_mix_core_reference, seq, chan, state)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, (rel_err(y, y_ref), rel_err(s, s_ref))


@pytest.mark.parametrize("N", [32, 128])
def test_wkv7_kernel_other_head_sizes(N):
    """Head sizes other than RWKV-7's 64 change the group size and the shared-memory staging."""
    rng = np.random.default_rng(N)
    seq, chan, state = wkv_inputs(rng, 2, 37, 3, N)
    y, s = run_core(fused_time_mix, seq, chan, state, N)
    with kernels_disabled():
        y_ref, s_ref = run_core(time_mix_core_reference, seq, chan, state, N)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, (rel_err(y, y_ref), rel_err(s, s_ref))


def test_wkv7_kernel_state_carries_across_calls():
    rng = np.random.default_rng(7)
    seq, chan, state = wkv_inputs(rng, 2, 71, 4)
    pieces = [(0, 64), (64, 65), (65, 71)]
    s_k = s_r = state
    for a, b in pieces:
        part = {k: v[:, a:b] for k, v in seq.items()}
        y_k, s_k = run_core(fused_time_mix, part, chan, s_k)
        with kernels_disabled():
            y_r, s_r = run_core(time_mix_core_reference, part, chan, s_r)
        assert rel_err(y_k, y_r) < 1e-5
    assert rel_err(s_k, s_r) < 1e-5


@pytest.mark.parametrize("one_token", [True, False], ids=["one_token", "scratch"])
@pytest.mark.parametrize("ranks", UP_RANKS, ids=UP_RANK_IDS)
def test_wkv7_kernel_up_projections_and_value_mix(ranks, one_token):
    """Decode mode: the kernel computes the LoRA up-projections from the down outputs written after
    r|k|v (tanh for w, sigmoid for g, float32 and float16 matrices) and mixes v with v_first."""
    y, s, y_ref, s_ref = up_projection_case(ranks, BACKEND, one_token)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


# ---- matvec: every weight format, prologue and epilogue ------------------------------------

FORMATS = ["float32", "float16", "bfloat16", "affine-4-float32", "affine-4-float16", "affine-5-float32",
           "affine-8-float32", "affine-8-bfloat16", "q6_k", "q3_k", "q2_k",
           "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "iq4_xs"]


@pytest.mark.parametrize("kind", [f for f in FORMATS if not f.startswith(("float", "bfloat", "affine"))])
def test_dequant_kernel_expands_blocks_as_gguf_does(kind):
    """A prompt's products of blocks kept as stored: the dequant kernel against the gguf package, in float32
    and in float16 (CUDA's prompt products: the float32 value rounded to nearest)."""
    from rwkv_mlx.kernels.dequant import expand

    layer, w = make_layer(kind, 96, 512, np.random.default_rng(len(kind)))
    got = expand(layer.weight, layer.ggml_type, 512, BACKEND)
    assert got is not None
    np.testing.assert_allclose(np.array(got), w, rtol=1e-6, atol=1e-30)
    half = expand(layer.weight, layer.ggml_type, 512, BACKEND, mx.float16)
    assert half is not None and half.dtype == mx.float16
    np.testing.assert_array_equal(np.array(half), np.array(got).astype(np.float16))
    # and through the layer, as a prompt chunk takes it
    x = mx.array(np.random.default_rng(1).standard_normal((1, 24, 512)).astype(np.float32))
    assert rel_err(layer(x), np.array(x, np.float64) @ w.T) < 2e-3  # (CUDA: float16 products by default)


@pytest.mark.parametrize("kind", [f for f in FORMATS if f.startswith("affine")])
def test_dequant_kernel_expands_affine_codes(kind):
    """CUDA's products of many rows expand affine codes by the dequant kernel: float32 against MLX's own
    dequantize (float32 scales), float16 that value rounded once; and through the layer at 24 rows."""
    from rwkv_mlx.kernels.dequant import expand_affine

    layer, w = make_layer(kind, 96, 512, np.random.default_rng(len(kind) + 3))
    got = expand_affine(layer.weight, layer.scales, layer.biases, layer.bits, 32, BACKEND)
    assert got is not None
    np.testing.assert_allclose(np.array(got), w, rtol=1e-6, atol=1e-7)
    half = expand_affine(layer.weight, layer.scales, layer.biases, layer.bits, 32, BACKEND, mx.float16)
    assert half is not None and half.dtype == mx.float16
    np.testing.assert_array_equal(np.array(half), np.array(got).astype(np.float16))
    x = mx.array(np.random.default_rng(2).standard_normal((1, 24, 512)).astype(np.float32))
    assert rel_err(layer(x), np.array(x, np.float64) @ w.T) < 2e-3  # (CUDA: float16 products by default)


@pytest.fixture
def every_batch(monkeypatch):
    """The matvec kernel's float32 loops at every row count a backend may give them: Metal takes them at all
    of them, while CUDA's default bound (matvec.MAX_BATCH_DEFAULT) hands larger batches of float weights to
    MLX's products; and no matrix units (the MMA variant, tested below against its float16 operands)."""
    from rwkv_mlx.kernels import matvec as matvec_module

    monkeypatch.setattr(matvec_module, "MAX_BATCH", 0)
    monkeypatch.setattr(matvec_module, "MMA_MIN_ROWS", 0)


ACTS = [lambda t: t, np.tanh, lambda t: 1 / (1 + np.exp(-t))]  # segment modes 0, 1, 2 (matvec.kern PRO 0)
K_SEG = 512


def three_segments(kind: str, B: int):
    """Segments of 256, 512 and 256 rows in ``kind``, reading x [B, 3 K_SEG] as is, by tanh and by sigmoid, and a
    bias: (segments, x, bias, each segment's input by ACTS from x in dtype float32, each one's float64 weights)."""
    rng = np.random.default_rng(hash(kind) % 1000 + B)
    layers = [make_layer(kind, rows, K_SEG, rng) for rows in (256, 512, 256)]
    x = rng.standard_normal((B, 3 * K_SEG)).astype(np.float32)
    segs = [Segment(layer, x_offset=i * K_SEG, mode=i) for i, (layer, _) in enumerate(layers)]
    bias = rng.standard_normal(1024).astype(np.float32)
    return segs, x, bias, [x[:, i * K_SEG:(i + 1) * K_SEG] for i in range(3)], [w for _, w in layers]


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("B", [1, 2, 4, 16])  # 4 and 16: chunk_rows_many
def test_matvec_segments_match_numpy(kind, B, every_batch):
    segs, x, bias, parts, weights = three_segments(kind, B)
    y = matvec(mx.array(x), segs, bias=mx.array(bias), backend=BACKEND)
    want = np.concatenate([act(v.astype(np.float64)) @ w.T for act, v, w in zip(ACTS, parts, weights)], axis=1) + bias
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("separate", [0, 1])  # the prologue in every group, or a launch of its own
@pytest.mark.parametrize("kind", ["float16", "affine-4-float32", "q6_k", "q3_k", "q2_k", "q8_0", "q4_k", "iq4_xs"])
def test_matvec_layernorm_lerp_prologue_and_epilogues(kind, separate, monkeypatch):
    from rwkv_mlx.kernels import layernorm_lerp

    monkeypatch.setattr(layernorm_lerp, "SEPARATE", separate)
    rng = np.random.default_rng(5)
    C, F, B = 512, 1024, 2
    (layer, w) = make_layer(kind, F, C, rng)
    x, prev = (rng.standard_normal((B, C)).astype(np.float32) for _ in range(2))
    mix = rng.uniform(0, 1, (3, C)).astype(np.float32)
    ln = __import__("mlx.nn", fromlist=["LayerNorm"]).LayerNorm(C)
    ln.weight, ln.bias = mx.array(rng.uniform(0.5, 1.5, C).astype(np.float32)), mx.array(rng.standard_normal(C).astype(np.float32))
    y, xn = matvec(mx.array(x), [Segment(layer, mode=2)], prologue=1, epilogue=1, prev=mx.array(prev), ln=ln,
                   mix=mx.array(mix), eps=1e-5, backend=BACKEND)
    norm = layer_norm64(x, ln)
    want = np.maximum((norm + (prev - norm) * mix[2]) @ w.T, 0) ** 2
    assert rel_err(xn, norm) < 1e-5 and rel_err(y, want) < 1e-5
    res = rng.standard_normal((B, F)).astype(np.float32)
    (layer2, w2) = make_layer(kind, F, C, rng)
    y2 = matvec(mx.array(x), [Segment(layer2)], epilogue=2, residual=mx.array(res), backend=BACKEND)
    assert rel_err(y2, x.astype(np.float64) @ w2.T + res) < 1e-5


def long_row_case(kind: str, B: int, K: int, F: int, rng):
    """F rows of K in ``kind``, inputs x and prev [B, K], one lerp row and a LayerNorm of K: (layer, float64
    weights, x, prev, mix, ln)."""
    layer, w = make_layer(kind, F, K, rng)
    x, prev = (rng.standard_normal((B, K)).astype(np.float32) for _ in range(2))
    mix = rng.uniform(0, 1, (1, K)).astype(np.float32)
    ln = __import__("mlx.nn", fromlist=["LayerNorm"]).LayerNorm(K)
    ln.weight, ln.bias = mx.array(rng.uniform(0.5, 1.5, K).astype(np.float32)), mx.array(rng.standard_normal(K).astype(np.float32))
    return layer, w, x, prev, mix, ln


@pytest.mark.parametrize("kind", ["float16", "affine-4-float32", "affine-8-float16", "q6_k", "q3_k", "q8_0", "q4_k"])
@pytest.mark.parametrize("B", [2, 4, 16])
@pytest.mark.parametrize("separate", [0, 1])
def test_matvec_long_rows_walk_tiles(kind, B, separate, every_batch, monkeypatch):
    """Rows longer than the shared memory holds (the 2.9B FFN's K = 10240 at B >= 2 here, at B = 1 on
    Apple GPUs) are staged tile by tile, with the LayerNorm moments taken over the whole row first."""
    from rwkv_mlx.kernels import layernorm_lerp
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(layernorm_lerp, "SEPARATE", separate)
    rng, K, F = np.random.default_rng(B + len(kind)), 10240, 256
    layer, w, x, prev, mix, ln = long_row_case(kind, B, K, F, rng)
    plan = MatvecPlan([Segment(layer, mode=0)], B, backend=BACKEND, prologue=1, ln=ln, mix=mx.array(mix))
    assert plan.ok and dict(plan.template)["KT"] < K, plan.template
    y, xn = plan(mx.array(x), mx.array(prev))
    norm = layer_norm64(x, ln)
    assert rel_err(xn, norm) < 1e-5 and rel_err(y, (norm + (prev - norm) * mix[0]) @ w.T) < 1e-5
    res = rng.standard_normal((B, F)).astype(np.float32)
    y2 = matvec(mx.array(x), [Segment(layer)], epilogue=2, residual=mx.array(res), backend=BACKEND)
    assert rel_err(y2, x.astype(np.float64) @ w.T + res) < 1e-5


# ---- the matrix-unit variant (MMA): float16 operands, float32 accumulators ---------------------
# Its products must equal float64 math on the float16-rounded operands (the weights as decoded, the input
# after its prologue) to 1e-5: a fragment laid out wrongly, a tile offset or a missed tail gives errors of
# order one. Against the exact product the rounding costs about 3e-4 (asserted loosely, < 2e-3).


def chain_tolerance(k: int) -> float:
    """The bound for one float32 accumulator summing k products on the matrix units, n = k / 16 mma steps.
    Measured on an H100 (results/raw/2026-12-07-h100-b541c49-gpu-tests.log): one 10,240-long chain gave 1.23e-5
    of the result's norm in every case, and two chains of 5,120 stayed within 1e-5. For random-signed terms,
    rounding to nearest at each step leaves about 0.3 sqrt(n) 2^-24 (4.6e-7 here), truncation toward zero, as
    Fasi et al. (2021) found in earlier NVIDIA tensor cores, about 0.42 n 2^-24 (half an ulp, 0.72 2^-24 of a
    partial sum on average, times the partial sums' total, whose norm is n / sqrt(3) times the result's): 1.6e-5
    here. (Both constants also come out of a numpy simulation of 640 float32 steps.) The bound is n 2^-24,
    never below 1e-5: 3.8e-5 at k = 10240. A wrong tile or a missed tail gives errors of order one."""
    return max(1e-5, (k / 16) * 2.0**-24)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("B", [8, 16, 17, 64])
def test_matrix_units_match_rounded_operands(kind, B, matrix_units):
    from rwkv_mlx.kernels.matvec import MatvecPlan

    segs, x, bias, parts, weights = three_segments(kind, B)
    plan = MatvecPlan(segs, B, backend=BACKEND, bias=mx.array(bias), x_stride=x.shape[1])
    assert plan.ok and dict(plan.template)["MT"] > 0, plan.template
    y = np.array(plan(mx.array(x)))
    inputs = [act(v) for act, v in zip(ACTS, parts)]  # (float32, as the kernel computes them, then rounded)
    want = rounded_products(inputs, weights) + bias
    exact = np.concatenate([v.astype(np.float64) @ w.T for v, w in zip(inputs, weights)], axis=1) + bias
    assert rel_err(y, want) < 1e-5 and rel_err(y, exact) < 2e-3, (rel_err(y, want), rel_err(y, exact))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B", [16, 64])
def test_matrix_units_take_float16_copies_of_bare_arrays(dtype, B, matrix_units):
    """A bare float32 or bfloat16 array (the LoRA matrices) given to the matrix units as a float16 copy
    (matvec.HalfCopies, tiles copied): bit for bit the products of the same weights in a layer, which the tile
    rounds at every launch (as tests/test_metal_proof.py holds the Metal text to)."""
    from rwkv_mlx.kernels.matvec import HalfCopies, MatvecPlan

    rng = np.random.default_rng(B)
    layer, _ = make_layer(dtype, 128, 512, rng)
    x = mx.array(rng.standard_normal((B, 512)).astype(np.float32))
    in_tile = MatvecPlan([Segment(layer)], B, backend=BACKEND, x_stride=512)
    copied = MatvecPlan([Segment(layer.weight)], B, backend=BACKEND, x_stride=512, halves=HalfCopies())
    assert "HALF_TILES" in copied.kernel.defines and "HALF_TILES" not in in_tile.kernel.defines
    assert np.array_equal(np.array(copied(x)), np.array(in_tile(x)))


@pytest.mark.parametrize("P,B", [(4, 64), (2, 16), (13, 64)])  # (13: RWKV_MLX_MMA_WAVE=528's FFN value)
def test_prologue_adds_the_parts(P, B):
    """The LayerNorm launch that adds W_o's parts of K and the residual (RWKV_MLX_PARTS_IN_PROLOGUE): its sum, its
    normalized row and its float16 lerps bit for bit those of matvec.add_parts followed by the WHOLE launch."""
    got, want, *_ = parts_prologue_case(P, B, 2560, 1, BACKEND, seed=P + B)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_prologues_add_the_parts_in_the_compiled_step(tmp_path, matrix_units, monkeypatch):
    """RWKV_MLX_PARTS_IN_PROLOGUE=1 through model.step (the compiled graph), 64 rows of a 1024-wide model whose W_o
    and FFN value take 2 and 4 parts of K on CUDA: the parts added by the next prologue launch give the logits
    and state of add_parts, bit for bit, over three steps."""
    from rwkv_mlx.kernels import decode
    from rwkv_mlx.testing.synthetic import make_synthetic_model, synthetic_args

    B = 64
    path = tmp_path / "wide.gguf"
    make_synthetic_model(path, "Q4_K_M", synthetic_args(3, 1024, 2048, (32, 32, 32, 64), vocab=1024), seed=5)
    model = rwkv_mlx.load(path)[0]
    tokens = mx.array([(37 * b + 5) % 1024 for b in range(B)], dtype=mx.uint32)
    runs = {}
    for on in (0, 1):
        monkeypatch.setattr(decode, "PARTS_IN_PROLOGUE", on)
        model.runtime.invalidate()
        plan = model.runtime.block_plan(1, B)
        assert plan.ok and (plan.ln1_pre is not None) == bool(on), (plan.out.parts, plan.value.parts)
        state, token, seen = model.initial_state(B), tokens, []
        for _ in range(3):
            logits, state = model.step(token, state)
            token = mx.argmax(logits, axis=-1).astype(mx.uint32)
            seen += [np.array(logits)] + [np.array(a) for a in state.arrays()]
        runs[on] = seen
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))


@pytest.mark.parametrize("kind", ["float16", "q8_0", "q4_k"])
@pytest.mark.parametrize("B", [9, 16, 64])
def test_matrix_units_read_half_rows(kind, B, matrix_units):
    """Rows given as float16 (a split prologue's, the FFN key's), staged eight elements a load: the products of
    the float32 rows they were rounded from."""
    from rwkv_mlx.kernels.matvec import MatvecPlan

    segs, x, bias, parts, weights = three_segments(kind, B)
    segs = [Segment(s.weight, x_offset=s.x_offset) for s in segs]  # (float16 rows go to mode-0 segments)
    plan = MatvecPlan(segs, B, backend=BACKEND, bias=mx.array(bias), x_stride=x.shape[1], half_input=True)
    assert plan.ok and plan.x_dtype == mx.float16, plan.template
    y = np.array(plan(mx.array(x).astype(mx.float16)))
    want = rounded_products(parts, weights) + bias
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("kind", ["float16", "affine-4-float32", "affine-8-float16", "q6_k", "q8_0", "q4_k", "q5_k"])
@pytest.mark.parametrize("B", [16, 64])
def test_matrix_units_taller_groups(kind, B, matrix_units, monkeypatch):
    """Groups of 64 weight rows (MT 4), which launches of enough rows take: the same products."""
    from rwkv_mlx.kernels import matvec as matvec_module
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(matvec_module, "MMA_MIN_GROUPS", 1)
    monkeypatch.setattr(matvec_module, "MMA_WAVE", 0)  # (the powers-of-two rule, whose MIN_GROUPS this sets)
    segs, x, bias, parts, weights = three_segments(kind, B)
    plan = MatvecPlan(segs, B, backend=BACKEND, bias=mx.array(bias), x_stride=x.shape[1])
    assert plan.ok and dict(plan.template)["MT"] == 4, plan.template
    y = np.array(plan(mx.array(x)))
    inputs = [act(v) for act, v in zip(ACTS, parts)]
    want = rounded_products(inputs, weights) + bias
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("kind", ["float16", "affine-4-float32", "affine-8-float16", "q4_k"])
@pytest.mark.parametrize("dq", [2, 3])
def test_matrix_units_decode_groups_together(kind, dq, matrix_units, monkeypatch):
    """RWKV_MLX_MMA_DECODES: dq weight groups a thread decoded at once, the same products."""
    from rwkv_mlx.kernels import matvec as matvec_module
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(matvec_module, "MMA_MIN_GROUPS", 1)
    monkeypatch.setattr(matvec_module, "MMA_DECODES", dq)
    segs, x, bias, parts, weights = three_segments(kind, 16)
    plan = MatvecPlan(segs, 16, backend=BACKEND, bias=mx.array(bias), x_stride=x.shape[1])
    assert plan.ok and dict(plan.template)["DQ"] == dq, plan.template
    y = np.array(plan(mx.array(x)))
    want = rounded_products([act(v) for act, v in zip(ACTS, parts)], weights) + bias
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("kind,prefetch,rows_ahead", [
    ("affine-4-float32", True, False), ("affine-8-float16", True, False),  # the weights' LOAD_AHEAD
    ("float16", False, True), ("q4_k", False, True), ("q8_0", False, True),  # the rows' ROWS_AHEAD
    ("affine-4-float32", True, True)])  # both
@pytest.mark.parametrize("B", [16, 64])
@pytest.mark.parametrize("parts", [1, 2])
def test_matrix_units_next_tile_ahead(kind, prefetch, rows_ahead, B, parts, matrix_units, monkeypatch):
    """RWKV_MLX_MMA_PREFETCH (a thread's affine groups of the next tile of K) and RWKV_MLX_MMA_ROWS_AHEAD (its
    pieces of the next tile's float16 rows, which the FFN key writes for the FFN value) loaded while this one
    multiplies, over K = 10240 in tiles (the 2.9B FFN value), whole or in parts: the same products."""
    from rwkv_mlx.kernels import matvec as matvec_module
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(matvec_module, "MMA_PREFETCH", prefetch)
    monkeypatch.setattr(matvec_module, "MMA_ROWS_AHEAD", rows_ahead)
    monkeypatch.setattr(matvec_module, "MMA_MIN_GROUPS", 1 if parts == 1 else 10**6)
    monkeypatch.setattr(matvec_module, "MMA_K_PARTS", parts)
    monkeypatch.setattr(matvec_module, "MMA_WAVE", 0)  # (the powers-of-two rule, whose MIN_GROUPS this sets)
    rng = np.random.default_rng(B + parts)
    layer, w = make_layer(kind, 256, 10240, rng)
    x = rng.standard_normal((B, 10240)).astype(np.float32)
    plan = MatvecPlan([Segment(layer)], B, backend=BACKEND, half_input=rows_ahead)
    t, defines = dict(plan.template), plan.kernel.defines
    assert plan.ok and t["KT"] < 10240 and plan.parts == parts, plan.template
    assert ("LOAD_AHEAD" in defines) == prefetch and ("ROWS_AHEAD" in defines) == rows_ahead, defines
    y = np.array(plan(mx.array(x).astype(mx.float16 if rows_ahead else mx.float32)))
    assert rel_err(y, rounded_products([x], [w])) < chain_tolerance(10240 // parts)


@pytest.mark.parametrize("kind", ["float16", "affine-4-float32", "q6_k", "q8_0", "q4_k"])
@pytest.mark.parametrize("B", [16, 64])
def test_matrix_units_prologue_epilogues_and_tiles(kind, B, matrix_units):
    """LayerNorm + lerp in (a launch of its own: the MMA variant stages PRO 0 rows only), relu^2 and residual
    out, and the 2.9B FFN value's K = 10240 in tiles."""
    from rwkv_mlx.kernels.matvec import MatvecPlan

    rng, K, F = np.random.default_rng(B + len(kind)), 10240, 256
    layer, w, x, prev, mix, ln = long_row_case(kind, B, K, F, rng)
    plan = MatvecPlan([Segment(layer, mode=0)], B, backend=BACKEND, prologue=1, epilogue=1, ln=ln, mix=mx.array(mix))
    assert plan.ok and plan.pre is not None and dict(plan.template)["KT"] < K, plan.template
    y, xn = (np.array(a) for a in plan(mx.array(x), mx.array(prev)))
    assert rel_err(xn, layer_norm64(x, ln)) < 1e-5
    # The product's input is the kernel's own float32 LayerNorm, lerped in float32, then rounded: from the
    # float64 LayerNorm instead, float16's rounding flips on enough of the 10,240 x B elements to give
    # 2.4e-5 on an H100 (results/raw/2026-12-06-h100-ec52bbb-mma-gpu-tests.log). The lerp still rounds apart
    # (the prologue launch may fuse its multiply-add, numpy does not): 2.26e-5 at 64 rows on an H100
    # (results/raw/2026-12-06-h100-1b22bb0-gpu-tests.log). Float16 itself costs 3e-4, a wrong tile order one.
    lerped = xn + (prev - xn) * mix[0]
    assert rel_err(y, np.maximum(half_rounded(lerped) @ half_rounded(w).T, 0) ** 2) < 5e-5
    res = rng.standard_normal((B, F)).astype(np.float32)
    y2 = matvec(mx.array(x), [Segment(layer)], epilogue=2, residual=mx.array(res), backend=BACKEND)
    assert rel_err(y2, half_rounded(x) @ half_rounded(w).T + res) < 1e-5


# ---- the whole model, one token at a time through the fused decode kernels -------------------

MODELS = oracle_models() or ["<oracle missing>"]


def decode_rows(model, tokens: list[int], batch: int) -> np.ndarray:
    """Logits [batch, T, V] of ``tokens`` fed one at a time to ``batch`` identical rows."""
    state, rows = None, []
    for t in tokens:
        logits, state = model(mx.array([[t]] * batch), state)
        rows.append(np.array(logits[:, 0]))
    return np.stack(rows, axis=1)


@pytest.mark.parametrize("name", MODELS)
def test_fused_decode_matches_oracle(name):
    if name.startswith("<"):
        pytest.skip(f"oracle fixtures not found at {ORACLE}")
    exact = LoadOptions(float_dtype="float32", ggml_native=True)
    model, _ = rwkv_mlx.load(ORACLE / "models" / f"{name}.gguf", exact)
    tokens = oracle_tokens(name)
    ref = oracle_logits(name, "ref64")

    fused = decode_rows(model, tokens, 2)
    with kernels_disabled():
        plain = decode_rows(model, tokens, 1)
    assert np.abs(fused[0] - fused[1]).max() == 0
    assert np.abs(fused[0] - plain[0]).max() < 1e-4
    diff = fused[0] - ref
    assert np.abs(diff).max() < 1e-3 and np.sqrt((diff ** 2).mean()) < 1e-4
    assert (fused[0].argmax(-1) == ref.argmax(-1)).all()


def test_products_route_matches_pure_path(monkeypatch):
    """Above matvec.MAX_BATCH rows a decoded token's products are MLX's, the time mix the kernel's
    (kernels/products.py): the same logits as the pure path, row by row."""
    from rwkv_mlx.kernels import matvec

    model, _ = rwkv_mlx.load(tiny_model_path(), LoadOptions(float_dtype="float32", ggml_native=True))
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6][b:b + 4] for b in range(4)], dtype=mx.uint32)

    def decode() -> np.ndarray:
        state, rows = None, []
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t:t + 1], state)
            rows.append(np.array(logits[:, 0]))
        return np.stack(rows, axis=1)

    monkeypatch.setattr(matvec, "MAX_BATCH", 2)
    model.runtime.invalidate()
    routed = decode()
    assert model.runtime.block_plan(0, 4).ok and type(model.runtime.block_plan(0, 4).proj).__name__ == "ProductPlan"
    with kernels_disabled():
        plain = decode()
    assert rel_err(routed, plain) < 1e-5


@pytest.mark.parametrize("name", ["fixb-Q4_K_M", "fixb-Q8_0", "fixb-f16"])
def test_many_rows_on_matrix_units_match_pure_path(name, matrix_units):
    """16 rows of one prompt decoded through the MMA launches: every row equal, each within float16
    rounding of the pure path's logits (0.5% of their norm), the same greedy token at every step."""
    if name not in oracle_models():
        pytest.skip(f"oracle fixtures not found at {ORACLE}")
    model, _ = rwkv_mlx.load(ORACLE / "models" / f"{name}.gguf", LoadOptions(float_dtype="float32", ggml_native=True))
    tokens = oracle_tokens(name)

    model.runtime.invalidate()
    many = decode_rows(model, tokens, 16)
    plan = model.runtime.block_plan(1, 16)
    # the matrix units, float16 rows from the split prologue, the LoRA up-projections as a launch of their own
    assert "MMA" in plan.proj.inner.kernel.defines and plan.proj.inner.x_dtype == mx.float16
    assert plan.ups is not None and plan.value.x_dtype == mx.float16
    with kernels_disabled():
        plain = decode_rows(model, tokens, 1)
    assert np.abs(many - many[:1]).max() == 0
    assert rel_err(many[0], plain[0]) < 5e-3, rel_err(many[0], plain[0])
    assert (many[0].argmax(-1) == plain[0].argmax(-1)).mean() >= 0.9


def test_compiled_prompt_chunks_equal_op_by_op(monkeypatch):
    """prefill's full chunks through one compiled graph a block (the GPUs' default), on the GPU: the same logits and
    state as the same chunks built op by op, the WKV kernel and the weight expansion inside the graph."""
    from rwkv_mlx.text.generate import prefill

    model, _ = rwkv_mlx.load(tiny_model_path(), LoadOptions(float_dtype="float32", ggml_native=True))
    tokens = [int(t) for t in np.random.default_rng(5).integers(0, 256, 70)]

    def run(setting: str):
        monkeypatch.setenv("RWKV_MLX_COMPILED_PROMPT", setting)
        model.runtime.invalidate()
        logits, state = prefill(model, tokens, chunk_size=32)  # 32, 32 and 6 tokens
        return np.array(logits), [np.array(a) for a in state.arrays()]

    eager_logits, eager_state = run("0")
    logits, state = run("1")
    assert len(model.runtime._chunks) == model.args.n_layer
    assert rel_err(logits, eager_logits) < 1e-5
    for a, b in zip(state, eager_state):
        assert rel_err(a, b) < 1e-5
