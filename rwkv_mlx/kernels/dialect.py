"""Render kernel sources written once (``custom_kernels/*.kern``) for CUDA and for Metal.

A backend is a table of token substitutions plus a short header of macros.
Tokens that MLX must see literally (Metal's thread attributes, which it scans
the body for to build the kernel signature) are substituted; the rest are
macros.  See custom_kernels/README.md for the dialect.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

BACKENDS = ("cuda", "metal")


@dataclass(frozen=True)
class Limits:
    """What one thread group may use on a backend; every launch plan sizes itself by these."""

    shared_bytes: int  # static shared (CUDA) / threadgroup (Metal) memory per group
    threads: int  # threads per group
    # MLX passes a kernel input with fewer elements than this in Metal's `constant` address
    # space (mlx/backend/common/metal_kernel.cpp, max_constant_array_size), every other one as
    # `device`; Metal converts no pointer between address spaces. 0: one address space (CUDA).
    device_min_elements: int


LIMITS = {
    "cuda": Limits(shared_bytes=48 * 1024, threads=1024, device_min_elements=0),
    "metal": Limits(shared_bytes=32 * 1024, threads=1024, device_min_elements=8),
}
# A stand-in for an absent input (an unused weight slot, a missing LoRA) is this long, so that
# MLX gives it the `device` address space like the real inputs it stands for.
PLACEHOLDER_ELEMENTS = max(lim.device_min_elements for lim in LIMITS.values())
# MLX's CUDA backend keeps every array of this many bytes or fewer in one pool of managed memory advised
# read-mostly (device_constant says why no kernel input may live there).
SMALL_POOL_BYTES = 8


def kernel_dir() -> Path:
    """custom_kernels/ in a source checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "custom_kernels", here.parent / "custom_kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("custom_kernels/ not found beside the rwkv_mlx package")


# Token -> text.  Applied with word boundaries to header and body.
_SUBSTITUTIONS = {
    "cuda": {
        "THREAD_ID": "threadIdx.x",
        "GROUP_ID": "blockIdx.x",
        "LANE_ID": "(threadIdx.x & 31u)",
        "WARP_ID": "(threadIdx.x >> 5)",
        "DEVICE": "__device__ __forceinline__",
        "SHARED": "__shared__",
        "f16": "__half",
        "bf16": "__nv_bfloat16",
        "u8": "uint8_t",
        "i8": "int8_t",
        "u16": "uint16_t",
        "u32": "uint32_t",
        "i32": "int32_t",
    },
    "metal": {
        "THREAD_ID": "thread_position_in_threadgroup.x",
        "GROUP_ID": "threadgroup_position_in_grid.x",
        "LANE_ID": "thread_index_in_simdgroup",
        "WARP_ID": "simdgroup_index_in_threadgroup",
        "DEVICE": "inline",
        "SHARED": "threadgroup",
        "f16": "half",
        "bf16": "bfloat16_t",
        "u8": "uint8_t",
        "i8": "int8_t",
        "u16": "uint16_t",
        "u32": "uint32_t",
        "i32": "int32_t",
    },
}

# Function-like dialect words become macros in the rendered header.
_PRELUDES = {
    "cuda": """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define IN(T) const T*
#define OUT(T) T*
#define SHARED_PTR(T) T*
#define BARRIER() __syncthreads()
#define SHFL_XOR(x, m) __shfl_xor_sync(0xffffffffu, (x), (m))
#define F32(x) static_cast<float>(x)
#define HALF_BITS(u) __half2float(__ushort_as_half(static_cast<unsigned short>(u)))
#define FLOAT_BITS(u) __uint_as_float(static_cast<unsigned int>(u))
#define BYTE_FLOAT(v, k) __uint_as_float(__byte_perm(static_cast<unsigned int>(v), 0x4B000000u, 0x7440u | (k)))
#define BITS_HALF(x) static_cast<unsigned int>(__half_as_ushort(__float2half_rn(x)))
#define LOCAL_PTR(T) T*
#define EXP(x) expf(x)
#define LOG(x) logf(x)
#define TANH(x) tanhf(x)
#define SQRT(x) sqrtf(x)
#define RSQRT(x) rsqrtf(x)
#define FMAX(a, b) fmaxf((a), (b))
#define FMIN(a, b) fminf((a), (b))
__device__ __forceinline__ float rwkv_warp_sum(float x) {
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}
__device__ __forceinline__ float rwkv_warp_max(float x) {
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
#define WARP_SUM(x) rwkv_warp_sum(x)
#define WARP_MAX(x) rwkv_warp_max(x)
""",
    "metal": """
#define IN(T) const device T*
#define OUT(T) device T*
#define SHARED_PTR(T) threadgroup T*
#define BARRIER() threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)
#define SHFL_XOR(x, m) simd_shuffle_xor((x), (m))
#define F32(x) static_cast<float>(x)
#define HALF_BITS(u) float(as_type<half>(static_cast<ushort>(u)))
#define FLOAT_BITS(u) as_type<float>(static_cast<uint>(u))
#define BYTE_FLOAT(v, k) as_type<float>(0x4B000000u | ((static_cast<uint>(v) >> (8 * (k))) & 255u))
#define BITS_HALF(x) static_cast<uint>(as_type<ushort>(static_cast<half>(x)))
#define LOCAL_PTR(T) thread T*
#define EXP(x) metal::exp(x)
#define LOG(x) metal::log(x)
#define TANH(x) metal::tanh(x)
#define SQRT(x) metal::sqrt(x)
#define RSQRT(x) metal::rsqrt(x)
#define FMAX(a, b) metal::fmax((a), (b))
#define FMIN(a, b) metal::fmin((a), (b))
#define WARP_SUM(x) simd_sum(x)
#define WARP_MAX(x) simd_max(x)
""",
}

