"""The conversion layer: one stored tensor at a time into the MLX form it maps onto.

A tensor arrives as its raw bytes (numpy) with its GGML type and shape; which
file it came from is the loader's business (rwkv_mlx/loader).

Decisions are per tensor, never per file (a Q4_K_M file mixes F32, F16, Q4_K
and Q6_K; a file with short rows mixes Q4_K, Q5_0 and Q8_0):

* small tensors (norms, lerp factors, w0/w1/w2, k_k, k_a, r_k, ...) -> float32;
* F32/F16/BF16 matrices -> dense, upcast to float32 where ``float_dtype`` says so
  (the CPU backend computes float16 very slowly and inexactly);
* on GPU backends (``ggml_native``) in the stored form (``keep_blocks``; ``GPU_BLOCKS_DEFAULT``
  below says where), every block type the decode kernels read as stored
  (kernels.matvec.STORED_BLOCK_TYPES) -> kept as GGUF blocks, so a decoded token reads
  the file's bytes and no more (results/bytes_per_token.md);
* elsewhere (CPU, the affine GPU form, mlx-lm export), block types with an exact affine
  image -> MLX affine quantization at group 32 (MLX's own quantized products; no loss
  with float32 scales); on GPUs the rest stay blocks, on the CPU they are dequantized
  exactly to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from .. import arch, quants
from ..backend import active_backend
from ..settings import env_choice
from ..kernels.matvec import STORED_BLOCK_TYPES
from ..layers import WeightFormat

class StoredTensor(Protocol):
    """What conversion needs to know of a stored tensor (a GGUF reader's TensorInfo is one)."""

    ggml_type: int  # gguf.GGMLQuantizationType id
    shape: tuple[int, ...]  # numpy shape of the values (not of the blocks)


F32, F16, BF16 = 0, 1, 30
# The form of GGUF blocks on a GPU, until $RWKV_MLX_GPU_BLOCKS says otherwise. "stored": the decode kernel
# reads the file's blocks (1.00x their bytes a token); "affine": MLX's affine codes with float32 scales
# (about 1.33x for Q4_K, 1.18x for Q8_0: results/bytes_per_token.md). Apple GPUs decode at the speed of
# memory, so Metal reads the blocks. On an H100 the blocks decode one row as fast as the affine form and
# read prompts as fast (results/kernel_log.md step 22), load 8x faster and take 22% less memory, so CUDA
# reads them too. The affine form decodes many rows 4-12% faster on the matrix units (steps 23 and 25):
# RWKV_MLX_GPU_BLOCKS=affine, for a server that runs full batches.
GPU_BLOCKS_DEFAULT = {"metal": "stored", "cuda": "stored"}
FLOAT_TYPES = {F32: "float32", F16: "float16", BF16: "bfloat16"}


@dataclass(frozen=True)
class LoadOptions:
    """How to map a file's tensors onto MLX arrays.

    float_dtype: dtype for float matrices (F16/BF16 kept as stored when None).
    scale_dtype: dtype of affine scales and biases; float32 keeps K-quants exact
        (d * sc has up to 17 significant bits), float16 saves 1 bit per weight.
    ggml_native: keep GGUF blocks for the GPU kernels: every type they read as stored
        (STORED_BLOCK_TYPES), and any other type without an affine image (dequantized per
        product then); else such blocks are mapped to affine or dequantized at load.
    affine: map the exact block types onto MLX affine quantization where they do not
        stay as blocks (else dequantize).
    keep_blocks: with ggml_native, the types the kernels read as stored stay blocks; False maps
        those with an exact affine image to affine instead. GPU loads take it from
        ``GPU_BLOCKS_DEFAULT`` or ``$RWKV_MLX_GPU_BLOCKS`` (``stored`` or ``affine``), so that the
        two forms can be timed side by side in one tree.
    """

    float_dtype: str | None = None
    scale_dtype: str = "float32"
    ggml_native: bool = False
    affine: bool = True
    keep_blocks: bool = True

    @classmethod
    def for_backend(cls, backend: str | None = None, **overrides) -> "LoadOptions":
        backend = backend or active_backend()
        if backend == "cpu":
            base = cls(float_dtype="float32", ggml_native=False)
        else:
            form = env_choice("RWKV_MLX_GPU_BLOCKS", GPU_BLOCKS_DEFAULT[backend], ("stored", "affine"))
            base = cls(float_dtype=None, ggml_native=True, keep_blocks=form == "stored")
        return cls(**{**base.__dict__, **overrides})


def float_array(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], dtype: str | None) -> mx.array:
    """A stored F32/F16/BF16 tensor as an MLX array of ``dtype`` (None: as stored)."""
    if ggml_type == BF16:
        arr = mx.array(np.ascontiguousarray(raw).view(np.uint16)).view(mx.bfloat16)
    else:
        arr = mx.array(np.ascontiguousarray(raw).view(np.float32 if ggml_type == F32 else np.float16))
    arr = arr.reshape(shape)
    return arr.astype(getattr(mx, dtype)) if dtype else arr


