"""GGML block formats: decoders (numpy and MLX), exact MLX affine forms, encoders.

The independent oracle is ``gguf.quants.dequantize`` (the llama.cpp gguf-py package); the
random-block tests need nothing else, the file tests read real llama.cpp output from the
oracle directory and skip when it is absent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from rwkv_mlx import quants as Q
from rwkv_mlx.errors import InvalidArgumentError

ORACLE = Path(os.environ.get("RWKV_MLX_ORACLE", Path(__file__).resolve().parents[1].parent / "shared" / "oracle"))
ORACLE_MISSING = f"oracle GGUF files not found under {ORACLE / 'models'} (set RWKV_MLX_ORACLE)"

QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
ALL_TYPES = [T.F32, T.F16, T.BF16, *QUANT_TYPES]
EXACT_AFFINE = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q4_K: 4, T.Q5_K: 5, T.IQ4_NL: 8, T.IQ4_XS: 8}
OWN_ENCODERS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
DELEGATED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16]

# byte offsets of the fp16 fields inside one block (d, dmin, m)
FP16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0],
}

# relative RMS error bound on N(0,1) weights (64 x 2048, seed 7); measured values in comments
ERROR_BOUND = {
    T.Q6_K: 0.0187,  # measured 0.0173
    T.Q5_K: 0.0390,  # 0.0362
    T.Q4_K: 0.0775,  # 0.0718
    T.Q3_K: 0.156,  # 0.1444
    T.Q2_K: 0.293,  # 0.2714
    T.IQ4_NL: 0.0815,  # 0.0754
    T.IQ4_XS: 0.082,  # 0.0760
}


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_blocks(qtype: T, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random raw blocks whose fp16 fields are finite (no NaN/inf), as uint8 (rows, n_blocks*bytes)."""
    rng = np.random.default_rng(seed)
    bt = Q.BLOCK_TYPES[qtype]
    if qtype == T.F32:
        return rng.standard_normal((rows, n_blocks)).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return (rng.standard_normal((rows, n_blocks)) * 100).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        v = rng.integers(0, 1 << 16, (rows, n_blocks), dtype=np.uint16)
        v = np.where((v & 0x7F80) == 0x7F80, v & 0xBFFF, v)  # exponent all ones -> not inf/nan
        return v.view(np.uint8)
    raw = rng.integers(0, 256, (rows, n_blocks, bt.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal((rows, n_blocks)) * np.exp2(rng.integers(-12, 4, (rows, n_blocks)))).astype(np.float16)
        raw[:, :, off : off + 2] = scale.view(np.uint8).reshape(rows, n_blocks, 2)
    return raw.reshape(rows, -1)


# --------------------------------------------------------------------------------------
# the table


def test_block_table_matches_ggml_sizes():
    assert sorted(Q.BLOCK_TYPES) == sorted(int(t) for t in ALL_TYPES)
    for t in ALL_TYPES:
        bt = Q.BLOCK_TYPES[t]
        assert bt.name == t.name and bt.ggml_type == int(t)
        assert (bt.block_elems, bt.block_bytes) == gguf.GGML_QUANT_SIZES[t]
        assert bt.quantize is not None
        assert (bt.to_affine is not None) == (t in EXACT_AFFINE)
        low = t.name.lower()
        assert bt.dequantize.__name__ == f"dequantize_{low}"
        assert bt.quantize.__name__ == f"quantize_{low}"
        if bt.to_affine is not None:
            assert bt.to_affine.__name__ == f"affine_from_{low}"


def test_unknown_type_is_a_clean_error():
    with pytest.raises(InvalidArgumentError, match="IQ2_XXS"):
        Q.dequantize(np.zeros((1, 66), np.uint8), T.IQ2_XXS)
    with pytest.raises(InvalidArgumentError, match="multiple of the block size"):
        Q.dequantize(np.zeros((1, 143), np.uint8), T.Q4_K)


# --------------------------------------------------------------------------------------
# decoders against gguf-py


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_numpy_and_mlx(qtype):
    raw = random_blocks(qtype, rows=6, n_blocks=5 if Q.BLOCK_TYPES[qtype].block_elems > 1 else 64, seed=int(qtype))
    ref = gguf.quants.dequantize(raw, qtype)
    got = Q.dequantize(raw, qtype)
    assert got.dtype == np.float32
    assert bits_equal(got, ref)
    got_mx = Q.dequantize(mx.array(raw), qtype, xp=mx)
    assert got_mx.dtype == mx.float32
    assert bits_equal(np.array(got_mx), ref)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.IQ4_XS, T.Q8_0], ids=lambda t: t.name)
