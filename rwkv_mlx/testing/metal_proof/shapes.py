"""Models of real shapes, built in memory with zero weights, for recording what they launch.

Launch plans and kernel texts depend on shapes, storage formats and dtypes,
never on weight values, so a block of the 2.9B or 7.2B shape costs only its
zero arrays (no GGUF file to write or quantize). Formats follow what the loader
makes of llama.cpp's file types on a GPU backend (``LoadOptions.for_backend``):
every block type as stored (GGUF blocks), the LoRA matrices float16 and decay's
float32, as in every oracle file; or, given a scale dtype, Q4_K and Q8_0 as MLX
affine codes of group 32 (as ``convert --quantize N --group-size 32`` writes them).
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from ...arch import MATRIX_MODULES, ModelArgs
from ...layers import WeightFormat
from ...model import Model

Q8_0, Q4_K, Q6_K = 8, 12, 14  # gguf.GGMLQuantizationType


def file_type_formats(file_type: str, n_layer: int, scale_dtype: str | None = None) -> dict[str, WeightFormat]:
    """Per-matrix storage of a model loaded from a llama.cpp file of ``file_type`` (Q4_K_M, Q8_0, F16):
    GGUF blocks as stored, or (``scale_dtype`` given) affine codes with scales of that dtype."""
    def quantized(ggml_type: int, bits: int) -> WeightFormat:
        if scale_dtype is None:
            return WeightFormat("ggml", ggml_type=ggml_type)
        return WeightFormat("affine", scale_dtype, bits=bits)

    if file_type == "F16":
        matrix = emb = head = WeightFormat("dense", "float16")
        ffn_value = matrix
    elif file_type == "Q8_0":
        matrix = emb = head = quantized(Q8_0, 8)
        ffn_value = matrix
    elif file_type == "Q4_K_M":  # llama-quantize: Q4_K, with Q6_K for the output and some ffn_down
        matrix = emb = quantized(Q4_K, 4)
        head = ffn_value = WeightFormat("ggml", ggml_type=Q6_K)
    else:
        raise ValueError(f"no format recipe for file type {file_type!r}")
    formats = {"emb": emb, "head": head}
    for i in range(n_layer):
        for m in MATRIX_MODULES:
            formats[f"blocks.{i}.{m}"] = ffn_value if (m == "ffn.value" and i == 0) else matrix
    return formats


def shaped_model(shape: ModelArgs, file_type: str, *, n_layer: int = 2, vocab: int = 512,
                 scale_dtype: str | None = None, overrides: dict[str, WeightFormat] | None = None) -> Model:
    """A model of ``shape``'s blocks (rwkv_mlx.testing.synthetic presets), n_layer of them, zero weights;
    ``overrides`` replace the recipe's format of the matrices they name."""
    args = replace(shape, vocab_size=vocab, n_layer=n_layer)
    formats = {**file_type_formats(file_type, n_layer, scale_dtype), **(overrides or {})}
    model = Model(args, formats, lora_dtype=mx.float16)
    mx.eval(model.parameters())
    return model