# Header parts written per backend, which a kernel takes with ``//! include: NAME`` like a .kern file's
# header: only the kernels that use them pay for their text (MLX hashes it at every launch).
# mma: one warp's 16 x 8 float tile of C += A B on the matrix units, A 16 x 16 and B 16 x 8 float16 in
# shared memory: A row-major (element (i, k) at a[i * lda + k]), B by columns (element (k, n) at
# b[n * ldb + k]: an activation row is a column), C stored by columns (element (i, n) to c[n * ldc + i]).
# The operands are loaded apart (mma_load_a, mma_load_b) so that a warp with several tiles of one row block
# loads their A once. Every lane of the warp must call them together (Metal's simdgroup rule). Kernels never
# touch the fragments, whose layouts differ. CUDA: mma.sync m16n8k16 (sm_80 on), fragments as the PTX ISA lays
# them out for .row.col f16 with f32 accumulators (sm_75: two m16n8k8, the k = 0-7 and 8-15 halves of the same
# registers; compiled, never run here); Metal: 8 x 8 simdgroup matrices, half operands and
# float accumulators, B and C loaded and stored transposed. Its text is kept for matvec.kern's MMA variant
# only (the conditional around it is decided at render time, as every variant's is).
_BACKEND_PARTS = {
    "mma": {
        "cuda": """
#ifdef MMA
struct MmaTile { float c[4]; };
struct MmaA { unsigned r[4]; };
struct MmaB { unsigned r[2]; };
__device__ __forceinline__ void mma_zero(MmaTile& t) { t.c[0] = t.c[1] = t.c[2] = t.c[3] = 0.0f; }
// Fragments by ldmatrix: one instruction loads a whole fragment (four or two 8 x 8 matrices, each lane
// naming one 16-byte matrix row and receiving the PTX layout's elements), where a 32-bit shared load a
// register took four (A) and two (B); the lanes' rows are LDX apart (matvec.kern pads them onto distinct
// banks) and 16-byte aligned (LDX a multiple of 8, k a multiple of 16).
__device__ __forceinline__ unsigned rwkv_smem(const __half* p) { return (unsigned)__cvta_generic_to_shared(p); }
// mma_row_a/b: the row of A or B this lane names (a shared-memory address), taken once so that a loop over k adds
// only k to it (mma_load_a_at/b_at); taken from the pointer at every load, sm_90 SASS spent two instructions a load.
typedef unsigned MmaRow;
__device__ __forceinline__ MmaRow mma_row_a(const __half* a, int lda) {
  // lane i: row i % 16 of A, k from 0 or 8 (matrices r[0..3]: rows 0-7 and 8-15 of k 0-7, then of k 8-15)
  const int i = threadIdx.x & 31u;
  return rwkv_smem(a + (i & 15) * lda + (i & 16) / 2);
}
__device__ __forceinline__ MmaRow mma_row_b(const __half* b, int ldb) {
  // lanes 0-15: activation row i % 8, k from 0 or 8 (r[0]: k 0-7, r[1]: k 8-15); ldmatrix .x2 reads no other lane's
  const int i = threadIdx.x & 31u;
  return rwkv_smem(b + (i & 7) * ldb + (i & 8));
}
__device__ __forceinline__ void mma_load_a_at(MmaA& f, MmaRow row, int k, int lda) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3]) : "r"(row + 2u * k));
}
__device__ __forceinline__ void mma_load_b_at(MmaB& f, MmaRow row, int k, int ldb) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(f.r[0]), "=r"(f.r[1]) : "r"(row + 2u * k));
}
__device__ __forceinline__ void mma_load_a(MmaA& f, const __half* a, int lda) { mma_load_a_at(f, mma_row_a(a, lda), 0, lda); }
__device__ __forceinline__ void mma_load_b(MmaB& f, const __half* b, int ldb) { mma_load_b_at(f, mma_row_b(b, ldb), 0, ldb); }
__device__ __forceinline__ void mma_mul(MmaTile& t, const MmaA& a, const MmaB& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
               : "+f"(t.c[0]), "+f"(t.c[1]), "+f"(t.c[2]), "+f"(t.c[3]) : "r"(a.r[0]), "r"(a.r[1]), "r"(b.r[0]));
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
               : "+f"(t.c[0]), "+f"(t.c[1]), "+f"(t.c[2]), "+f"(t.c[3]) : "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[1]));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(t.c[0]), "+f"(t.c[1]), "+f"(t.c[2]), "+f"(t.c[3])
               : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
#endif
}
__device__ __forceinline__ void mma_store(const MmaTile& t, float* c, int ldc) {
  const int g = (threadIdx.x & 31u) >> 2, q = 2 * (threadIdx.x & 3u);
  c[q * ldc + g] = t.c[0];
  c[(q + 1) * ldc + g] = t.c[1];
  c[q * ldc + g + 8] = t.c[2];
  c[(q + 1) * ldc + g + 8] = t.c[3];
}
#endif
""",
        "metal": """
#ifdef MMA
struct MmaTile { simdgroup_float8x8 lo, hi; };
struct MmaA { simdgroup_half8x8 a00, a01, a10, a11; };
struct MmaB { simdgroup_half8x8 b0, b1; };
inline void mma_zero(thread MmaTile& t) {
  t.lo = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  t.hi = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
inline void mma_load_a(thread MmaA& f, threadgroup half* a, int lda) {
  simdgroup_load(f.a00, a, lda);
  simdgroup_load(f.a01, a + 8, lda);
  simdgroup_load(f.a10, a + 8 * lda, lda);
  simdgroup_load(f.a11, a + 8 * lda + 8, lda);
}
inline void mma_load_b(thread MmaB& f, threadgroup half* b, int ldb) {
  simdgroup_load(f.b0, b, ldb, ulong2(0), true);
  simdgroup_load(f.b1, b + 8, ldb, ulong2(0), true);
}
typedef threadgroup half* MmaRow;
inline MmaRow mma_row_a(threadgroup half* a, int lda) { return a; }
inline MmaRow mma_row_b(threadgroup half* b, int ldb) { return b; }
inline void mma_load_a_at(thread MmaA& f, MmaRow row, int k, int lda) { mma_load_a(f, row + k, lda); }
inline void mma_load_b_at(thread MmaB& f, MmaRow row, int k, int ldb) { mma_load_b(f, row + k, ldb); }
inline void mma_mul(thread MmaTile& t, thread const MmaA& a, thread const MmaB& b) {
  simdgroup_multiply_accumulate(t.lo, a.a00, b.b0, t.lo);
  simdgroup_multiply_accumulate(t.lo, a.a01, b.b1, t.lo);
  simdgroup_multiply_accumulate(t.hi, a.a10, b.b0, t.hi);
  simdgroup_multiply_accumulate(t.hi, a.a11, b.b1, t.hi);
}
inline void mma_store(thread const MmaTile& t, threadgroup float* c, int ldc) {
  simdgroup_store(t.lo, c, ldc, ulong2(0), true);
  simdgroup_store(t.hi, c + 8, ldc, ulong2(0), true);
}
#endif
""",
    },
    # copy: 16 bytes (copy16_start) or 64 (copy64_start) from device memory into shared memory, complete for the
    # thread that started them after copies_wait (a barrier must follow before other threads read them). CUDA:
    # the asynchronous copy unit (cp.async, sm_80 on), so a thread neither waits for the load nor holds the
    # data in registers, and its copies overlap what it does next (matvec.kern MMA: decoding the weight tile);
    # before sm_80, and on Metal, a load and a store.
    "copy": {
        "cuda": """
__device__ __forceinline__ void copy16_start(uint4* dst, const uint4* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  *dst = *src;
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
               :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(__cvta_generic_to_global(src)) : "memory");
#endif
}
__device__ __forceinline__ void copy64_start(uint4* dst, const uint4* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  for (int i = 0; i < 4; ++i) dst[i] = src[i];
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16; cp.async.cg.shared.global [%0+16], [%1+16], 16; "
               "cp.async.cg.shared.global [%0+32], [%1+32], 16; cp.async.cg.shared.global [%0+48], [%1+48], 16;"
               :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(__cvta_generic_to_global(src)) : "memory");
#endif
}
__device__ __forceinline__ void copies_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
""",
        "metal": """
inline void copy16_start(threadgroup uint4* dst, const device uint4* src) { *dst = *src; }
inline void copy64_start(threadgroup uint4* dst, const device uint4* src) {
  for (int i = 0; i < 4; ++i) dst[i] = src[i];
}
inline void copies_wait() {}
""",
    },
}

