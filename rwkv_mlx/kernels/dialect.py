"""Render kernel sources written once (``custom_kernels/*.kern``) for CUDA and for Metal.

A backend is a table of token substitutions plus a short header of macros.
Tokens that MLX must see literally (Metal's thread attributes, which it scans
the body for to build the kernel signature) are substituted; the rest are
macros.  See custom_kernels/README.md for the dialect.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("cuda", "metal")


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

# Identifiers that belong to one backend only: they must never appear in a .kern file.
BACKEND_ONLY = {
    "cuda": ["threadIdx", "blockIdx", "blockDim", "gridDim", "__syncthreads", "__shfl", "__shared__",
             "__device__", "__half", "__nv_bfloat16", "expf", "rsqrtf", "cooperative_groups"],
    "metal": ["thread_position_in", "threadgroup_position_in", "threads_per", "simdgroup", "simd_",
              "threadgroup_barrier", "mem_flags", "device ", "constant ", "metal::", "as_type", "half ",
              "bfloat16_t", "[[", "uint3"],
}
DIALECT_WORDS = ["THREAD_ID", "GROUP_ID", "LANE_ID", "WARP_ID", "DEVICE", "SHARED", "IN", "OUT", "SHARED_PTR",
                 "BARRIER", "WARP_SUM", "WARP_MAX", "SHFL_XOR", "F32", "HALF_BITS", "FLOAT_BITS", "LOCAL_PTR", "EXP", "LOG", "TANH",
                 "SQRT", "RSQRT", "FMAX", "FMIN"]


@dataclass
class KernelSource:
    """One parsed .kern file."""

    name: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    template: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)  # define -> inputs it drops
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
            elif key in ("inputs", "outputs", "template", "include"):
                target = "includes" if key == "include" else key
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


def render(src: KernelSource | str, backend: str, defines: tuple[str, ...] = ()) -> Rendered:
    """The (header, body) MLX needs for ``backend``, includes resolved in order.

    ``defines`` become ``#define NAME 1`` lines ahead of the header: a variant of
    one source (a weight format, say) without a second copy of the text. A variant
    declared with ``//! variant: NAME inputs...`` also leaves those inputs out of the
    signature (each input costs host time at every launch).
    """
    if isinstance(src, str):
        src = load_kern(src)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    seen: list[str] = []

    def collect(s: KernelSource) -> None:
        for inc in s.includes:
            if inc not in seen:
                collect(load_kern(inc))
                seen.append(inc)

    collect(src)
    header = "".join(f"#define {d} 1\n" for d in defines) + _PRELUDES[backend]
    header += "\n".join(substitute(load_kern(i).header, backend) for i in seen)
    header += "\n" + substitute(src.header, backend)
    name = "_".join([src.name, *(d.lower() for d in defines)])
    dropped = {i for d in defines for i in src.variants.get(d, ())}
    return Rendered(name, backend, header, substitute(src.body, backend),
                    tuple(i for i in src.inputs if i not in dropped), tuple(src.outputs), tuple(src.template))


@functools.lru_cache(maxsize=None)
def build(name: str, backend: str, defines: tuple[str, ...] = ()):
    """The MLX kernel object for a .kern file and variant (compiled lazily by MLX at first call)."""
    import mlx.core as mx

    r = render(name, backend, defines)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    # The name keys MLX's cache of compiled kernels, so each variant gets its own.
    return make(name=f"rwkv_{r.name}", input_names=list(r.inputs), output_names=list(r.outputs),
                source=r.body, header=r.header)
