"""The Metal kernels, proven on a machine without an Apple GPU (issue 13; README "What was proven
for Apple GPUs, and how").

1. Record: every distinct Metal kernel instantiation the models launch (every oracle file; prefill
   at B = 1, 2 and decode at B = 1, 2, 4, and 16 and 64 for the matrix-unit variant; float16 and bfloat16 affine scales; blocks of the 2.9B
   and 7.2B shapes in Q4_K_M, Q8_0 and F16; a 65536-row head).
2. Compile: MLX's own generator writes each instantiation's Metal source, and the clang of the
   ziglang wheel compiles it against include/metal_stdlib, which keeps Metal's address spaces
   distinct and threadgroup memory at kernel scope; the compiled code itself sums the threadgroup
   memory against Apple's 32 KB; every launch has at most 1024 threads.
3. Emulate: the same texts run on the CPU (a fiber per Metal thread, barriers, 32-lane SIMD
   operations) as the model's launches, against the pure-MLX path and the oracle's exact logits.
Negative controls show that each step can fail.
"""

from __future__ import annotations

import platform

import mlx.core as mx
import numpy as np
import pytest

from conftest import (ORACLE, ORACLE_MISSING, UP_RANK_IDS, UP_RANKS, half_rounded, layer_norm64, lerp_inputs,
                      make_layer, oracle_logits, oracle_models, oracle_tokens, parts_prologue_case, rounded_products,
                      up_projection_case)

import rwkv_mlx
from rwkv_mlx.bench.measure import count_primitives
from rwkv_mlx.kernels import decode, dialect, kernels_disabled, layernorm_lerp
from rwkv_mlx.kernels.dialect import Kernel, Launch, parse_kern, render
from rwkv_mlx.testing.metal_proof import Recorder, record_launches
from rwkv_mlx.testing.metal_proof.compile import APPLE_THREADS_PER_GROUP, check, check_all, prepare
from rwkv_mlx.testing.metal_proof.emulate import Emulator
from rwkv_mlx.testing.metal_proof.record import Instantiation
from rwkv_mlx.testing.metal_proof.render import metal_sources
from rwkv_mlx.testing.metal_proof.shapes import Q6_K, shaped_model
from rwkv_mlx.layers import WeightFormat
from rwkv_mlx.model.weights import LoadOptions

from rwkv_mlx.testing import synthetic as synth  # the 2.9B and 7.2B shape presets

needs_emulator = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                    reason="the emulator's context switch is x86-64 assembly")
EXACT = LoadOptions(float_dtype="float32", ggml_native=True)  # as tests/test_kernels_gpu.py loads
SCALE_FILES = ["fixa-Q4_K_M", "fixa-Q8_0", "fixb-Q5_K_M"]  # affine matrices: scale dtype matters
SHAPES = {"2.9B": synth.G1B_2_9B, "7.2B": synth.G1_7_2B}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def load(name: str, options: LoadOptions):
    return rwkv_mlx.load(ORACLE / "models" / f"{name}.gguf", options)[0]


# ---- 1 + 2: every instantiation, compiled under Metal's rules ---------------------------------

@pytest.fixture(scope="module")
def recorded() -> Recorder:
    rec = Recorder()
    for name in oracle_models():
        record_launches(load(name, LoadOptions.for_backend("metal")), name, rec)
    for name in SCALE_FILES if oracle_models() else []:
        # affine codes beside Q6_K blocks: the GPUs' affine form (RWKV_MLX_GPU_BLOCKS=affine)
        for scale in ("float32", "float16", "bfloat16"):
            model = load(name, LoadOptions.for_backend("metal", scale_dtype=scale, keep_blocks=False))
            record_launches(model, f"{name} scales {scale}", rec)
    for label, hp in SHAPES.items():
        for file_type in ("Q4_K_M", "Q8_0", "F16"):
            # 16 and 64 rows: the matrix-unit variant (kernels/matvec.py MMA_MIN_ROWS)
            record_launches(shaped_model(hp, file_type), f"{label} {file_type}", rec, decode_batches=(1, 2, 4, 16, 64))
    for scale in ("float32", "float16", "bfloat16"):
        record_launches(shaped_model(synth.G1B_2_9B, "Q4_K_M", scale_dtype=scale), f"2.9B Q4_K_M scales {scale}", rec,
                        decode_batches=(1, 2, 4, 16))
    # affine codes and GGUF blocks in one launch (a file whose v is Q6_K among Q4_K r and k): the matvec
    # text with both readers (no variant drops either), which no recipe above launches
    mixed = shaped_model(synth.G1B_2_9B, "Q4_K_M", scale_dtype="float32",
                         overrides={"blocks.1.att.value": WeightFormat("ggml", ggml_type=Q6_K)})
    record_launches(mixed, "2.9B Q4_K_M scales float32, v in Q6_K", rec, prefill_batches=(), decode_batches=(1, 16))
    head = shaped_model(synth.G1B_2_9B, "Q4_K_M", n_layer=1, vocab=65536)
    record_launches(head, "2.9B vocab 65536", rec, prefill_batches=(), decode_batches=(1,))
    layernorm_lerp.SEPARATE = 1  # RWKV_MLX_SEPARATE_PROLOGUE=1 (the default is 0): prologues as launches of their own
    decode.PARTS_IN_PROLOGUE = 0  # RWKV_MLX_PARTS_IN_PROLOGUE=0 (the default is 1, which SHAPES records): parts added apart
    try:
        for file_type in ("Q4_K_M", "F16"):
            record_launches(shaped_model(synth.G1B_2_9B, file_type), f"2.9B {file_type} separate prologue", rec,
                            prefill_batches=(), decode_batches=(1, 2, 4, 16, 64))
    finally:
        layernorm_lerp.SEPARATE = None
        decode.PARTS_IN_PROLOGUE = None
    return rec


@pytest.fixture(scope="module")
def compiled(recorded):
    insts = sorted(recorded.instantiations.values(), key=lambda i: i.label)
    prepared = [prepare(s) for s in metal_sources(insts)]
    return insts, prepared, check_all(prepared)