# Identifiers that belong to one backend only: they must never appear in a .kern file.
BACKEND_ONLY = {
    "cuda": ["threadIdx", "blockIdx", "blockDim", "gridDim", "__syncthreads", "__shfl", "__shared__",
             "__device__", "__half", "__nv_bfloat16", "expf", "rsqrtf", "cooperative_groups"],
    "metal": ["thread_position_in", "threadgroup_position_in", "threads_per", "simdgroup", "simd_",
              "threadgroup_barrier", "mem_flags", "device ", "constant ", "metal::", "as_type", "half ",
              "bfloat16_t", "[[", "uint3"],
}
DIALECT_WORDS = ["THREAD_ID", "GROUP_ID", "LANE_ID", "WARP_ID", "DEVICE", "SHARED", "IN", "OUT", "SHARED_PTR",
                 "BARRIER", "WARP_SUM", "WARP_MAX", "SHFL_XOR", "F32", "HALF_BITS", "FLOAT_BITS", "BYTE_FLOAT", "BITS_HALF", "LOCAL_PTR", "EXP", "LOG", "TANH",
                 "SQRT", "RSQRT", "FMAX", "FMIN"]


@dataclass
class KernelSource:
    """One parsed .kern file."""

    name: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    template: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)  # define -> inputs and outputs it drops
    constants: list[str] = field(default_factory=list)  # inputs read by index only, may be tiny
    header: str = ""
    body: str = ""
    path: Path | None = None