def test_dequantize_keeps_leading_axes_and_single_rows(qtype):
    raw = random_blocks(qtype, rows=6, n_blocks=2, seed=3)
    ref = gguf.quants.dequantize(raw, qtype)
    cube = raw.reshape(2, 3, -1)
    assert bits_equal(Q.dequantize(cube, qtype), ref.reshape(2, 3, -1))
    assert bits_equal(np.array(Q.dequantize(mx.array(cube), qtype, xp=mx)), ref.reshape(2, 3, -1))
    # an embedding-style row lookup on the MLX side
    rows = mx.take(mx.array(raw), mx.array([4, 1]), axis=0)
    assert bits_equal(np.array(Q.dequantize(rows, qtype, xp=mx)), ref[[4, 1]])


def test_dequantize_accepts_float_views_of_f32_f16():
    w = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert bits_equal(Q.dequantize(w, T.F32), w)
    assert bits_equal(Q.dequantize(w.astype(np.float16), T.F16), w.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------------------
# exact MLX affine forms


def check_affine_exact(raw: np.ndarray, qtype: T, x_rows: int = 3):
    ref = gguf.quants.dequantize(raw, qtype)
    aw = Q.to_affine(raw, qtype)
    assert aw.bits == EXACT_AFFINE[qtype] and aw.group_size == 32
    rows, cols = ref.shape
    assert aw.codes.shape == (rows, cols) and aw.codes.dtype == np.uint8
    assert aw.codes.max() < (1 << aw.bits)
    assert aw.scales.shape == aw.biases.shape == (rows, cols // 32)
    assert aw.scales.dtype == aw.biases.dtype == np.float32
    # unpacked form is exact (value equality: only the sign of some zeros can differ)
    unpacked = aw.codes.reshape(rows, -1, 32) * aw.scales[..., None] + aw.biases[..., None]
    assert np.array_equal(unpacked.reshape(rows, cols), ref)
    packed = Q.pack_affine_codes(aw.codes, aw.bits)
    assert packed.dtype == np.uint32 and packed.shape == (rows, cols * aw.bits // 32)
    wq, s, b = mx.array(packed), mx.array(aw.scales), mx.array(aw.biases)
    deq = np.array(mx.dequantize(wq, s, b, group_size=32, bits=aw.bits))
    assert deq.dtype == np.float32
    assert np.array_equal(deq, ref)
    x = np.random.default_rng(1).standard_normal((x_rows, cols)).astype(np.float32)
    y = np.array(mx.quantized_matmul(mx.array(x), wq, s, b, transpose=True, group_size=32, bits=aw.bits))
    y_ref = x.astype(np.float64) @ ref.astype(np.float64).T
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())


@pytest.mark.parametrize("qtype", list(EXACT_AFFINE), ids=lambda t: t.name)
def test_affine_form_is_exact_on_random_blocks(qtype):
    n_blocks = 8 if Q.BLOCK_TYPES[qtype].block_elems == 32 else 2
    check_affine_exact(random_blocks(qtype, rows=5, n_blocks=n_blocks, seed=11 + int(qtype)), qtype)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K, T.Q2_K, T.F16, T.F32, T.BF16], ids=lambda t: t.name)
def test_no_affine_form_for_sixteen_element_subblocks(qtype):
    raw = random_blocks(qtype, rows=2, n_blocks=1 if qtype in (T.Q6_K, T.Q3_K, T.Q2_K) else 32, seed=0)
    assert Q.to_affine(raw, qtype) is None


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_affine_codes_is_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 128), dtype=np.uint8)
    packed = Q.pack_affine_codes(codes, bits)
    assert packed.shape == (3, 128 * bits // 32) and packed.dtype == np.uint32
    ones, zeros = mx.ones((3, 4), dtype=mx.float32), mx.zeros((3, 4), dtype=mx.float32)
    back = np.array(mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits))
    assert np.array_equal(back, codes.astype(np.float32))


def test_pack_affine_codes_rejects_bad_shapes():
    with pytest.raises(InvalidArgumentError):
        Q.pack_affine_codes(np.zeros((1, 32), np.uint8), 7)
    with pytest.raises(InvalidArgumentError):
        Q.pack_affine_codes(np.zeros((1, 12), np.uint8), 5)


