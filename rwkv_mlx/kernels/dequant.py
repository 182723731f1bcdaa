"""Quantized matrices expanded to a dense float32 or float16 matrix in one launch (custom_kernels/dequant.kern).

A prompt's products -- and, on CUDA, the products of many decoded rows -- multiply quantized weights
by the expanded matrix; this is that expansion on a GPU, by the decode kernels' own readers: GGUF
blocks kept as stored (``layers.GGMLLinear``, ``expand``) and MLX's affine codes (``layers.AffineLinear``,
``expand_affine``). ``kernels.expand_blocks`` and ``kernels.expand_affine`` hand them to the layers,
which fall back to plain MLX operations where no kernel runs: on the CPU, inside ``kernels_disabled()``,
or for a form the readers don't know.
"""

from __future__ import annotations

import mlx.core as mx

from .. import quants
from .dialect import build, device_constant, launches
from .matvec import STORED_BLOCK_TYPES, _KINDS, kind_number, reader_variants

THREADS = 256  # threads per group: dequant.kern's THREADS
GROUP = 32  # weights per thread: one block group, or one affine group (the only affine group size read)

OUT_DTYPES = (mx.float32, mx.float16)  # what dequant.kern writes (its store_group overloads)


_DIMS: dict[tuple[int, int], mx.array] = {}  # (rows, in_dims) -> the dims input, made once a shape


def _dims(rows: int, in_dims: int) -> mx.array:
    """The launch's (rows, in_dims) input, kept: made anew at each call, it was an 8-byte array the CPU had just
    written, in MLX's read-mostly pool of small arrays on CUDA (dialect.device_constant)."""
    if (rows, in_dims) not in _DIMS:
        _DIMS[rows, in_dims] = device_constant([rows, in_dims], mx.int32)
    return _DIMS[rows, in_dims]


def _expand(kernel, inputs: list, template: list, rows: int, in_dims: int, dtype: mx.Dtype) -> mx.array | None:
    """One launch, a thread per group of 32 weights; None if this instantiation doesn't build here."""
    groups = rows * in_dims // GROUP
    inputs = [inputs[0], _dims(rows, in_dims), *inputs[1:]]

    def run():
        return kernel(inputs=inputs, template=template, grid=(-(-groups // THREADS) * THREADS, 1, 1),
                      threadgroup=(THREADS, 1, 1), output_shapes=[(rows, in_dims)], output_dtypes=[dtype])[0]

    signature = (*template, str(dtype), *(str(a.dtype) for a in inputs[2:]))  # (dtypes make instantiations)
    return run() if launches(kernel, signature, run) else None


def expand(weight: mx.array, ggml_type: int, in_dims: int, backend: str, dtype: mx.Dtype = mx.float32) -> mx.array | None:
    """The matrix (rows, in_dims) that ``weight``'s blocks stand for, in ``dtype`` (float32, or float16
    rounded to nearest from the float32 value), or None where no kernel runs."""
    if dtype not in OUT_DTYPES:
        return None
    if ggml_type not in STORED_BLOCK_TYPES or in_dims % quants.BLOCK_TYPES[ggml_type].block_elems:
        return None
    kind = kind_number(ggml_type)
    template = [("KIND", kind), ("BITS", 4)]  # (BITS: affine only)
    kernel = build("dequant", backend, ("NO_SCALES", *reader_variants([kind])))
    return _expand(kernel, [weight], template, weight.shape[0], in_dims, dtype)


def expand_affine(weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int, backend: str,
                  dtype: mx.Dtype = mx.float32) -> mx.array | None:
    """``mx.dequantize(weight, scales, biases, group_size, bits)`` (rows, in_dims) in ``dtype``: scale * code
    + offset in float32, then rounded to ``dtype`` once; or None where no kernel runs."""
    if dtype not in OUT_DTYPES or group_size != GROUP or not 1 <= bits <= 8 or weight.dtype != mx.uint32:
        return None
    rows, in_dims = scales.shape[0], scales.shape[1] * GROUP
    template = [("KIND", _KINDS["affine"]), ("BITS", bits)]
    kernel = build("dequant", backend, reader_variants([_KINDS["affine"]]))
    return _expand(kernel, [weight, scales, biases], template, rows, in_dims, dtype)