def parse_kern(text: str, name: str = "", path: Path | None = None) -> KernelSource:
    src = KernelSource(name=name, path=path)
    section = None
    parts = {"header": [], "body": []}
    for line in text.splitlines():
        m = re.match(r"^//!\s*(\w+):\s*(.*)$", line)
        if m:
            key, value = m.group(1), m.group(2).strip()
            if key in ("header", "body"):
                section = key
            elif key == "kernel":
                src.name = value
            elif key in ("inputs", "outputs", "template", "include", "constant"):
                target = {"include": "includes", "constant": "constants"}.get(key, key)
                getattr(src, target).extend(value.split())
            elif key == "variant":
                define, *dropped = value.split()
                src.variants[define] = dropped
            else:
                raise ValueError(f"{path or name}: unknown directive //! {key}")
            continue
        if section:
            parts[section].append(line)
    src.header, src.body = "\n".join(parts["header"]), "\n".join(parts["body"])
    return src


@functools.lru_cache(maxsize=None)
def load_kern(name: str) -> KernelSource:
    path = kernel_dir() / f"{name}.kern"
    return parse_kern(path.read_text(), name, path)


def substitute(text: str, backend: str) -> str:
    table = _SUBSTITUTIONS[backend]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, table)) + r")\b")
    return pattern.sub(lambda m: table[m.group(1)], text)


@dataclass(frozen=True)
class Rendered:
    name: str
    backend: str
    header: str
    body: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    template: tuple[str, ...]
    constants: tuple[str, ...] = ()


def included(src: KernelSource) -> list[str]:
    """The files ``src`` includes, directly or through another, each once, in the order they are pasted."""
    seen: list[str] = []

    def collect(s: KernelSource) -> None:
        for inc in s.includes:
            if inc not in seen:
                if inc not in _BACKEND_PARTS:
                    collect(load_kern(inc))
                seen.append(inc)

    collect(src)
    return seen


def all_variants(src: KernelSource) -> dict[str, list[str]]:
    """A kernel's variants: its own and those its included files declare (which drop none of its inputs):
    matvec_formats.kern's readers are variants of every kernel that reads weights through it."""
    out: dict[str, list[str]] = {}
    for inc in (i for i in included(src) if i not in _BACKEND_PARTS):
        for define, dropped in load_kern(inc).variants.items():
            if dropped:
                raise ValueError(f"{inc}.kern: variant {define} drops inputs, and an included file has none")
            out[define] = []
    return {**out, **src.variants}