def dense_float32(raw: np.ndarray, info: StoredTensor) -> mx.array:
    """Any stored tensor, dequantized exactly to float32."""
    if info.ggml_type in FLOAT_TYPES:
        return float_array(raw, info.ggml_type, info.shape, "float32")
    return mx.array(quants.dequantize(raw, info.ggml_type, xp=np)).reshape(info.shape)


def convert_matrix(raw: np.ndarray, info: StoredTensor, opts: LoadOptions) -> tuple[WeightFormat, dict[str, mx.array]]:
    """A (rows, cols) matrix in its MLX storage form: (format, {'weight', ['scales', 'biases']})."""
    t = info.ggml_type
    if t in FLOAT_TYPES:
        dtype = opts.float_dtype or FLOAT_TYPES[t]
        return WeightFormat("dense", dtype), {"weight": float_array(raw, t, info.shape, dtype)}
    block = quants.BLOCK_TYPES[t]
    as_affine = opts.affine and block.to_affine is not None
    if opts.ggml_native and (not as_affine or (opts.keep_blocks and t in STORED_BLOCK_TYPES)):
        return WeightFormat("ggml", ggml_type=t), {"weight": mx.array(np.asarray(raw))}
    if as_affine:
        aff = block.to_affine(np.asarray(raw))
        scale_dtype = getattr(mx, opts.scale_dtype)
        fmt = WeightFormat("affine", opts.scale_dtype, bits=aff.bits)
        return fmt, {
            "weight": mx.array(quants.pack_affine_codes(aff.codes, aff.bits)),
            "scales": mx.array(aff.scales).astype(scale_dtype),
            "biases": mx.array(aff.biases).astype(scale_dtype),
        }
    dtype = opts.float_dtype or "float32"
    return WeightFormat("dense", dtype), {"weight": dense_float32(raw, info).astype(getattr(mx, dtype))}


def convert_small(raw: np.ndarray, info: StoredTensor, dtype: str | None) -> mx.array:
    """Vectors and LoRA matrices: float32 (or the stored float dtype when ``dtype`` is None)."""
    if info.ggml_type in FLOAT_TYPES:
        return float_array(raw, info.ggml_type, info.shape, dtype)
    return dense_float32(raw, info)


# LoRA matrices stay in their stored float dtype on GPUs (they are read every token).
LORA_MATRICES = frozenset(arch.LORA_MATRICES)


def convert_tensor(raw: np.ndarray, info: StoredTensor, is_matrix: bool, module_path: str,
                   opts: LoadOptions) -> tuple[WeightFormat | None, dict[str, mx.array]]:
    """(format, arrays) of a matrix stored as a layer, or (None, {"": array}) for a small tensor."""
    if is_matrix:
        return convert_matrix(raw, info, opts)
    keep = opts.float_dtype is None and module_path.rsplit(".", 1)[-1] in LORA_MATRICES
    return None, {"": convert_small(raw, info, None if keep else "float32")}

