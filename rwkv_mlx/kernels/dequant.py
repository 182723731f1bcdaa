"""GGUF blocks expanded to a dense float32 or float16 matrix in one launch (custom_kernels/dequant.kern).

A prompt's products multiply blocks kept as stored (``layers.GGMLLinear``) by the expanded matrix;
this is that expansion on a GPU, by the decode kernels' own block readers. ``kernels.expand_blocks``
hands it to the layers, which fall back to plain MLX operations (``quants.dequantize``) where it
doesn't run: on the CPU, inside ``kernels_disabled()``, or for a type the readers don't know.
"""

from __future__ import annotations

import mlx.core as mx

from .. import quants
from .dialect import build, launches
from .matvec import STORED_BLOCK_TYPES, kind_number

THREADS = 256  # threads per group: dequant.kern's THREADS


OUT_DTYPES = (mx.float32, mx.float16)  # what dequant.kern writes (its store_group overloads)


def expand(weight: mx.array, ggml_type: int, in_dims: int, backend: str, dtype: mx.Dtype = mx.float32) -> mx.array | None:
    """The matrix (rows, in_dims) that ``weight``'s blocks stand for, in ``dtype`` (float32, or float16
    rounded to nearest from the float32 value), or None where no kernel runs."""
    if dtype not in OUT_DTYPES:
        return None
    if ggml_type not in STORED_BLOCK_TYPES or in_dims % quants.BLOCK_TYPES[ggml_type].block_elems:
        return None
    kernel = build("dequant", backend)
    rows = weight.shape[0]
    groups = rows * in_dims // 32
    template = [("KIND", kind_number(ggml_type))]  # (the output dtype makes its own instantiation)

    def run():
        return kernel(inputs=[weight, mx.array([rows, in_dims], dtype=mx.int32)], template=template,
                      grid=(-(-groups // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                      output_shapes=[(rows, in_dims)], output_dtypes=[dtype])[0]

    return run() if launches(kernel, (*template, str(dtype)), run) else None