def render(src: KernelSource | str, backend: str, defines: tuple[str, ...] = (), *,
           compacted: bool = True, pruned: bool = True) -> Rendered:
    """The (header, body) MLX needs for ``backend``, includes resolved in order.

    ``defines`` become ``#define NAME 1`` lines ahead of the header: a variant of
    one source (a weight format, say) without a second copy of the text. A variant
    declared with ``//! variant: NAME inputs...`` also leaves those inputs (and outputs) out of the
    signature (each input costs host time at every launch), and its conditionals are
    decided here (``resolve_variants``), and the header's definitions that nothing left in the text
    uses are dropped (``prune``; ``pruned=False`` keeps them). ``compacted=False`` gives the text as
    written (comments, every variant's code), which a C preprocessor reads as the unpruned compacted
    text: tests compare them.
    """
    if isinstance(src, str):
        src = load_kern(src)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    seen = included(src)
    variants = all_variants(src)
    unknown = set(defines) - set(variants)
    if unknown:
        raise ValueError(f"{src.name}: no variant {sorted(unknown)} (declare it with //! variant:)")
    marks = "".join(f"#define {d} 1\n" for d in defines)  # (kept, though pruning finds them unused: they name the variant)
    header = _PRELUDES[backend]
    header += "\n".join(_BACKEND_PARTS[i][backend] if i in _BACKEND_PARTS else substitute(load_kern(i).header, backend)
                        for i in seen)
    header += "\n" + substitute(src.header, backend)

    def final(text: str) -> str:
        # (as written, a text still ends with a newline: MLX appends the signature to the header)
        return compact(resolve_variants(text, set(variants), set(defines))) if compacted else text + "\n"

    name = "_".join([src.name, *(d.lower() for d in defines)])
    dropped = {i for d in defines for i in variants.get(d, ())}
    header, body = final(header), final(substitute(src.body, backend))
    header = marks + (prune(header, body) if compacted and pruned else header)
    return Rendered(name, backend, header, body,
                    tuple(i for i in src.inputs if i not in dropped), tuple(o for o in src.outputs if o not in dropped),
                    tuple(src.template),
                    tuple(src.constants))


_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_STRING = re.compile(r'"[^"\\\n]*"')


def compact(text: str) -> str:
    """``text`` without comments, indentation or blank lines, each line's spaces collapsed.

    MLX hashes a kernel's whole source at every launch it evaluates, to find the compiled module
    (mlx/backend/cuda/custom_kernel.cpp; Metal's custom_kernel.cpp does the same): on an H100's host about
    0.2 us per KB, 4 us a launch at no text and 11-12.5 us with 32 KB more (scripts/launch_cost.py,
    results/kernel_log.md step 14). So the .kern files keep their comments and the GPU gets none.
    Lines stay lines (a preprocessor directive needs its own, and the text ends with a newline:
    MLX appends the kernel's signature to the header). String literals (the one is CUDA's inline PTX
    in the matrix-unit helpers) are kept as written; one holding a comment marker, or a character
    literal, is refused.
    """
    code = _COMMENT.sub("", text)
    strings = _STRING.findall(code)
    code = _STRING.sub("\0", code)
    if '"' in code or "'" in code:
        raise ValueError("compact() keeps no character literal, nor a string with // or /* in it, intact")
    lines = (" ".join(line.split()) for line in code.splitlines())
    out = "".join(line + "\n" for line in lines if line)
    return re.sub("\0", lambda _: strings.pop(0), out)


_DIRECTIVE = re.compile(r"^\s*#\s*(ifdef|ifndef|if|elif|else|endif)\b\s*(.*?)\s*(?://.*)?$")  # (a // remark is no condition)
_TEST = re.compile(r"^(!?)\s*defined\s*\(\s*(\w+)\s*\)$")