def test_recording_covers_every_case(recorded):
    cases = set().union(*(i.cases for i in recorded.instantiations.values()))
    for label in SHAPES:
        for run in ("prefill B=1", "prefill B=2", "decode B=1", "decode B=2", "decode B=4"):
            assert f"{label} F16 {run}" in cases
    assert "2.9B vocab 65536 decode B=1" in cases
    nb = {dict(i.template).get("NB") for i in recorded.instantiations.values()}
    assert {1, 2, 4} <= nb
    # every variant the plans use, each name cut before the formats the launch reads (its READ_ variants, last)
    names = {i.kernel.name for i in recorded.instantiations.values()}
    shapes = {n.split("_read_")[0] for n in names}
    matvecs = {"rwkv_matvec", "rwkv_matvec_no_scales", "rwkv_matvec_one_segment", "rwkv_matvec_one_segment_no_scales"}
    mma = {"rwkv_matvec_no_scales_mma", "rwkv_matvec_one_segment_no_scales_mma",  # blocks as stored, F16
           "rwkv_matvec_mma", "rwkv_matvec_one_segment_mma",  # affine codes (beside Q6_K blocks in one launch)
           "rwkv_matvec_one_segment_no_scales_mma_half_tiles",  # float16 matrices, copied into the tile
           "rwkv_matvec_no_scales_mma_half_tiles"}  # float16 LoRA copies (up-projections; an F16 file's r/k/v too)
    wkv = {"rwkv_wkv7", "rwkv_wkv7_one_token"}  # prompts; decode (each token's vectors in shared memory)
    prologues = {"rwkv_layernorm_lerp_whole", "rwkv_layernorm_lerp"}  # a row as given; W_o's parts added first
    assert shapes == matvecs | mma | wkv | prologues | {"rwkv_dequant_no_scales"}, shapes
    # (NO_SCALES: no affine matrix in the launch; rwkv_dequant_no_scales: the prompts' products of GGUF blocks kept
    # as stored (Metal's default; its affine variant serves CUDA only, tests/test_matvec_blocks.py runs its Metal
    # text); rwkv_layernorm_lerp_whole: the decode prologues as launches of their own (many rows, or a setting);
    # rwkv_layernorm_lerp: the FFN key's and r/k/v's, adding the parts of K before them (the default)). The formats: the
    # oracle files hold every block type, and a launch of affine codes beside Q6_K blocks reads both.
    read = {k: set().union(*(n.split("_read_")[1:] for n in names if n.startswith(f"rwkv_{k}_")))
            for k in ("matvec", "dequant")}
    assert any(n.endswith("_read_affine_read_q6_k") for n in names), names
    assert "2.9B Q4_K_M separate prologue decode B=4" in cases
    assert {16, 64} <= {dict(i.template).get("NB") for i in recorded.instantiations.values() if "mma" in i.kernel.name}
    if not oracle_models():
        pytest.skip(f"the oracle files were not recorded: {ORACLE_MISSING}")
    for name in oracle_models():
        assert f"{name} decode B=4" in cases and f"{name} prefill B=2" in cases
    blocks = {"q6_k", "q3_k", "q2_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "iq4_xs"}
    assert read["matvec"] == blocks | {"dense", "affine", "groups"} and read["dequant"] == blocks, read
    scales = {d for i in recorded.instantiations.values() for n, d, _ in i.inputs if n == "s0"}
    assert {"float32", "float16", "bfloat16"} <= scales


def test_no_launch_refused_by_its_plan(recorded):
    assert not recorded.refused, recorded.refused


def test_no_kernel_input_lives_in_the_small_pool(recorded):
    """Every input of every launch a model makes (prompts and decode, every shape and oracle file) is over 8 bytes:
    on CUDA a kernel reading a constant from MLX's pool of small arrays waits for its pages whenever the CPU has
    written another scalar (an eps as 1 float and the dequant shape as 2 ints did; kernel_log step 26)."""
    small = {(i.kernel.name, n, d, s) for i in recorded.instantiations.values() for n, d, s in i.inputs
             if int(np.prod(s)) * np.dtype(d if d != "bfloat16" else "float16").itemsize <= dialect.SMALL_POOL_BYTES}
    assert not small, small


def test_every_instantiation_compiles_under_metal_rules(compiled):
    insts, prepared, results = compiled
    failures = [f"{i.label} (first in {sorted(i.cases)[0]}): {r.first_error}"
                for i, r in zip(insts, results) if not r.ok]
    print(f"\n{len(insts)} distinct Metal instantiations compiled, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(insts)} do not compile:\n" + "\n".join(failures)


def test_every_launch_within_apple_limits(compiled):
    insts, prepared, _ = compiled
    for inst, p in zip(insts, prepared):
        for grid, group in inst.launches:
            assert np.prod(group) <= APPLE_THREADS_PER_GROUP, (inst.label, group)
        # the threadgroup memory check is compiled into each kernel that has any (see compile.py); the
        # dequant kernel is the one without
        if inst.kernel.name.startswith("rwkv_dequant"):
            assert not p.threadgroup_arrays, inst.label
        else:
            assert p.threadgroup_arrays and "RWKV_THREADGROUP_BYTES(" in p.text, inst.label


# ---- negative controls: the header keeps Metal's rules ---------------------------------------

def probe_kernel(header: str, body: str, inputs: list[str]) -> Kernel:
    """A one-off kernel in the dialect, rendered for Metal."""
    src = parse_kern(f"//! kernel: probe\n//! inputs: {' '.join(inputs)}\n//! outputs: y\n"
                     f"//! header:\n{header}\n//! body:\n{body}\n", "probe")
    return Kernel("probe", render(src, "metal"), ())


def tiny_kernel(header: str, body: str, sizes: dict[str, int]) -> str:
    """MLX's Metal source of a one-off kernel whose float inputs have these sizes."""
    inst = Instantiation(probe_kernel(header, body, list(sizes)), tuple((n, "float32", (s,)) for n, s in sizes.items()),
                         (), ((32,),), ("float32",), {((32, 1, 1), (32, 1, 1))})
    return metal_sources([inst])[0]


HELPER = "DEVICE float first(IN(float) p) { return p[0]; }"


def test_constant_input_to_device_helper_does_not_compile():
    """The bug of issue 13: a 1-element placeholder (MLX: `constant`) given to a helper typed `device`."""
    ok = check(prepare(tiny_kernel(HELPER, "y[0] = first(a) + first(b);", {"a": 8, "b": 8})))
    assert ok.ok, ok.errors
    bad_source = tiny_kernel(HELPER, "y[0] = first(a) + first(b);", {"a": 8, "b": 1})
    assert "const constant float* b" in bad_source  # MLX's own choice for 1 element
    bad = check(prepare(bad_source))
    assert not bad.ok and "no matching function for call to 'first'" in bad.first_error, bad.errors


def test_issue_13_placeholders_do_not_compile(recorded):
    """Issue 13 itself: the real 8-slot matvec text with 1-element placeholders (as before the fix) fails,
    because MLX passes them as `constant` and the kernel's helpers take `device` pointers."""
    inst = next(i for i in recorded.instantiations.values()
                if i.kernel.name.split("_read_")[0] == "rwkv_matvec" and dict(i.template)["BITS"] == 4)
    unused = {f"{k}{i}" for k in "sz" for i in range(1, 8)}  # scale/offset slots a dense or affine launch leaves empty
    shrunk = tuple((n, d, (1,) if n in unused else s) for n, d, s in inst.inputs)
    unfixed = Instantiation(inst.kernel, shrunk, inst.template, inst.output_shapes, inst.output_dtypes, inst.launches)
    source = metal_sources([unfixed])[0]
    assert "const constant float* s1" in source
    result = check(prepare(source))
    assert not result.ok and "no matching function for call to" in result.first_error, result.errors


def test_address_spaces_do_not_convert():
    body = "SHARED float t[32];\n  SHARED_PTR(float) p = a;\n  y[0] = p[0] + t[0];"
    bad = check(prepare(tiny_kernel("", body, {"a": 8})))
    assert not bad.ok and "cannot initialize a variable of type" in bad.first_error, bad.errors


def test_threadgroup_memory_only_at_kernel_scope():
    use = "y[THREAD_ID] = a[THREAD_ID] + t[THREAD_ID];"
    assert check(prepare(tiny_kernel("", "SHARED float t[32];\n  " + use, {"a": 32}))).ok
    nested = check(prepare(tiny_kernel("", "if (a[0] > 0) {\n  SHARED float t[32];\n  " + use + "\n  }", {"a": 32})))
    assert not nested.ok and "address space" in nested.first_error, nested.errors
    helper = "DEVICE float scratch(IN(float) a) {\n  SHARED float t[32];\n  t[0] = a[0];\n  return t[0];\n}"
    in_helper = check(prepare(tiny_kernel(helper, "y[0] = scratch(a);", {"a": 32})))
    assert not in_helper.ok and "address space" in in_helper.first_error, in_helper.errors


def test_threadgroup_memory_over_32_kb_does_not_compile():
    body = "SHARED float t[{}];\n  SHARED float u[8];\n  t[THREAD_ID] = a[0];\n  u[0] = t[1];\n  y[0] = u[0];"
    assert check(prepare(tiny_kernel("", body.format(8192 - 8), {"a": 8}))).ok  # exactly 32 KB
    over = check(prepare(tiny_kernel("", body.format(8192 - 7), {"a": 8})))
    assert not over.ok and "32 KB" in " ".join(over.errors), over.errors


# ---- 3: the texts run under the emulator -----------------------------------------------------

def test_emulator_cache_drops_what_went_unused(tmp_path, monkeypatch):
    """The emulator libraries persist across runs in a shared directory; those unused for CACHE_DAYS go
    at a process's first build, a recently used one stays."""
    import os
    import time

    from rwkv_mlx.testing.metal_proof import compile as C

    monkeypatch.setenv("RWKV_MLX_METAL_PROOF_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "_pruned", set())
    stale, fresh, other = tmp_path / "kstale.so", tmp_path / "kfresh.so", tmp_path / "notes.txt"
    for f in (stale, fresh, other):
        f.write_bytes(b"x")
    long_ago = time.time() - (C.CACHE_DAYS + 1) * 86400
    for f in (stale, other):
        os.utime(f, (long_ago, long_ago))
    assert C.build_directory() == tmp_path
    assert not stale.exists() and fresh.exists() and other.exists()  # only the libraries it names k*.so
    stale.write_bytes(b"x")
    os.utime(stale, (long_ago, long_ago))
    C.build_directory()
    assert stale.exists()  # once a process: later builds do not scan again


@needs_emulator
def test_emulator_barriers_and_simd_operations():
    """Lanes exchange through simd_* and threadgroup memory exactly as Metal defines it."""
    body = """
  SHARED float t[128];
  const unsigned i = THREAD_ID, lane = LANE_ID, warp = WARP_ID;
  const float v = a[GROUP_ID * 128 + i];
  t[i] = v;
  BARRIER();
  y[(GROUP_ID * 128 + i) * 4 + 0] = t[127 - i];
  y[(GROUP_ID * 128 + i) * 4 + 1] = WARP_SUM(v);
  y[(GROUP_ID * 128 + i) * 4 + 2] = WARP_MAX(v) + warp;
  y[(GROUP_ID * 128 + i) * 4 + 3] = SHFL_XOR(v, 5) + 1000.0f * lane;"""
    kernel = probe_kernel("", body, ["a"])
    a = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    (y,) = Emulator()(Launch(kernel, [mx.array(a)], [], (256, 1, 1), (128, 1, 1), [(256, 4)], [mx.float32]))
    y = np.array(y).reshape(2, 128, 4)
    g = a.reshape(2, 128)
    lanes = (np.arange(128) % 32).astype(np.float32)
    warps = (np.arange(128) // 32).astype(np.float32)
    w = g.reshape(2, 4, 32)
    assert np.array_equal(y[..., 0], g[:, ::-1])
    assert np.allclose(y[..., 1], np.repeat(w.sum(-1), 32, axis=-1).reshape(2, 128), rtol=1e-6)
    assert np.array_equal(y[..., 2], np.repeat(w.max(-1), 32, axis=-1).reshape(2, 128) + warps)
    assert np.array_equal(y[..., 3], w[:, :, np.arange(32) ^ 5].reshape(2, 128) + np.float32(1000) * lanes)


def emulated_logits(model, tokens: list[int], decoded: int, batch: int = 1, emu: Emulator | None = None):
    """Logits [batch, T, V]: a prefill of all but the last ``decoded`` tokens, then one token at a time."""
    emu = emu or Emulator()
    P = len(tokens) - decoded
    with emu.running():
        logits, state = model(mx.array([tokens[:P]] * batch))
        rows = [np.array(logits)]
        for t in tokens[P:]:
            logits, state = model(mx.array([[t]] * batch), state)
            rows.append(np.array(logits))
    assert emu.launches > 0
    return np.concatenate(rows, axis=1)


def plain_logits(model, tokens: list[int]) -> np.ndarray:
    with kernels_disabled():
        return np.array(model(mx.array([tokens]))[0][0])


MODELS = oracle_models() or ["<oracle missing>"]


@needs_emulator
@pytest.mark.parametrize("one_token", [True, False], ids=["one_token", "scratch"])
@pytest.mark.parametrize("ranks", UP_RANKS, ids=UP_RANK_IDS)
def test_emulated_time_mix_up_projections(ranks, one_token):
    """The time-mix kernel's LoRA up-projections in decode (UP 1, below the matrix units' rows): rows of whole
    16-byte pieces split over a column's four threads (the 2.9B's ranks: three batches of loads a thread, LoRAs
    split between threads), and rows that are not, read a weight at a time, against the pure reference."""
    with Emulator().running():
        y, s, y_ref, s_ref = up_projection_case(ranks, "metal", one_token)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@needs_emulator
@pytest.mark.parametrize("name", MODELS)
def test_emulated_model_matches_pure_path_and_oracle(name):
    if name.startswith("<"):
        pytest.skip(ORACLE_MISSING)
    model = load(name, EXACT)
    tokens = oracle_tokens(name)
    got = emulated_logits(model, tokens, decoded=2)[0]
    plain = plain_logits(model, tokens)
    assert rel_err(got, plain) < 1e-5 and np.abs(got - plain).max() < 1e-4, (rel_err(got, plain),)
    ref = oracle_logits(name, "ref64")
    diff = got - ref
    assert np.abs(diff).max() < 1e-3 and np.sqrt((diff ** 2).mean()) < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@needs_emulator
def test_emulated_batch_of_two(require_oracle):
    model = load("fixb-Q4_K_M", EXACT)
    tokens = oracle_tokens("fixb-Q4_K_M")
    got = emulated_logits(model, tokens, decoded=2, batch=2)
    assert np.array_equal(got[0], got[1])
    assert rel_err(got[0], plain_logits(model, tokens)) < 1e-5


@needs_emulator
def test_emulated_products_route_for_many_rows(require_oracle, monkeypatch):
    """Above matvec.MAX_BATCH rows a decoded block's products are MLX's, the LoRA up-projections among them,
    and its time mix is still the kernel's (kernels/products.py): no matvec launch, a decode-mode WKV launch
    reading the up-projections (UP 0), the pure path's logits."""
    from rwkv_mlx.kernels import matvec

    monkeypatch.setattr(matvec, "MAX_BATCH", 1)
    model = load("fixb-Q4_K_M", EXACT)
    tokens = oracle_tokens("fixb-Q4_K_M")
    emu = Emulator()
    got = emulated_logits(model, tokens, decoded=2, batch=2, emu=emu)
    kernels = {(b.inst.kernel.name, dict(b.inst.template).get("UP")) for b in emu.built.values()}
    assert ("rwkv_wkv7", 0) in kernels and not any(name.startswith("rwkv_matvec") for name, _ in kernels)
    with emu.running():  # (the plan the decode built, cached under the emulated backend)
        assert type(model.runtime.block_plan(1, 2).ups).__name__ == "ProductPlan"
    assert np.array_equal(got[0], got[1])
    assert rel_err(got[0], plain_logits(model, tokens)) < 1e-5


@needs_emulator
def test_emulated_many_rows_expand_affine_codes_as_on_cuda(require_oracle, monkeypatch):
    """CUDA's many-row products multiply affine matrices expanded by the dequant kernel's affine variant (one
    launch a matrix, layers.AffineLinear). Its Metal text under the emulator, the layers answering as on CUDA
    with float32 expansion, gives a 16-row prefill and decoded token (the products route) the logits that MLX's
    own quantized products give the same emulated run: the expansion is exact."""
    from rwkv_mlx import layers
    from rwkv_mlx.kernels import matvec

    monkeypatch.setattr(matvec, "MAX_BATCH", 1)
    model = load("fixa-Q4_K_M", LoadOptions.for_backend("metal", scale_dtype="float32", keep_blocks=False))
    tokens = oracle_tokens("fixa-Q4_K_M")
    quantized = emulated_logits(model, tokens, decoded=1, batch=16)
    monkeypatch.setattr(layers, "active_backend", lambda: "cuda")  # expand affine weights from 16 rows
    monkeypatch.setattr(layers, "CUDA_EXPAND_DTYPE", "float32")
    emu = Emulator()
    expanded = emulated_logits(model, tokens, decoded=1, batch=16, emu=emu)
    assert "rwkv_dequant_read_affine" in {b.inst.kernel.name for b in emu.built.values()}
    assert rel_err(expanded, quantized) < 1e-6


@needs_emulator
def test_broken_kernel_text_fails_the_comparison(require_oracle):
    """Negative control: one lane index changed in the WKV kernel's row sum must be caught."""
    edits = []

    def break_row_sum(source: str) -> str:
        if "rwkv_wkv7" not in source:
            return source
        good = "sa += SHFL_XOR(sa, 2);"
        assert source.count(good) == 1, "the negative control's target line changed; update it"
        edits.append(1)
        return source.replace(good, "sa += SHFL_XOR(sa, 1);")

    model = load("fixb-f32", EXACT)
    tokens = oracle_tokens("fixb-f32")
    got = emulated_logits(model, tokens, decoded=2, emu=Emulator(edit=break_row_sum))[0]
    assert edits
    assert rel_err(got, plain_logits(model, tokens)) > 1e-3


MANY_ROWS = [("float32", 3), ("float32", 4), ("float16", 4), ("bfloat16", 4), ("affine-4-float16", 4),
             ("affine-8-bfloat16", 4)]  # chunk_rows_many: more than two rows, every chunk width


@needs_emulator
@pytest.mark.parametrize("N,T", [(64, 1), (64, 5), (128, 1), (128, 5), (32, 3)])
def test_emulated_time_mix_both_state_layouts(N, T):
    """The time-mix launch's Metal text against the pure path: head sizes up to 64 hold each state row
    interleaved among its four threads (IL 1), 128 in contiguous quarters (IL 0); one token and several
    (prefill's launch: TB 16 or 8. Decode's TB 1 runs in the emulated whole-model tests)."""
    from rwkv_mlx.kernels import wkv7
    from rwkv_mlx.model.wkv import time_mix_core_reference

    rng = np.random.default_rng(N + T)
    B, H = 2, 2
    C = H * N
    f = lambda *s, scale=1.0: mx.array((rng.standard_normal(s) * scale).astype(np.float32))  # noqa: E731
    seq = [f(B, T, C), f(B, T, C), f(B, T, C), mx.array(rng.uniform(-6, 2, (B, T, C)).astype(np.float32)),
           f(B, T, C), f(B, T, C)]
    chan = [mx.array(rng.uniform(0.5, 1.5, C).astype(np.float32)), mx.array(rng.uniform(0, 1, C).astype(np.float32)),
            f(C, scale=0.5), mx.array(rng.uniform(0.5, 1.5, C).astype(np.float32)), f(C, scale=0.1)]
    state = f(B, H, N, N, scale=0.5)
    with Emulator().running():
        got = wkv7.prefill(*seq, *chan, state, N, "metal")
        assert got is not None
        y, s = (np.array(a) for a in got)
    with kernels_disabled():
        y_ref, s_ref = (np.array(a) for a in time_mix_core_reference(*seq, *chan, state, N))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, (rel_err(y, y_ref), rel_err(s, s_ref))


@needs_emulator
@pytest.mark.parametrize("kind,B", [(k, b) for b in (1, 2) for k in ["float32", "float16", "bfloat16", "affine-4-float16",
                                    "affine-5-float32", "affine-8-bfloat16", "q6_k", "q3_k", "q2_k"]] + MANY_ROWS)
def test_emulated_matvec_formats(kind, B):
    """Every weight format and scale dtype, by the Metal text, against float64 numpy."""

    from rwkv_mlx.kernels.matvec import matvec

    segs, x, weights = two_segments(kind, B, (128, 256))
    with Emulator().running():
        y = np.array(matvec(mx.array(x), segs, backend="metal"))
    want = np.concatenate([x[:, :256].astype(np.float64) @ weights[0].T, np.tanh(x[:, 256:].astype(np.float64)) @ weights[1].T],
                          axis=1)
    assert rel_err(y, want) < 1e-5


def two_segments(kind: str, B: int, rows: tuple[int, int], K: int = 256):
    """Segments of ``rows`` in ``kind``, reading x [B, 2K] as is and by tanh: (segments, x, float64 weights)."""
    from rwkv_mlx.kernels.matvec import Segment

    rng = np.random.default_rng(len(kind) * 10 + B)
    layers = [make_layer(kind, r, K, rng) for r in rows]
    x = rng.standard_normal((B, 2 * K)).astype(np.float32)
    return [Segment(layer, x_offset=i * K, mode=i) for i, (layer, _) in enumerate(layers)], x, [w for _, w in layers]


@needs_emulator
@pytest.mark.parametrize("kind,B", [(k, 16) for k in ["float32", "float16", "bfloat16", "affine-4-float16", "affine-5-float32",
                                    "affine-8-bfloat16", "q6_k", "q3_k", "q2_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                    "iq4_nl", "q4_k", "q5_k", "iq4_xs"]] + [("q4_k", 9), ("q8_0", 17), ("float16", 64)])
def test_emulated_matrix_units(kind, B, matrix_units):
    """The MMA variant's Metal text (simdgroup matrices, emulated): the product of the float16-rounded operands
    in float64, to 2e-5 (a tanh computed in float32 here and in the kernel may round to float16 apart), for
    every weight format; segments of 32 and 64 rows, 9 rows padded to 16. The warps sharing a tile along K:
    4 a tile at 16 rows (2 tiles), 2 at 17 (3 tiles, two warps idle), none at 64 (8 tiles)."""
    from rwkv_mlx.kernels.matvec import MatvecPlan

    segs, x, weights = two_segments(kind, B, (32, 64))
    with Emulator().running():
        plan = MatvecPlan(segs, B, backend="metal", x_stride=x.shape[1])
        assert plan.ok and dict(plan.template)["MT"] > 0, plan.template
        y = np.array(plan(mx.array(x)))
    inputs = [x[:, :256], np.tanh(x[:, 256:])]
    want = rounded_products(inputs, weights)
    exact = np.concatenate([v.astype(np.float64) @ w.T for v, w in zip(inputs, weights)], axis=1)
    assert rel_err(y, want) < 2e-5 and rel_err(y, exact) < 2e-3, (rel_err(y, want), rel_err(y, exact))


@needs_emulator
@pytest.mark.parametrize("kind,B,dq", [("q4_k", 16, 2), ("affine-4-float16", 16, 3), ("float16", 9, 2),
                                       ("q8_0", 9, 3), ("affine-8-bfloat16", 16, 2)])
def test_emulated_matrix_units_decode_groups_together(kind, B, dq, matrix_units, monkeypatch):
    """RWKV_MLX_MMA_DECODES: a thread decodes dq weight groups at once, indexes past the tile's last group
    clamped to it (and not stored): the same products as one group at a time. Groups of 64 weight rows
    (MT 4) and K = 512 in tiles of 192 (Apple's 32 KB) give a tile 384 groups: two a thread for some."""
    from rwkv_mlx.kernels import matvec
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(matvec, "MMA_DECODES", dq)
    monkeypatch.setattr(matvec, "MMA_MIN_GROUPS", 1)
    segs, x, weights = two_segments(kind, B, (64, 128), K=512)
    with Emulator().running():
        plan = MatvecPlan(segs, B, backend="metal", x_stride=x.shape[1])
        t = dict(plan.template)
        assert plan.ok and t["DQ"] == dq and 16 * t["MT"] * t["KT"] // 32 > 256, plan.template
        y = np.array(plan(mx.array(x)))
    want = rounded_products([x[:, :512], np.tanh(x[:, 512:])], weights)
    assert rel_err(y, want) < 2e-5


@needs_emulator
@pytest.mark.parametrize("kind,B,parts,prefetch,rows_ahead", [
    ("affine-4-float16", 16, 1, True, False), ("affine-8-bfloat16", 16, 2, True, False),  # the weights' LOAD_AHEAD
    ("affine-4-float32", 64, 2, True, False),
    ("q4_k", 16, 1, False, True), ("float16", 64, 2, False, True), ("q8_0", 9, 1, False, True),  # the rows' ROWS_AHEAD
    ("affine-4-float32", 64, 1, True, True), ("affine-8-float16", 16, 2, True, True)])  # both
def test_emulated_matrix_units_next_tile_ahead(kind, B, parts, prefetch, rows_ahead, matrix_units, monkeypatch):
    """RWKV_MLX_MMA_PREFETCH (a launch of affine weights only loads a thread's groups of the next tile of K) and
    RWKV_MLX_MMA_ROWS_AHEAD (a launch of float16 rows loads a thread's pieces of the next tile's rows, stored after
    the products) while this one multiplies: the same products, over tiles whose last one is short (K = 1024 in
    tiles that do not divide it) and over parts of K (a part loads ahead within itself only). Groups of 64 weight
    rows give a tile 384 groups at 16 rows: two a thread for some; 9 rows are padded to 16 (no piece for the
    padding)."""
    from rwkv_mlx.kernels import matvec
    from rwkv_mlx.kernels.matvec import MatvecPlan, Segment

    monkeypatch.setattr(matvec, "MMA_PREFETCH", prefetch)
    monkeypatch.setattr(matvec, "MMA_ROWS_AHEAD", rows_ahead)
    monkeypatch.setattr(matvec, "MMA_MIN_GROUPS", 1 if parts == 1 else 7)  # (6 groups of 32 rows: 2 parts give 12)
    monkeypatch.setattr(matvec, "MMA_K_PARTS", parts)
    segs, x, weights = two_segments(kind, B, (64, 128), K=1024)
    inputs = [x[:, :1024], np.tanh(x[:, 1024:])]
    if rows_ahead:  # (float16 rows go to mode-0 segments)
        segs, inputs = [Segment(s.weight, x_offset=s.x_offset) for s in segs], [x[:, :1024], x[:, 1024:]]
    with Emulator().running():
        plan = MatvecPlan(segs, B, backend="metal", x_stride=x.shape[1], half_input=rows_ahead)
        t, defines = dict(plan.template), plan.kernel.defines
        assert plan.ok and plan.parts == parts and (plan.x_dtype == mx.float16) == rows_ahead, plan.template
        assert ("LOAD_AHEAD" in defines) == prefetch and ("ROWS_AHEAD" in defines) == rows_ahead, defines
        assert parts > 1 or 1024 % t["KT"] != 0, plan.template  # (a short last tile)
        y = np.array(plan(mx.array(x).astype(mx.float16 if rows_ahead else mx.float32)))
    assert rel_err(y, rounded_products(inputs, weights)) < 2e-5


@needs_emulator
def test_emulated_matrix_units_parts_that_fill_a_wave(matrix_units, monkeypatch):
    """RWKV_MLX_MMA_WAVE: parts of K in any count, here three (not a power of two) over seven tiles (K = 1280, tiles
    of 192 under Apple's 32 KB), so the last part is shorter: the same products. Of the tilings, MT 4 (3 groups, 3
    parts) fills a wave of 9 groups; MT 2 (6 groups, 1 part) and MT 1 (12 groups, over the wave) fill it less."""
    from rwkv_mlx.kernels import matvec
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(matvec, "MMA_WAVE", 9)  # (Metal's default is 0)
    monkeypatch.setattr(matvec, "MMA_K_PARTS", 16)
    segs, x, weights = two_segments("q4_k", 16, (64, 128), K=1280)
    with Emulator().running():
        plan = MatvecPlan(segs, 16, backend="metal", x_stride=x.shape[1])
        t = dict(plan.template)
        tiles = -(-1280 // t["KT"])
        assert plan.ok and plan.parts == 3 and t["MT"] == 4 and tiles % 3 != 0, (plan.template, plan.parts)
        y = np.array(plan(mx.array(x)))
    assert rel_err(y, rounded_products([x[:, :1280], np.tanh(x[:, 1280:])], weights)) < 2e-5


@needs_emulator
@pytest.mark.parametrize("kind,B", [("q4_k", 16), ("float16", 64), ("q8_0", 9)])
def test_emulated_matrix_units_read_half_rows(kind, B, matrix_units):
    """Rows given as float16 (the launch before wrote them so: a split prologue, the FFN key), staged eight
    elements a load: the products of the float32 rows they were rounded from, as the float32 staging gives."""
    from rwkv_mlx.kernels.matvec import MatvecPlan, Segment

    segs, x, weights = two_segments(kind, B, (32, 64))
    segs = [Segment(s.weight, x_offset=s.x_offset) for s in segs]  # (float16 rows go to mode-0 segments)
    with Emulator().running():
        plan = MatvecPlan(segs, B, backend="metal", x_stride=x.shape[1], half_input=True)
        assert plan.ok and plan.x_dtype == mx.float16, plan.template
        y = np.array(plan(mx.array(x).astype(mx.float16)))
    want = rounded_products([x[:, :256], x[:, 256:]], weights)
    assert rel_err(y, want) < 2e-5


@needs_emulator
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_matrix_units_take_float16_copies_of_bare_arrays(dtype, matrix_units):
    """A bare float32 or bfloat16 array (the LoRA matrices) reaches the matrix units as a float16 copy
    (matvec.HalfCopies): the launch copies its tiles (HALF_TILES) and gives, bit for bit, the products of the same
    weights in a layer, whose tile rounds them at every launch (weights include float16 ties: to even). One copy
    serves plans of two batch sizes."""
    from rwkv_mlx.kernels.matvec import HalfCopies, MatvecPlan, Segment

    rng = np.random.default_rng(5)
    layer, _ = make_layer(dtype, 64, 256, rng)
    w = np.array(layer.weight.astype(mx.float32))
    w[0, :4] = [1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 2.0**-20]  # ties, and below float16's normals
    layer.weight = mx.array(w).astype(getattr(mx, dtype))
    halves = HalfCopies()
    for B in (16, 9):
        x = mx.array(rng.standard_normal((B, 256)).astype(np.float32))
        with Emulator().running():
            in_tile = MatvecPlan([Segment(layer)], B, backend="metal", x_stride=256)
            copied = MatvecPlan([Segment(layer.weight)], B, backend="metal", x_stride=256, halves=halves)
            assert in_tile.ok and copied.ok and "half_tiles" in copied.kernel.name, copied.kernel.name
            assert "half_tiles" not in in_tile.kernel.name and copied.consts["w0"].size == 64 * 256 * 2
            assert np.array_equal(np.array(copied(x)), np.array(in_tile(x)))
    assert len(halves) == 1


@needs_emulator
@pytest.mark.parametrize("kind,B,mt", [("q4_k", 16, 4), ("float16", 16, 4), ("q6_k", 64, 2), ("affine-4-float16", 9, 4),
                                       ("q8_0", 17, 4)])
def test_emulated_matrix_units_taller_groups(kind, B, mt, matrix_units, monkeypatch):
    """Groups of 64 and 32 weight rows (MT 4 and 2: each staged activation row serves more weights). At 64
    activation rows Apple's 32 KB holds no tile for MT 4, and the plan takes MT 2. At 17 rows (3 column
    tiles) a warp's two tiles span two row blocks: it loads A again for the second."""
    from rwkv_mlx.kernels import matvec
    from rwkv_mlx.kernels.matvec import MatvecPlan

    monkeypatch.setattr(matvec, "MMA_MIN_GROUPS", 1)
    segs, x, weights = two_segments(kind, B, (64, 128))
    with Emulator().running():
        plan = MatvecPlan(segs, B, backend="metal", x_stride=x.shape[1])
        assert plan.ok and dict(plan.template)["MT"] == mt, plan.template
        y = np.array(plan(mx.array(x)))
    inputs = [x[:, :256], np.tanh(x[:, 256:])]
    want = rounded_products(inputs, weights)
    assert rel_err(y, want) < 2e-5


@needs_emulator
@pytest.mark.parametrize("B", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_emulated_matrix_units_prologue_epilogue_and_tiles(B, matrix_units):
    """LayerNorm + lerp in, relu^2 out, K = 10240 walked in tiles (Apple's 32 KB), a bias; K split into parts
    (two groups a row block, added after the launch, then the epilogue), and without parts; a residual."""
    from rwkv_mlx.kernels import matvec as matvec_module
    from rwkv_mlx.kernels.matvec import MatvecPlan, Segment

    rng = np.random.default_rng(B)
    K, F = 10240, 32
    layer, w = make_layer("q4_k", F, K, rng)
    x, prev, mix, ln = lerp_inputs(rng, B, K, 1)
    bias = rng.standard_normal(F).astype(np.float32)
    res = rng.standard_normal((B, F)).astype(np.float32)
    for parts in (2, 1):
        with Emulator().running(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(matvec_module, "MMA_K_PARTS", parts)
            plan = MatvecPlan([Segment(layer, mode=0)], B, backend="metal", prologue=1, epilogue=1, ln=ln,
                              mix=mx.array(mix), bias=mx.array(bias))
            assert plan.ok and dict(plan.template)["KT"] < K and plan.inner.parts == parts, plan.template
            outs = plan(mx.array(x), mx.array(prev))
            # the parts are added from views: an integer index would be a Gather, a kernel a part
            assert "Gather" not in count_primitives(list(outs)), count_primitives(list(outs))
            y, xn = (np.array(a) for a in outs)
            y2 = np.array(matvec_module.matvec(mx.array(x), [Segment(layer)], epilogue=2, residual=mx.array(res),
                                               backend="metal"))
        assert rel_err(xn, layer_norm64(x, ln)) < 1e-5
        lerped = xn + (prev - xn) * mix[0]  # (the kernel's float32 LayerNorm, rounded as the kernel rounds it)
        assert rel_err(y, np.maximum(half_rounded(lerped) @ half_rounded(w).T + bias, 0) ** 2) < 2e-5
        assert rel_err(y2, half_rounded(x) @ half_rounded(w).T + res) < 2e-5


@needs_emulator
def test_broken_fragment_fails_the_matrix_units(matrix_units):
    """Negative control: the second 8 x 8 block of B loaded from the first's columns must be caught."""
    from rwkv_mlx.kernels.matvec import Segment, matvec

    edits = []

    def break_b(source: str) -> str:
        good = "simdgroup_load(f.b1, b + 8, ldb, ulong2(0), true);"
        if good not in source:
            return source
        edits.append(1)
        return source.replace(good, "simdgroup_load(f.b1, b, ldb, ulong2(0), true);")

    rng = np.random.default_rng(7)
    layer, w = make_layer("float16", 32, 256, rng)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    with Emulator(edit=break_b).running():
        y = np.array(matvec(mx.array(x), [Segment(layer)], backend="metal"))
    assert edits and rel_err(y, half_rounded(x) @ half_rounded(w).T) > 0.1


@needs_emulator
@pytest.mark.parametrize("batch", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_emulated_many_rows_on_matrix_units_match_pure_path(batch, require_oracle, matrix_units):
    """16 and 64 rows of one prompt through the MMA launches (every matvec of the blocks, float16 rows from the
    split prologues, the time-mix kernel and the FFN key, and the LoRA up-projections as a launch of their own, read by the time-mix
    kernel as its pre-activations): the rows agree exactly, and each is within float16 rounding of the pure path
    (0.4-0.7% of the logits' norm is float16's cost here; a wrong tile is of order one) with the same greedy
    tokens. (Parts of K: test_emulated_matrix_units_prologue_epilogue_and_tiles; this model's rows are short.)"""
    from rwkv_mlx.kernels.decode import BlockPlan

    model = load("fixb-Q4_K_M", EXACT)
    tokens = oracle_tokens("fixb-Q4_K_M")[:6]
    emu = Emulator()
    got = emulated_logits(model, tokens, decoded=3, batch=batch, emu=emu)
    # r/k/v + LoRA down, the FFN and output launches, and the up-projections (float16 copies of the LoRA
    # matrices, matvec.HalfCopies: tiles copied, HALF_TILES)
    # (this file's r, k and v are Q5_0: the launch with the LoRA down-projections reads dense and Q5_0 rows)
    assert {"rwkv_matvec_no_scales_mma_read_dense_read_q5_0", "rwkv_matvec_one_segment_no_scales_mma_read_q4_k",
            "rwkv_matvec_no_scales_mma_half_tiles_read_dense"} <= {b.inst.kernel.name for b in emu.built.values()}
    # one float16 copy of each LoRA matrix (loaded as float32) for the whole model, whatever the batch sizes
    loras = [getattr(b.att, n) for b in model.blocks for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
             if hasattr(b.att, n)]
    assert all(w.dtype == mx.float32 for w in loras) and len(model.runtime._halves) == len(loras)
    with emu.running():
        plan = BlockPlan(model.blocks[1], batch, "metal")
    assert plan.ups is not None and plan.value.x_dtype == mx.float16 and plan.proj.inner.x_dtype == mx.float16
    assert plan.out.x_dtype == mx.float16  # (W_o copies the float16 rows the time-mix launch writes)
    assert np.array_equal(got[0], got[batch - 1])
    plain = plain_logits(model, tokens)
    assert rel_err(got[0, 3:], plain[3:]) < 5e-3 and (got[0].argmax(-1) == plain.argmax(-1)).all()


@needs_emulator
@pytest.mark.parametrize("kind,B", [("float16", 1), ("affine-4-float32", 1), ("q6_k", 1), ("q4_k", 2), ("q5_k", 4),
                                    ("q8_0", 1), ("q8_0", 4)])
def test_emulated_long_rows_walk_tiles(kind, B):
    """The 2.9B FFN's K = 10240: longer than Apple's 32 KB stage, walked in tiles of K. Q4_K and Q5_K
    lanes read weights of two groups 32 apart, Q8_0 lanes pairs of blocks: their tiles hold whole
    64-element pairs (at B = 2 a multiple of 32 alone would give 3424, which splits one)."""

    from rwkv_mlx.kernels.matvec import MatvecPlan, Segment

    rng = np.random.default_rng(3)
    K, F = 10240, 64
    layer, w = make_layer(kind, F, K, rng)
    x, prev, mix, ln = lerp_inputs(rng, B, K, 1)
    with Emulator().running():
        plan = MatvecPlan([Segment(layer, mode=0)], B, backend="metal", prologue=1, ln=ln, mix=mx.array(mix))
        kt = dict(plan.template)["KT"]
        assert plan.ok and kt < K and (kind not in ("q4_k", "q5_k", "q8_0") or kt % 64 == 0), plan.template
        y, xn = (np.array(a) for a in plan(mx.array(x), mx.array(prev)))
    norm = layer_norm64(x, ln)
    assert rel_err(xn, norm) < 1e-5 and rel_err(y, (norm + (prev - norm) * mix[0]) @ w.T) < 1e-5


@needs_emulator
@pytest.mark.parametrize("B", [1, 2, 4])
@pytest.mark.parametrize("separate", [0, 1])
def test_emulated_prologue_fused_or_separate(B, separate, monkeypatch):
    """The LayerNorm + lerp prologue of a launch of three segments (lerp rows 2 and 0, and none), in every
    group (matvec.kern PRO 1) or once in a launch of its own (layernorm_lerp.kern): both against float64."""
    from rwkv_mlx.kernels.matvec import MatvecPlan, Segment

    monkeypatch.setattr(layernorm_lerp, "SEPARATE", separate)
    rng = np.random.default_rng(B)
    K = 512
    x, prev, mix, ln = lerp_inputs(rng, B, K, 3)
    layers = [make_layer(kind, rows, K, rng) for kind, rows in (("float16", 256), ("q6_k", 128), ("float32", 256))]
    modes = (2, 0, -1)
    emu = Emulator()
    with emu.running():
        plan = MatvecPlan([Segment(layer, mode=m) for (layer, _), m in zip(layers, modes)], B, backend="metal",
                          prologue=1, ln=ln, mix=mx.array(mix))
        assert plan.ok
        y, xn = (np.array(a) for a in plan(mx.array(x), mx.array(prev)))
    assert ("rwkv_layernorm_lerp_whole" in {b.inst.kernel.name for b in emu.built.values()}) == bool(separate)
    norm = layer_norm64(x, ln)
    inputs = [norm if m < 0 else norm + (prev - norm) * mix[m] for m in modes]
    want = np.concatenate([inp @ w.T for inp, (_, w) in zip(inputs, layers)], axis=1)
    assert rel_err(xn, norm) < 1e-5 and rel_err(y, want) < 1e-5


@needs_emulator
@pytest.mark.parametrize("P,B,M", [(4, 16, 1), (2, 3, 6), (3, 5, 1)])
def test_emulated_prologue_adds_the_parts(P, B, M):
    """layernorm_lerp.kern without WHOLE: the row is P parts of K and a residual, added in matvec.add_parts' order.
    The sum it returns is add_parts' own bit for bit, and its LayerNorm and lerps those of the WHOLE launch on
    add_parts' output; both against float64 too."""
    K = 640  # (three groups a row, the last one partly idle)
    with Emulator().running():
        got, want, raw, res, ln = parts_prologue_case(P, B, K, M, "metal", seed=P * 10 + B)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)
    exact = raw.astype(np.float64).reshape(P, B, K).sum(0) + res
    assert rel_err(got[2], exact) < 1e-6 and rel_err(got[0], layer_norm64(exact.astype(np.float32), ln)) < 1e-5


@needs_emulator
@pytest.mark.slow
def test_emulated_prologues_add_the_parts_in_a_decode_step(tmp_path, matrix_units, monkeypatch):
    """RWKV_MLX_PARTS_IN_PROLOGUE=1, a decoded token of 64 rows through a two-block model 768 wide (whose W_o
    and FFN value take two parts of K there under Apple's 32 KB): W_o's parts added by each block's FFN key
    prologue launch, block 0's FFN value parts by block 1's r/k/v prologue launch, block 1's by MLX
    operations for the head. The logits and the state bit for bit those of every part added by
    matvec.add_parts."""
    from rwkv_mlx.kernels.decode import BlockPlan
    from rwkv_mlx.testing.synthetic import make_synthetic_model, synthetic_args

    path = tmp_path / "wide.gguf"
    make_synthetic_model(path, "Q4_K_M", synthetic_args(2, 768, 768, (32, 32, 32, 32), vocab=1024), seed=4)
    model = rwkv_mlx.load(path, EXACT)[0]
    B = 64
    tokens = mx.array([(37 * b + 5) % 1024 for b in range(B)], dtype=mx.uint32)[:, None]
    state = model.initial_state(B)
    rng = np.random.default_rng(4)  # (a state of its own, so that every input of a block matters)
    state = type(state)(*([mx.array(rng.standard_normal(a.shape).astype(np.float32) * 0.3) for a in arrays]
                          for arrays in (state.att_x, state.ffn_x, state.wkv)), state.model_id)
    outs, prologues = {}, {}
    for on in (0, 1):
        monkeypatch.setattr(decode, "PARTS_IN_PROLOGUE", on)
        model.runtime.invalidate()
        emu = Emulator()
        with emu.running():
            plan = BlockPlan(model.blocks[1], B, "metal")
            assert plan.ok and plan.out.parts == 2 and plan.value.parts == 2
            assert (plan.ffn_pre is not None) == (plan.ln1_pre is not None) == bool(on)
            logits, after = model(tokens, state)
            outs[on] = [np.array(a) for a in (logits, *after.arrays())]
        prologues[on] = sorted((dict(b.inst.template)["M"], dict(b.inst.template)["P"]) for b in emu.built.values()
                               if b.inst.kernel.name.startswith("rwkv_layernorm_lerp"))
    # the parts added by the FFN key's (M 1) and r/k/v's (M 6) prologue launches; the head's (M 0) takes x whole
    assert (1, 2) in prologues[1] and (6, 2) in prologues[1] and all(p == 0 for _, p in prologues[0])
    for a, b in zip(outs[0], outs[1]):
        assert np.array_equal(a, b)


@needs_emulator
def test_emulated_separate_prologue_model(require_oracle, monkeypatch):
    """A whole model decoding with its prologues as launches of their own (RWKV_MLX_SEPARATE_PROLOGUE=1) gives the pure
    path's logits; a lerp turned the wrong way in that kernel's text (negative control) does not."""
    monkeypatch.setattr(layernorm_lerp, "SEPARATE", 1)
    model = load("fixb-Q4_K_M", EXACT)
    tokens = oracle_tokens("fixb-Q4_K_M")
    plain = plain_logits(model, tokens)
    emu = Emulator()
    got = emulated_logits(model, tokens, decoded=2, emu=emu)[0]
    assert "rwkv_layernorm_lerp_whole" in {b.inst.kernel.name for b in emu.built.values()}
    assert rel_err(got, plain) < 1e-5

    def turn_lerp(source: str) -> str:
        good = "shift_lerp(v, p, mv[m])"  # (common.kern's helper; turned: p + (v - p) * mv[m])
        if "rwkv_layernorm_lerp" not in source:
            return source
        assert source.count(good) == 1, "the negative control's target changed; update it"
        return source.replace(good, "shift_lerp(p, v, mv[m])")

    model.runtime.invalidate()
    bad = emulated_logits(model, tokens, decoded=2, emu=Emulator(edit=turn_lerp))[0]
    assert rel_err(bad, plain) > 1e-3


@needs_emulator
def test_os_threads_agree_with_fibers(require_oracle):
    """The fibers' fixed order hides nothing here: with an OS thread per Metal thread, all running at
    once on pthread barriers, a prefill (WKV kernel) and a layer's r|k|v|LoRA launch give the same bits."""
    from rwkv_mlx.kernels.decode import BlockPlan

    model = load("fixb-f32", EXACT)
    tokens = mx.array([oracle_tokens("fixb-f32")[:8]])
    block = model.blocks[1]
    x, prev = (mx.array(np.random.default_rng(i).standard_normal((1, 1, 128)).astype(np.float32)) for i in (1, 2))
    runs = []
    for os_threads in (False, True):
        with Emulator(os_threads=os_threads).running():
            logits, state = model(tokens)
            proj, xn = BlockPlan(block, 1, "metal").proj(x, prev)
            runs.append([np.array(a) for a in (logits, *state.wkv, proj, xn)])
    for fiber, thread in zip(*runs):
        assert np.array_equal(fiber, thread)
    assert rel_err(runs[0][0][0], plain_logits(model, oracle_tokens("fixb-f32")[:8])) < 1e-5