# --------------------------------------------------------------------------------------
# encoders


@pytest.fixture(scope="module")
def gaussian():
    return np.random.default_rng(7).standard_normal((64, 2048)).astype(np.float32)


def rel_rms(a: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - w) ** 2) / np.mean(w.astype(np.float64) ** 2)))


@pytest.mark.parametrize("qtype", OWN_ENCODERS, ids=lambda t: t.name)
def test_own_encoder_layout_and_error(qtype, gaussian):
    bt = Q.BLOCK_TYPES[qtype]
    raw = Q.quantize(gaussian, qtype)
    assert raw.dtype == np.uint8
    assert raw.shape == (64, 2048 // bt.block_elems * bt.block_bytes)
    ref = gguf.quants.dequantize(raw, qtype)  # our bytes decoded by gguf-py ...
    assert bits_equal(Q.dequantize(raw, qtype), ref)  # ... equal our decoder exactly
    assert rel_rms(ref, gaussian) < ERROR_BOUND[qtype]
    # scale invariance: tiny and large weights quantize just as well (fp16 scales stay in range)
    for k in (1e-3, 300.0):
        deq = gguf.quants.dequantize(Q.quantize(gaussian[:8] * np.float32(k), qtype), qtype)
        assert rel_rms(deq, gaussian[:8] * k) < ERROR_BOUND[qtype] * 1.1


@pytest.mark.parametrize("qtype", OWN_ENCODERS, ids=lambda t: t.name)
def test_own_encoder_edge_rows(qtype):
    w = np.zeros((5, 512), np.float32)
    w[1] = 1.5  # constant positive
    w[2] = -0.25  # constant negative
    w[3, ::37] = 4.0  # sparse outliers
    w[4] = np.linspace(-3, 1, 512)
    deq = gguf.quants.dequantize(Q.quantize(w, qtype), qtype)
    assert np.isfinite(deq).all()
    assert np.array_equal(deq[0], np.zeros(512, np.float32))
    err = np.abs(deq - w).max(axis=1)
    assert err[1] < 0.02 * 1.5 and err[2] < 0.02 * 0.25 or qtype in (T.Q2_K, T.Q3_K)
    assert err[4] < 4.0 * ERROR_BOUND[qtype] * 3
    assert np.allclose(Q.dequantize(Q.quantize(w, qtype), qtype), deq)


def test_own_encoder_leading_axes_and_errors():
    w = np.random.default_rng(0).standard_normal((2, 3, 256)).astype(np.float32)
    raw = Q.quantize(w, T.Q4_K)
    assert raw.shape == (2, 3, 144)
    assert bits_equal(Q.dequantize(raw, T.Q4_K).reshape(6, 256), gguf.quants.dequantize(raw.reshape(6, 144), T.Q4_K))
    with pytest.raises(InvalidArgumentError, match="multiple of the block size 256"):
        Q.quantize(np.zeros((2, 128), np.float32), T.Q4_K)
    bad = np.zeros((1, 256), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        Q.quantize(bad, T.Q6_K)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        Q.quantize(bad, T.Q8_0)


@pytest.mark.parametrize("qtype", DELEGATED, ids=lambda t: t.name)
def test_delegated_encoders_are_gguf_py(qtype, gaussian):
    raw = Q.quantize(gaussian, qtype)
    assert raw.dtype == np.uint8
    assert np.array_equal(raw, gguf.quants.quantize(gaussian, qtype))


def test_float_encoders():
    w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(Q.quantize(w, T.F32).view(np.float32), w)
    assert np.array_equal(Q.quantize(w, T.F16).view(np.float16), w.astype(np.float16))
    assert bits_equal(Q.dequantize(Q.quantize(w, T.BF16), T.BF16), gguf.quants.dequantize(gguf.quants.quantize(w, T.BF16), T.BF16))


def test_encoders_make_exact_affine_weights(gaussian):
    """The chain used for synthetic models: our encoder -> GGUF bytes -> exact MLX form."""
    for qtype in (T.Q4_K, T.Q5_K, T.IQ4_XS):
        check_affine_exact(Q.quantize(gaussian[:16], qtype), qtype)


# --------------------------------------------------------------------------------------
# real llama.cpp files


def oracle_files() -> list[Path]:
    d = ORACLE / "models"
    return sorted(p for p in d.glob("*.gguf") if not re.search(r"-f(16|32)\.gguf$", p.name)) if d.is_dir() else []


@pytest.mark.parametrize("path", oracle_files() or [None], ids=lambda p: p.stem if p else "absent")
def test_dequantize_oracle_file_tensors(path):
    if path is None:
        pytest.skip(ORACLE_MISSING)
    reader = gguf.GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        qtype = T(t.tensor_type)
        if qtype == T.F32:
            continue
        raw = np.asarray(t.data)
        ref = gguf.quants.dequantize(raw, qtype)
        assert bits_equal(Q.dequantize(raw, qtype), ref), t.name
        if qtype in seen:  # the MLX path and the affine form once per type and file
            continue
        seen.add(qtype)
        raw8 = raw.view(np.uint8)
        assert bits_equal(np.array(Q.dequantize(mx.array(raw8), qtype, xp=mx)), ref), t.name
        if qtype in EXACT_AFFINE:
            check_affine_exact(raw8, qtype)
    assert seen, "no quantized tensors found"


@pytest.mark.parametrize("ftype", ["Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_own_encoders_as_good_as_llama_cpp(ftype):
    """On the oracle's weights, our encoders' RMS error is within 2% of llama-quantize's (or better)."""
    src, qfile = ORACLE / "models" / "fixa-f16.gguf", ORACLE / "models" / f"fixa-{ftype}.gguf"
    if not (src.is_file() and qfile.is_file()):
        pytest.skip(ORACLE_MISSING)
    base = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(src).tensors}
    sums: dict[T, np.ndarray] = {}
    for t in gguf.GGUFReader(qfile).tensors:
        qtype = T(t.tensor_type)
        if qtype not in OWN_ENCODERS:
            continue
        w = base[t.name].astype(np.float32).reshape(len(t.data), -1)
        theirs = gguf.quants.dequantize(np.asarray(t.data), qtype)
        ours = gguf.quants.dequantize(Q.quantize(w, qtype), qtype)
        acc = sums.setdefault(qtype, np.zeros(3))
        acc += [((theirs - w) ** 2).sum(), ((ours - w) ** 2).sum(), (w**2).sum()]
    assert sums
    for qtype, (theirs, ours, norm) in sums.items():
        assert np.sqrt(ours / norm) <= 1.02 * np.sqrt(theirs / norm), qtype.name


@pytest.mark.parametrize("rows,expand", [(1, "float16"), (70, "float32"), (70, "float16")])
def test_affine_layer_prompt_rows_take_the_dequantized_gemm_on_cuda(monkeypatch, rows, expand):
    """On CUDA a prompt chunk multiplies by the expanded weights: exact in float32; in float16 (the
    default) within the rounding of both operands and of the result to 2^-11, which bounds the error by
    2^-10 (|x| @ |W|^T) + 2^-10 |y|. One row takes the quantized product, exact."""
    from rwkv_mlx import layers

    monkeypatch.setattr(layers, "CUDA_EXPAND_DTYPE", expand)

    raw = random_blocks(T.Q4_K, rows=6, n_blocks=2, seed=5)
    aw = Q.to_affine(raw, T.Q4_K)
    layer = layers.AffineLinear(aw.codes.shape[1], 6, layers.WeightFormat("affine", "float32", bits=aw.bits))
    layer.weight = mx.array(Q.pack_affine_codes(aw.codes, aw.bits))
    layer.scales, layer.biases = mx.array(aw.scales), mx.array(aw.biases)
    x = mx.array(np.random.default_rng(2).standard_normal((1, rows, aw.codes.shape[1])).astype(np.float32))
    y_ref = np.array(x, dtype=np.float64) @ gguf.quants.dequantize(raw, T.Q4_K).astype(np.float64).T
    calls = []
    real_dequantize = mx.dequantize
    monkeypatch.setattr(layers.mx, "dequantize", lambda *a, **k: calls.append(1) or real_dequantize(*a, **k))
    monkeypatch.setattr(layers, "active_backend", lambda: "cuda")
    y = np.array(layer(x))
    expanded = rows >= layers.cuda_dequant_min_rows()
    assert bool(calls) == expanded
    if expanded and expand == "float16":
        w_abs = np.abs(gguf.quants.dequantize(raw, T.Q4_K).astype(np.float64))
        bound = 2.0**-10 * (np.abs(np.array(x, dtype=np.float64)) @ w_abs.T + np.abs(y_ref))
        assert (np.abs(y - y_ref) <= bound).all() and np.abs(y - y_ref).max() > 0  # rounded, within the bound
    else:
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