def resolve_variants(text: str, variants: set[str], defined: set[str]) -> str:
    """``text`` with each ``#ifdef``/``#ifndef``/``#if [!]defined(V)`` chain on a variant V decided here.

    A variant's code is then absent from the text MLX keeps (and hashes at every launch, see
    ``compact``), not merely skipped by the compiler; the kept lines are what the preprocessor
    would keep with the variants' ``#define`` lines, which stay. Conditionals on other names
    pass through untouched.
    """
    out: list[str] = []
    stack: list[list[bool] | None] = []  # per open conditional: None (passed through) or [live, taken]

    def live() -> bool:
        return all(f is None or f[0] for f in stack)

    def decide(kind: str, cond: str) -> bool | None:
        """The condition's value if it tests one variant, else None."""
        if kind in ("ifdef", "ifndef"):
            name, negate = cond, kind == "ifndef"
        else:
            m = _TEST.match(cond)
            if not m:
                return None
            name, negate = m.group(2), m.group(1) == "!"
        return None if name not in variants else (name in defined) != negate

    for line in text.splitlines():
        m = _DIRECTIVE.match(line)
        if not m:
            if live():
                out.append(line)
            continue
        kind, cond = m.groups()
        if kind in ("ifdef", "ifndef", "if"):
            value = decide(kind, cond)
            if value is None:
                if live():
                    out.append(line)
                stack.append(None)
            else:
                stack.append([value, value])
            continue
        if not stack:
            raise ValueError(f"#{kind} without #if: {line.strip()!r}")
        frame = stack[-1]
        if frame is None:  # (its lines are kept where the conditionals around it keep them)
            if kind == "endif":
                stack.pop()
            if live():
                out.append(line)
            continue
        if kind == "elif":
            value = decide("if", cond)
            if value is None:
                raise ValueError(f"#elif on a name that is not a variant, in a chain on variants: {line.strip()!r}")
            frame[0] = value and not frame[1]
            frame[1] = frame[1] or value
        elif kind == "else":
            frame[0], frame[1] = not frame[1], True
        else:
            stack.pop()
    if stack:
        raise ValueError("#if without #endif")
    return "\n".join(out)


_IDENT = re.compile(r"[A-Za-z_]\w*")
_DEFINE = re.compile(r"#\s*define\s+(\w+)")


def _defined_name(item: str) -> str | None:
    """The name a top-level item of a compacted header defines: a macro, a struct, a function (the word
    before its parameter list, the last parenthesized group ahead of its body, so ``IN(u8) f(...)`` gives
    ``f``) or a variable; None where it is none of these, and such an item is always kept."""
    if item.startswith("#"):
        m = _DEFINE.match(item)
        return m.group(1) if m else None
    text = re.sub(r"^template\s*<[^{;]*?>\s*", "", item)
    m = re.match(r"(?:struct|union|class)\s+(\w+)", text)
    if m:
        return m.group(1)
    head = re.split(r"[{;=]", text, maxsplit=1)[0]
    depth = 0
    for i in range(len(head) - 1, -1, -1):  # (right to left: the parameter list is the last group)
        if head[i] == ")":
            depth += 1
        elif head[i] == "(":
            depth -= 1
            if depth == 0:
                m = re.search(r"(\w+)\s*$", head[:i])
                return m.group(1) if m else None
    m = re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$", head)
    return m.group(1) if m else None


