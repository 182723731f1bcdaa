"""Shared test fixtures and helpers: the oracle, tiny synthetic models, a torch.save writer.

Tests take fixtures from here (pytest injects them) and import helpers from here, never
from each other.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # full float32 matmuls on GPUs, before MLX starts

import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from reference_rwkv7 import ReferenceRWKV7

import rwkv_mlx
from rwkv_mlx import quants
from rwkv_mlx.layers import AffineLinear, GGMLLinear, Linear, WeightFormat
from rwkv_mlx.arch import LAYER0_COPIES, ModelArgs, gguf_tensor_shapes
from rwkv_mlx.formats.gguf_writer import write_rwkv7_gguf
from rwkv_mlx.kernels import kernels_disabled
from rwkv_mlx.model.weights import LoadOptions
from rwkv_mlx.model.wkv import time_mix_core_reference
from rwkv_mlx.testing.synthetic import make_synthetic_model, synthetic_args

REPO = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("RWKV_MLX_ORACLE", REPO.parent / "shared" / "oracle"))
ORACLE_MISSING = f"oracle fixtures not found at {ORACLE} (set RWKV_MLX_ORACLE)"


def oracle_models() -> list[str]:
    """Names like 'fixa-Q4_K_M' for every oracle GGUF file (empty when absent)."""
    models = ORACLE / "models"
    return sorted(p.stem for p in models.glob("*.gguf")) if models.is_dir() else []


def oracle_tokens(name: str) -> list[int]:
    family = name.split("-", 1)[0]
    text = (ORACLE / "logits" / f"{family}.tokens.txt").read_text()
    return [int(t) for t in text.replace("\n", ",").split(",") if t.strip()]


def oracle_logits(name: str, kind: str) -> np.ndarray:
    return np.load(ORACLE / "logits" / f"{name}.{kind}.npy")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need an MLX GPU backend (CUDA or Metal): skipped where there is none."""
    from rwkv_mlx.kernels import kernel_backend

    if kernel_backend() is not None:
        return
    skip = pytest.mark.skip(reason="no MLX GPU backend (CUDA or Metal): the gpu tests need one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def require_oracle():
    if not (ORACLE / "models").is_dir():
        pytest.skip(ORACLE_MISSING)
    return ORACLE


TINY_SHAPE = dict(n_embd=128, ffn=256, ranks=(8, 8, 8, 8))
TINY_VOCAB = 4096
TEXT = "System: You answer in one line.\n\nUser: What is the capital of France?\n\nAssistant:"

# --------------------------------------------------------------------------------------
# tiny models (2 heads of 64, so per-head layouts matter), shared by the state, generation,
# chat and notebook tests; each is written once per session


@functools.lru_cache(maxsize=None)
def _model_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rwkv-mlx-tiny-"))


@pytest.fixture(scope="session", autouse=True)
def _remove_tiny_models():
    """The tiny models go with the session that wrote them: CI runners keep /tmp between runs."""
    yield
    if _model_dir.cache_info().currsize:
        shutil.rmtree(_model_dir(), ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_model_path(seed: int = 1, n_layer: int = 2) -> Path:
    """A float32 RWKV-7 GGUF with seeded random weights (written once per test session)."""
    path = _model_dir() / f"tiny-L{n_layer}-seed{seed}.gguf"
    shape = synthetic_args(n_layer, TINY_SHAPE["n_embd"], TINY_SHAPE["ffn"], TINY_SHAPE["ranks"], vocab=TINY_VOCAB)
    make_synthetic_model(path, "F32", shape, seed=seed)
    return path


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 1, n_layer: int = 2):
    return rwkv_mlx.load(tiny_model_path(seed, n_layer), LoadOptions.for_backend("cpu"))


@functools.lru_cache(maxsize=None)
def reference(seed: int = 1, n_layer: int = 2) -> ReferenceRWKV7:
    return ReferenceRWKV7(tiny_model_path(seed, n_layer))


def split_at_turn(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of text up to and including its last "\\n\\n", and of the rest."""
    cut = text.rindex("\n\n") + 2
    prefix, rest = tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])
    assert prefix + rest == tokenizer.encode(text), "the split must not change tokenization"
    return prefix, rest


def to_np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def write_torch_zip(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A ``torch.save`` file (zip format, pickle protocol 2) of float32 tensors, without torch.

    The pickle is written opcode by opcode: {name: torch._utils._rebuild_tensor_v2(
    storage, offset, size, stride, requires_grad, OrderedDict())} with each storage a
    persistent id ("storage", torch.FloatStorage, key, "cpu", numel) whose bytes live in
    ``archive/data/<key>`` -- the layout torch.save has written since 1.6.
    """

    def text(s: str) -> bytes:
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE

    def ints(values) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"  # MARK BININT... TUPLE

    ordered_dict = b"ccollections\nOrderedDict\n)R"  # GLOBAL, EMPTY_TUPLE, REDUCE
    body = b"\x80\x02" + ordered_dict + b"("  # PROTO 2, the dict, MARK
    storages = {}
    for key, (name, array) in enumerate(tensors.items()):
        a = np.ascontiguousarray(array, dtype=np.float32)
        storages[str(key)] = a.tobytes()
        strides = [s // 4 for s in a.strides]
        persistent = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text(str(key)) + text("cpu") + \
            b"J" + struct.pack("<i", a.size) + b"tQ"  # TUPLE, BINPERSID
        body += text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + persistent + b"J\0\0\0\0" + \
            ints(a.shape) + ints(strides) + b"\x89" + ordered_dict + b"tR"  # NEWFALSE, TUPLE, REDUCE
    body += b"u."  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", body)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


# --------------------------------------------------------------------------------------
# tiny GGUF files in two file types, shared by the convert, mlx-lm and pth/hf tests

TINY_GGUF = ModelArgs(vocab_size=512, n_embd=256, n_layer=2, head_size=64, ffn_dim=512, decay_rank=32, iclr_rank=32,
                      value_rank=16, gate_rank=32, norm_eps=1e-5)
TINY_GGUF_TYPES = ("F16", "Q4_K_M")  # dense; affine Q4_K with a Q6_K head (ggml)
TINY_TOKENS = [11, 33, 100, 261, 5, 77, 300, 45, 46, 47, 120, 121, 9, 400, 401, 402]


def tiny_weights(seed: int = 7) -> dict[str, np.ndarray]:
    """Random RWKV-7 weights scaled like the oracle's (activations O(1), every part of the block matters)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in gguf_tensor_shapes(TINY_GGUF).items():
        if "lerp" in name:
            w = rng.uniform(0, 1, shape)
        elif name.endswith("time_mix_w0.weight"):
            w = rng.uniform(-6, 1.5, shape)
        elif name.endswith(("norm.weight", "norm_2.weight", "time_mix_ln.weight")):
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = rng.uniform(0.5, 1.2, shape) if "k_" in name else 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1]) * (3 if name == "output.weight" else 1)
        out[name] = w.astype(np.float32)
    for copy, original in LAYER0_COPIES.items():  # as llama.cpp writes layer 0
        out[f"blk.0.{copy}"] = out[f"blk.0.{original}"]
    return out


@pytest.fixture(scope="session")
def tiny_gguf_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gguf")
    weights = tiny_weights()
    files = {}
    for file_type in TINY_GGUF_TYPES:
        files[file_type] = root / f"tiny-{file_type}.gguf"
        write_rwkv7_gguf(files[file_type], TINY_GGUF, weights, file_type)
    return files


# ---- weight layers of every storage form, with the float64 weights they stand for -------------

def make_layer(kind: str, rows: int, k: int, rng):
    """(layer, float64 weights it represents) for a storage format; weights dequantized independently."""
    w = rng.standard_normal((rows, k)).astype(np.float32) / np.sqrt(k)
    if kind in ("float32", "float16", "bfloat16"):
        arr = mx.array(w).astype(getattr(mx, kind))
        layer = Linear(k, rows, WeightFormat("dense", kind))
        layer.weight = arr
        return layer, np.array(arr.astype(mx.float32), np.float64)
    if kind.startswith("affine"):
        bits, scale_dtype = int(kind.split("-")[1]), kind.split("-")[2]
        q, s, b = mx.quantize(mx.array(w), group_size=32, bits=bits)
        layer = AffineLinear(k, rows, WeightFormat("affine", scale_dtype, bits=bits))
        layer.weight, layer.scales, layer.biases = q, s.astype(getattr(mx, scale_dtype)), b.astype(getattr(mx, scale_dtype))
        deq = mx.dequantize(q, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32), group_size=32, bits=bits)
        return layer, np.array(deq, np.float64)
    ggml_type, encode = GGML_ENCODERS[kind]
    blocks = encode(w)
    layer = GGMLLinear(k, rows, WeightFormat("ggml", ggml_type=ggml_type))
    layer.weight = mx.array(blocks)
    # the gguf package decodes the blocks: an implementation independent of ours and of the kernel
    return layer, gguf_dequantize(blocks, ggml_type).astype(np.float64).reshape(rows, k)


@pytest.fixture
def matrix_units(monkeypatch):
    """Decode launches on the matrix units (matvec.kern's MMA variant) from 8 activation rows, whatever the
    environment or a backend's bound on the kernels' rows says (tests/test_kernels_gpu.py, test_metal_proof.py)."""
    from rwkv_mlx.kernels import matvec

    monkeypatch.setattr(matvec, "MAX_BATCH", 0)
    monkeypatch.setattr(matvec, "MMA_MIN_ROWS", 8)


def half_rounded(a) -> np.ndarray:
    """a rounded to float16 (from float32, to nearest), as float64: the operands of the matrix-unit kernels,
    whose products the tests hold to float64 math on these rounded values."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)


def rounded_products(inputs, weights) -> np.ndarray:
    """Each segment's input times its weights, side by side, in float64 on the float16-rounded operands: what the
    matrix-unit kernels must compute (to float32 summation's error)."""
    return np.concatenate([half_rounded(v) @ half_rounded(w).T for v, w in zip(inputs, weights)], axis=1)


def lerp_inputs(rng, B: int, K: int, mixes: int):
    """x, prev [B, K], mix [mixes, K] and a LayerNorm of K, drawn from rng in that order."""
    import mlx.nn as nn

    x, prev = (rng.standard_normal((B, K)).astype(np.float32) for _ in range(2))
    mix = rng.uniform(0, 1, (mixes, K)).astype(np.float32)
    ln = nn.LayerNorm(K)
    ln.weight = mx.array(rng.uniform(0.5, 1.5, K).astype(np.float32))
    ln.bias = mx.array(rng.standard_normal(K).astype(np.float32))
    return x, prev, mix, ln


def parts_prologue_case(P: int, B: int, K: int, M: int, backend: str, seed: int):
    """The LayerNorm launch that adds a matvec launch's P parts of K and their residual first (layernorm_lerp.kern
    without WHOLE), beside the WHOLE launch on matvec.add_parts' sum of the same, on ``backend``, float16 lerps:
    (got, want, raw, residual, ln), got and want each (xn, xin, xsum) as numpy."""
    from rwkv_mlx.kernels.layernorm_lerp import LayerNormLerpPlan
    from rwkv_mlx.kernels.matvec import add_parts

    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((P * B, K)).astype(np.float32)
    res = rng.standard_normal((B, K)).astype(np.float32)
    _, prev, mix, ln = lerp_inputs(rng, B, K, M)
    whole = LayerNormLerpPlan(ln, mx.array(mix), B, backend, xin_dtype=mx.float16)
    summed = LayerNormLerpPlan(ln, mx.array(mix), B, backend, xin_dtype=mx.float16, parts=P)
    assert whole.ok and summed.ok
    x = add_parts(mx.array(raw), P, None, 2, mx.array(res), (B, K), mx.float32)
    want = [np.array(a) for a in (*whole(x, mx.array(prev)), x)]
    got = [np.array(a) for a in summed(mx.array(raw), mx.array(prev), residual=mx.array(res))]
    assert got[2].shape == (B, 1, K)  # (xsum: shaped as a block's x)
    got[2] = got[2].reshape(B, K)
    return got, want, raw, res, ln


def layer_norm64(x: np.ndarray, ln) -> np.ndarray:
    """LayerNorm of float32 rows in float64 numpy (eps 1e-5), the reference for the kernels' prologue."""
    xd = x.astype(np.float64)
    norm = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5)
    return norm * np.array(ln.weight) + np.array(ln.bias)


GGML_ENCODERS = {"q6_k": (14, quants.quantize_q6_k), "q3_k": (11, quants.quantize_q3_k),
                 "q2_k": (10, quants.quantize_q2_k), "q8_0": (8, quants.quantize_q8_0),
                 "q4_0": (2, quants.quantize_q4_0), "q4_1": (3, quants.quantize_q4_1),
                 "q5_0": (6, quants.quantize_q5_0), "q5_1": (7, quants.quantize_q5_1),
                 "iq4_nl": (20, quants.quantize_iq4_nl), "q4_k": (12, quants.quantize_q4_k),
                 "q5_k": (13, quants.quantize_q5_k), "iq4_xs": (23, quants.quantize_iq4_xs)}


# ---- the time-mix kernel (custom_kernels/wkv7.kern), for the GPU tests and the Metal emulation ----

def wkv_inputs(rng, B, T, H, N=64):
    C = H * N
    f = lambda *s, scale=1.0: mx.array((rng.standard_normal(s) * scale).astype(np.float32))
    u = lambda lo, hi, *s: mx.array(rng.uniform(lo, hi, s).astype(np.float32))
    seq = dict(r=f(B, T, C), k=f(B, T, C), v=f(B, T, C), w_raw=u(-6, 2, B, T, C), a_raw=f(B, T, C),
               g=f(B, T, C))
    chan = dict(k_k=u(0.5, 1.5, C), k_a=u(0, 1, C), r_k=f(C, scale=0.5), ln_w=u(0.5, 1.5, C), ln_b=f(C, scale=0.1))
    return seq, chan, f(B, H, N, N, scale=0.5)


def run_core(fn, seq, chan, state, N=64, **kw):
    return fn(seq["r"], seq["k"], seq["v"], seq["w_raw"], seq["a_raw"], seq["g"], chan["k_k"], chan["k_a"],
              chan["r_k"], chan["ln_w"], chan["ln_b"], state, N, **kw)


# Ranks whose rows are whole 16-byte loads (multiples of 4 float32 or 8 float16/bfloat16 weights),
# and ranks whose rows are not (the a and g rows below), which the kernel reads a weight at a time.
UP_RANKS = [{"w": 32, "a": 32, "v": 16, "g": 64}, {"w": 20, "a": 36, "v": 24, "g": 68},
            {"w": 96, "a": 96, "v": 64, "g": 320}]  # (the 2.9B's: 84 pieces a column, a LoRA's split over threads)
UP_RANK_IDS = ["rows-of-16-bytes", "odd-rows", "ranks-2.9B"]


def up_projection_case(ranks: dict, backend: str, one_token: bool = True):
    """The time-mix kernel in decode mode (UP 1) computing the LoRA up-projections from the down outputs written
    after r|k|v (tanh for w, sigmoid for g; float32, float16 and bfloat16 matrices) and mixing v with v_first, on
    ``backend``, beside the pure reference on the same inputs: (y, state, y_ref, state_ref). ``one_token``: the
    ONE_TOKEN variant decode launches (each token's vectors in shared memory), else the prompts' text (scratch in
    device memory)."""
    from rwkv_mlx.kernels import wkv7
    from rwkv_mlx.kernels.dialect import build, placeholder

    rng = np.random.default_rng(11)
    B, H, N = 2, 4, 64
    C = H * N
    seq, chan, state = wkv_inputs(rng, B, 1, H)
    dtypes = {"w": mx.float32, "a": mx.float16, "v": mx.float16, "g": mx.bfloat16}
    down = {n: mx.array(rng.standard_normal((B, 1, r)).astype(np.float32)) for n, r in ranks.items()}
    up = {n: mx.array((rng.standard_normal((C, r)) / np.sqrt(r)).astype(np.float32)).astype(dtypes[n])
          for n, r in ranks.items()}
    bias = {n: mx.array(rng.standard_normal(C).astype(np.float32)) for n in ("w", "a", "v")}
    v_first = mx.array(rng.standard_normal((B, 1, C)).astype(np.float32))
    proj = mx.concatenate([seq["r"], seq["k"], seq["v"], *down.values()], axis=-1).reshape(B, -1)
    codes = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
    info, col = [], 0
    for n, r in ranks.items():
        info.append([r, col, codes[dtypes[n]]])
        col += r
    bias0 = mx.concatenate([bias["w"], bias["a"], bias["v"], mx.zeros((C,))])
    kernel = build("wkv7", backend, ("ONE_TOKEN",) if one_token else ())
    outputs = 2 if one_token else 3
    y, s = kernel(
        inputs=[proj, placeholder(), v_first.reshape(B, C), mx.array(info, dtype=mx.int32),
                *(up[n].view(mx.uint8) for n in ranks), bias0, chan["k_k"], chan["k_a"], chan["r_k"], chan["ln_w"],
                chan["ln_b"], state],
        template=wkv7.template(kernel, H, N, up=True, mix_v=True, max_down=col), grid=(B * H * 4 * N, 1, 1),
        threadgroup=(4 * N, 1, 1), output_shapes=[(B, C), (B, H, N, N), (B * H * 10 * N,)][:outputs],
        output_dtypes=[mx.float32] * outputs)[:2]
    mm = lambda x, w: x @ w.astype(mx.float32).T
    w_raw = bias["w"] + mm(mx.tanh(down["w"]), up["w"])
    a_raw = bias["a"] + mm(down["a"], up["a"])
    v_mix = mx.sigmoid(bias["v"] + mm(down["v"], up["v"]))
    g = mm(mx.sigmoid(down["g"]), up["g"])
    ref_in = dict(seq, w_raw=w_raw, a_raw=a_raw, g=g, v=seq["v"] + (v_first - seq["v"]) * v_mix)
    with kernels_disabled():
        y_ref, s_ref = run_core(time_mix_core_reference, ref_in, chan, state)
    return y, s, y_ref.reshape(B, C), s_ref
