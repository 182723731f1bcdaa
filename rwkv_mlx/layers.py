"""Matrix layers in the three forms a GGUF tensor can take in MLX.

* ``dense``  -- a float array (float32/float16/bfloat16), for F32/F16/BF16 files
  or block types dequantized at load time;
* ``affine`` -- MLX affine quantization at group 32 (``mx.quantized_matmul``),
  the exact image of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, IQ4_* (the CPU,
  the mlx-lm export, and GPUs where model/weights.py ``GPU_BLOCKS_DEFAULT`` says so);
* ``ggml``   -- the GGUF blocks as stored (uint8): on GPUs every block type our decode
  kernels read as stored (or, in the affine GPU form, those MLX cannot express:
  Q6_K, Q3_K, Q2_K); outside the decode kernels (prefill, CPU) they are expanded
  when used. Converted directories keep blocks, mapped at load like a GGUF's.

Activations arrive in float32 and leave in float32; each layer casts to the
dtype its weights need only for the product, so the residual stream, norms
and the WKV state stay float32 everywhere (llama.cpp does the same).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import quants
from .backend import active_backend
from .settings import env_choice, env_int

GROUP_SIZE = 32  # ggml sub-blocks are 32 (or 16) elements: only group 32 follows them

# MLX's CUDA quantized matmul is built for few rows: for a 512-token prompt chunk, expanding the
# weights and calling the dense GEMM was faster (results/kernel_log.md, step 4), and for decoded
# batches on an H100 a 2.9B Q4_K_M step of the pure block path took 86 ms at 16 rows and 330 ms at
# 64 by the quantized product against 34 ms at 64 expanded (results/serve_bench.md). That expansion
# is also faster at 16 rows is inferred from those figures (expanding costs the same at 16 rows, the
# product less), not measured. None: $RWKV_MLX_CUDA_DEQUANT_MIN_ROWS or 16; 0 turns this off.
CUDA_DEQUANT_MIN_ROWS: int | None = None
# The dtype they are expanded to. float16 (the default) rounds weights and activations to 2^-11, as an
# F16 file's prompt products do (llama.cpp rounds activations to 8 bits in its quantized products), for
# half the expanded bytes and the tensor cores: a 2.9B Q4_K_M prompt of 4,096 tokens ran at 9,609 tok/s
# against 5,471 in float32 on an H100 (results/kernel_log.md step 12; the accuracy cost is measured there
# by scripts/prefill_fidelity.py). float32 is exact and multiplies on CUDA cores (MLX_ENABLE_TF32=0).
# None: $RWKV_MLX_CUDA_EXPAND_DTYPE or float16.
CUDA_EXPAND_DTYPE: str | None = None


@contextlib.contextmanager
def exact_products():
    """Expanded weights in float32 whatever the setting: for references (the benchmark's quality gate),
    which must be float32 math."""
    global CUDA_EXPAND_DTYPE
    saved, CUDA_EXPAND_DTYPE = CUDA_EXPAND_DTYPE, "float32"
    try:
        yield
    finally:
        CUDA_EXPAND_DTYPE = saved


def cuda_dequant_min_rows() -> int:
    return env_int("RWKV_MLX_CUDA_DEQUANT_MIN_ROWS", 16, override=CUDA_DEQUANT_MIN_ROWS)


def _expand_on_cuda(rows: int) -> mx.Dtype | None:
    """The dtype to expand quantized weights to for a product of ``rows`` rows, or None: don't."""
    if active_backend() != "cuda" or not 0 < cuda_dequant_min_rows() <= rows:
        return None
    name = CUDA_EXPAND_DTYPE or env_choice("RWKV_MLX_CUDA_EXPAND_DTYPE", "float16", ("float16", "float32"))
    return getattr(mx, name)


def product(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T in w's dtype (LoRA matrices may be float16), result float32."""
    return (x.astype(w.dtype) @ w.T).astype(mx.float32)


@dataclass(frozen=True)
class WeightFormat:
    """How one matrix is stored: saved in config.json of converted models."""

    kind: str  # "dense" | "affine" | "ggml"
    dtype: str = "float32"  # dense: weight dtype; affine: scale/bias dtype
    bits: int = 0  # affine code width
    group_size: int = GROUP_SIZE
    ggml_type: int = -1  # ggml: block type id (gguf.GGMLQuantizationType)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (0, -1)}

    @classmethod
    def from_dict(cls, d: dict) -> "WeightFormat":
        return cls(**d)

    @property
    def mx_dtype(self) -> mx.Dtype:
        return getattr(mx, self.dtype)


class Linear(nn.Module):
    """y = x @ W.T with W dense (out, in)."""

    def __init__(self, in_dims: int, out_dims: int, fmt: WeightFormat):
        super().__init__()
        self.weight = mx.zeros((out_dims, in_dims), dtype=fmt.mx_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_dims, in_dims) of the matrix."""
        return self.weight.shape

    def __call__(self, x: mx.array) -> mx.array:
        return product(x, self.weight).astype(x.dtype)

    def rows(self, ids: mx.array) -> mx.array:
        """Rows of W (an embedding lookup), float32."""
        return self.weight[ids].astype(mx.float32)


# Quantized matrices expanded by a kernel, or None where none runs now. The kernels package, which sits
# above this module, sets both (kernels.expand_blocks, kernels.expand_affine):
# GGUF blocks: (weight, ggml_type, in_dims, dtype) -> the matrix in that dtype;
BLOCK_EXPANDER: Callable[[mx.array, int, int, mx.Dtype], mx.array | None] | None = None
# MLX affine codes: (weight, scales, biases, bits, group_size, dtype) -> the matrix in that dtype.
AFFINE_EXPANDER: Callable[[mx.array, mx.array, mx.array, int, int, mx.Dtype], mx.array | None] | None = None


class AffineLinear(nn.Module):
    """y = x @ dequantize(W).T, W affine-quantized along its rows in groups of 32."""

    def __init__(self, in_dims: int, out_dims: int, fmt: WeightFormat):
        super().__init__()
        self.group_size, self.bits = fmt.group_size, fmt.bits
        self.weight = mx.zeros((out_dims, in_dims * fmt.bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((out_dims, in_dims // fmt.group_size), dtype=fmt.mx_dtype)
        self.biases = mx.zeros((out_dims, in_dims // fmt.group_size), dtype=fmt.mx_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * self.group_size

    def dequantized(self, dtype: mx.Dtype) -> mx.array:
        """W in ``dtype``: by the dequant kernel where it runs (one launch, rounded once from float32),
        else by MLX with the scales and offsets cast first."""
        fast = AFFINE_EXPANDER(self.weight, self.scales, self.biases, self.bits, self.group_size, dtype) \
            if AFFINE_EXPANDER else None
        if fast is not None:
            return fast
        return mx.dequantize(self.weight, self.scales.astype(dtype), self.biases.astype(dtype),
                             group_size=self.group_size, bits=self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        dtype = _expand_on_cuda(x.size // x.shape[-1])
        if dtype is not None:
            return product(x, self.dequantized(dtype)).astype(x.dtype)
        y = mx.quantized_matmul(
            x.astype(self.scales.dtype), self.weight, self.scales, self.biases,
            transpose=True, group_size=self.group_size, bits=self.bits,
        )
        return y.astype(x.dtype)

    def rows(self, ids: mx.array) -> mx.array:
        """Dequantized rows (an embedding lookup), float32."""
        return mx.dequantize(
            self.weight[ids], self.scales[ids], self.biases[ids],
            group_size=self.group_size, bits=self.bits,
        ).astype(mx.float32)


class GGMLLinear(nn.Module):
    """y = x @ W.T with W kept as GGUF blocks; custom kernel where one exists."""

    def __init__(self, in_dims: int, out_dims: int, fmt: WeightFormat):
        super().__init__()
        block = quants.BLOCK_TYPES[fmt.ggml_type]
        self.ggml_type = fmt.ggml_type
        self.in_dims = in_dims
        self.weight = mx.zeros((out_dims, in_dims // block.block_elems * block.block_bytes), dtype=mx.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.in_dims

    def _expanded(self, blocks: mx.array, dtype: mx.Dtype) -> mx.array:
        """Rows of blocks (any number, whole rows) as a matrix in ``dtype``: written so by the dequant kernel
        where it runs (one launch, no second pass), else MLX's operations and a cast."""
        fast = BLOCK_EXPANDER(blocks, self.ggml_type, self.in_dims, dtype) if BLOCK_EXPANDER else None
        return fast if fast is not None else quants.dequantize(blocks, self.ggml_type, xp=mx).astype(dtype)

    def dequantized(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """W in ``dtype``."""
        return self._expanded(self.weight, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        # Decoded tokens reach these blocks through the matvec kernel (kernels/decode.py),
        # which reads them as stored; here (prefill, CPU) they are dequantized for the product.
        # That is the expansion AffineLinear does for many rows on CUDA; its dtype follows the same setting.
        dtype = _expand_on_cuda(x.size // x.shape[-1]) or mx.float32
        return product(x, self.dequantized(dtype)).astype(x.dtype)

    def rows(self, ids: mx.array) -> mx.array:
        """Dequantized rows (an embedding lookup), float32: the gathered blocks expanded in one launch of the
        dequant kernel where it runs. MLX's operations took about 50 primitives a decoded token for a Q4_K
        embedding (225 a token in all, against 176 for the affine form's; kernel_log step 21)."""
        return self._expanded(self.weight[ids.reshape(-1)], mx.float32).reshape(*ids.shape, self.in_dims)


_LINEARS = {"dense": Linear, "affine": AffineLinear, "ggml": GGMLLinear}


def make_linear(in_dims: int, out_dims: int, fmt: WeightFormat) -> nn.Module:
    """The layer class for a storage format; all share ``__call__`` and ``rows``."""
    return _LINEARS[fmt.kind](in_dims, out_dims, fmt)