def _top_level_items(header: str) -> list[str]:
    """A compacted header cut into its top-level items: each preprocessor line (with the lines a trailing
    backslash continues it on), and each declaration or definition (a ``template <...>`` line with the one
    it introduces) up to the ``}`` or ``;`` that closes it."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    directive = False  # (inside a directive a backslash continues)
    for line in header.splitlines(keepends=True):
        if directive or (not current and line.startswith("#")):
            if directive:
                items[-1] += line
            else:
                items.append(line)
            directive = line.rstrip("\n").endswith("\\")
            continue
        current.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and line.rstrip().endswith(("}", ";")):
            items.append("".join(current))
            current = []
    if current:
        items.append("".join(current))
    return items


def prune(header: str, body: str) -> str:
    """``header`` without the definitions that neither ``body`` nor any definition kept uses.

    The included files hold helpers for every variant and weight format (matvec_formats.kern's readers,
    the LayerNorm moments, the matrix units' staging); a launch uses a few of them, and MLX hashes all of
    its text at every launch (``compact``). A definition stays where its name occurs as a word in what is
    kept (the body first, then the kept definitions, until nothing more is added): a local variable of the
    same name keeps it too, which costs text and never code. Preprocessor lines other than ``#define``,
    and items whose name this cannot read, always stay.
    """
    items = _top_level_items(header)
    names = [_defined_name(i) for i in items]
    keep = [n is None or (i.startswith("#") and not _DEFINE.match(i)) for i, n in zip(items, names)]
    used = set(_IDENT.findall(body))
    for item, kept in zip(items, keep):
        if kept:
            used.update(_IDENT.findall(item))
    grown = True
    while grown:
        grown = False
        for i, name in enumerate(names):
            if not keep[i] and name in used:
                keep[i] = grown = True
                used.update(_IDENT.findall(items[i]))
    return "".join(item for item, kept in zip(items, keep) if kept)


_SHARED_DECL = re.compile(r"\bSHARED\s+(\w+)\s+(\w+)\s*\[([^\]]+)\]\s*;")
_CONSTEXPR = re.compile(r"\bconstexpr\s+int\s+(\w+)\s*=\s*([^;]+);")
_TYPE_BYTES = {"float4": 16, "uint4": 16, "float": 4, "int": 4, "u32": 4, "i32": 4, "f16": 2, "bf16": 2, "u16": 2, "u8": 1, "i8": 1}


def _int_expr(expr: str, names: dict[str, int]) -> int:
    """An integer C expression of names, literals, + - * / % and parentheses (no calls)."""
    py = re.sub(r"\b(\d+)[uU]?\b", r"\1", expr).replace("/", "//")
    if not re.fullmatch(r"[\w\s+\-*/%()]+", py):
        raise ValueError(f"not a plain integer expression: {expr!r}")
    return int(eval(py, {"__builtins__": {}}, dict(names)))  # noqa: S307 - checked above


@functools.lru_cache(maxsize=None)
def shared_bytes(name: str, defines: tuple[str, ...], template: tuple[tuple[str, int], ...]) -> int:
    """Static shared memory a launch declares, read from the kernel text itself.

    Every ``SHARED T name[EXPR];`` of the body as the variant renders it counts, EXPR evaluated with the
    template constants and the body's ``constexpr int`` lines, so the plans and the text can't disagree.
    """
    src = load_kern(name)
    names = {k: int(v) for k, v in template}
    for d in defines:
        names[d] = 1
    for part in [src.header, *(load_kern(i).header for i in src.includes if i not in _BACKEND_PARTS)]:
        if _SHARED_DECL.search(_COMMENT.sub("", part)):  # uncounted there: shared arrays belong in the body
            raise ValueError(f"{name}: a SHARED array in a header; declare it in the kernel body")
    body = resolve_variants(_COMMENT.sub("", src.body), set(all_variants(src)), set(defines))  # (a variant's own arrays)
    for const, expr in _CONSTEXPR.findall(body):
        try:
            names[const] = _int_expr(expr, names)
        except (ValueError, NameError, SyntaxError):
            pass  # a constexpr no array size depends on (or a float expression)
    return sum(_TYPE_BYTES[t] * _int_expr(n, names) for t, _, n in _SHARED_DECL.findall(body))


def _elements(dtype) -> int:
    """How long a stand-in or a few constants of ``dtype`` are: a device buffer on Metal, and over
    SMALL_POOL_BYTES on CUDA."""
    return PLACEHOLDER_ELEMENTS * -(-(SMALL_POOL_BYTES + 1) // (PLACEHOLDER_ELEMENTS * dtype.size))


def placeholder(dtype=None):
    """The stand-in for an absent input: zeros enough that Metal sees a device buffer (and CUDA keeps them
    out of MLX's pool of small arrays)."""
    import mlx.core as mx

    dtype = dtype if dtype is not None else mx.float32
    return mx.zeros((_elements(dtype),), dtype=dtype)


def device_constant(values, dtype):
    """A few constants a kernel reads by index (an eps, a matrix's shape), padded with zeros as a
    placeholder is and written by a GPU operation: evaluated once, they stay where the GPU reads them.

    MLX's CUDA backend puts every array of 8 bytes or less in one pool of managed memory advised read-mostly,
    so each new scalar the CPU writes (or reads back) takes the pool's pages from the GPU, and a kernel's next
    read of a constant kept there waits for them to come back (mlx/backend/cuda/allocator.cpp, as read; the
    64-row split prologue, which reads its eps from there, took 16-17 us in a decode step and 6.3 us on its own,
    results/kernel_log.md step 26). An array the CPU wrote would wait for the GPU's first read the same way.
    """
    import mlx.core as mx

    n = max(_elements(dtype), len(values))
    return mx.array(list(values) + [0] * (n - len(values)), dtype=dtype) + mx.zeros((n,), dtype=dtype)


class LaunchError(ValueError):
    """A launch that breaks its backend's rules (limits, address spaces)."""


@dataclass(frozen=True)
class Launch:
    """One kernel launch, as a launch hook sees it."""

    kernel: "Kernel"
    inputs: list
    template: list
    grid: tuple
    threadgroup: tuple
    output_shapes: list
    output_dtypes: list


_hook: Callable[[Launch], list] | None = None


@contextlib.contextmanager
def launch_hook(hook: Callable[[Launch], list]) -> Iterator[None]:
    """Route every launch to ``hook`` (which returns the outputs) instead of MLX.

    Used to record what a model launches and to run the Metal texts under an
    emulation on machines without the backend. Compiled decode steps are not
    built meanwhile: a hook must see concrete arrays.
    """
    global _hook
    saved, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = saved


def hook_active() -> bool:
    return _hook is not None


class Kernel:
    """A rendered kernel and its MLX object; each call is checked against the backend's rules."""

    def __init__(self, source: str, rendered: Rendered, defines: tuple[str, ...]):
        self.source, self.rendered, self.defines = source, rendered, defines
        self.name = f"rwkv_{rendered.name}"  # keys MLX's cache of compiled kernels: one per variant
        self.limits = LIMITS[rendered.backend]
        self._device_inputs = [i not in rendered.constants for i in rendered.inputs]
        self._mlx = None

    @property
    def backend(self) -> str:
        return self.rendered.backend

    def shared_bytes(self, template) -> int:
        return shared_bytes(self.source, self.defines, tuple((k, int(v)) for k, v in template))

    def check(self, inputs, template, threadgroup) -> None:
        """Raise LaunchError where the launch breaks a rule of its backend."""
        r, lim = self.rendered, self.limits
        if len(inputs) != len(r.inputs):
            raise LaunchError(f"{self.name}: {len(inputs)} inputs for {len(r.inputs)} parameters")
        threads = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if threads > lim.threads:
            raise LaunchError(f"{self.name}: {threads} threads per group, {r.backend} allows {lim.threads}")
        for name, device, a in zip(r.inputs, self._device_inputs, inputs) if lim.device_min_elements else ():
            if device and (a.ndim == 0 or a.size < lim.device_min_elements):
                raise LaunchError(f"{self.name}: input {name} has {a.size} elements; under "
                                  f"{lim.device_min_elements} MLX passes it in Metal's constant address space")
        used = self.shared_bytes(template)
        if used > lim.shared_bytes:
            raise LaunchError(f"{self.name}: {used} bytes of shared memory, {r.backend} allows {lim.shared_bytes}")

    def mlx_kernel(self):
        if self._mlx is None:
            import mlx.core as mx

            r = self.rendered
            make = mx.fast.cuda_kernel if r.backend == "cuda" else mx.fast.metal_kernel
            self._mlx = make(name=self.name, input_names=list(r.inputs), output_names=list(r.outputs),
                             source=r.body, header=r.header)
        return self._mlx

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **extra):
        self.check(inputs, template, threadgroup)
        if _hook is not None:
            return _hook(Launch(self, list(inputs), list(template), tuple(grid), tuple(threadgroup),
                                list(output_shapes), list(output_dtypes)))
        return self.mlx_kernel()(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                                 output_shapes=output_shapes, output_dtypes=output_dtypes, **extra)


_built: dict = {}


def launches(kernel: Kernel, signature, trial: Callable[[], object]) -> bool:
    """Whether an instantiation builds and runs here: the first plan of each ``signature`` (its
    template and input dtypes) launches ``trial`` once and evaluates it. A kernel that fails
    (a Metal or CUDA compiler error on a user's machine) costs its layers the speed, not the
    answer: it is reported in one line and the callers keep the pure-MLX path.
    """
    if _hook is not None:  # recorded or emulated launches: the hook is the backend
        return True
    key = (kernel.name, signature)
    if key not in _built:
        import mlx.core as mx

        try:
            mx.eval(trial())
            _built[key] = True
        except LaunchError:
            raise  # a plan that breaks its backend's rules is our bug, not the user's compiler
        except Exception as e:  # noqa: BLE001 - MLX reports compile errors as several types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if first.startswith("[eval]"):  # planned inside a transform (traced weights): no verdict
                raise
            _built[key] = False
            logging.getLogger("rwkv_mlx").warning(
                "rwkv-mlx: kernel %s did not build on %s (%s); its layers use the slower pure-MLX path. "
                "Please report this with the output of `rwkv-mlx doctor`.", kernel.name, kernel.backend, first)
    return _built[key]


@functools.lru_cache(maxsize=None)
def build(name: str, backend: str, defines: tuple[str, ...] = ()) -> Kernel:
    """The kernel for a .kern file and variant (MLX compiles it lazily, at its first launch)."""
    return Kernel(name, render(name, backend, defines), defines)
