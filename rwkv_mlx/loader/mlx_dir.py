"""Load a converted directory (formats/mlx_dir.py) into a model: ``load_mlx_dir``.

Loading is ``mx.load`` of the shards plus at most one cast per tensor that the
``LoadOptions`` ask for (float32 on the CPU); only ``ggml`` layers where no kernel
runs go through numpy, to take the form a GGUF file's blocks take under the same
options (affine codes or float32, weights.convert_matrix).  ``mx.load`` (MLX 0.32) does not
memory-map safetensors: it returns lazy arrays and reads each one from the file
into MLX memory when first evaluated (checked: resident memory grows by the
file size on eval, the file is not in ``/proc/self/maps``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .. import quants
from ..arch import LORA_MATRICES
from ..errors import ModelFileError
from ..formats.hf import read_safetensors
from ..formats.mlx_dir import dtype_name, format_label, model_description, read_config
from ..formats.vocab import load_world_vocab
from ..layers import WeightFormat
from ..model import Model
from ..model.weights import LoadOptions, convert_matrix
from ..text.tokenizer import Tokenizer
from .info import LoadInfo


def load_tokenizer(path: Path, entry: dict) -> Tokenizer:
    file = path / str(entry.get("file", ""))
    vocab_size = int(entry["vocab_size"])
    eot = entry.get("eot_token_id")
    if entry.get("full_world_vocab"):
        return Tokenizer(load_world_vocab(file), vocab_size, eot)
    try:
        payload = json.loads(file.read_text())
        return Tokenizer.from_gguf(payload["tokens"], payload.get("token_types"), eot)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(file, f"unreadable token list ({e})") from None


@dataclass(frozen=True)
class _Blocks:
    """A stored ``ggml`` matrix as weights.convert_matrix sees a GGUF tensor."""

    ggml_type: int
    shape: tuple[int, int]


def _adapt_matrix(fmt: WeightFormat, arrays: dict[str, mx.array], opts: LoadOptions):
    """A stored matrix in the form ``opts`` asks for (mirrors weights.convert_matrix for GGUF)."""
    float_dtype = opts.float_dtype
    if fmt.kind == "ggml" and not (opts.ggml_native and opts.keep_blocks):
        # GGUF blocks where no kernel reads them (or the affine GPU form): the form a GGUF's blocks take here
        block = quants.BLOCK_TYPES[fmt.ggml_type]
        raw = np.array(arrays["weight"])
        shape = (raw.shape[0], raw.shape[1] // block.block_bytes * block.block_elems)
        return convert_matrix(raw, _Blocks(fmt.ggml_type, shape), opts)
    if fmt.kind == "affine" and not opts.affine:
        dense = mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group_size=fmt.group_size, bits=fmt.bits)
        dtype = float_dtype or "float32"
        return WeightFormat("dense", dtype), {"weight": dense.astype(getattr(mx, dtype))}
    if fmt.kind == "affine" and fmt.dtype != opts.scale_dtype:
        cast = getattr(mx, opts.scale_dtype)
        return (WeightFormat("affine", opts.scale_dtype, bits=fmt.bits, group_size=fmt.group_size),
                {**arrays, "scales": arrays["scales"].astype(cast), "biases": arrays["biases"].astype(cast)})
    if fmt.kind == "dense" and float_dtype and fmt.dtype != float_dtype:
        return WeightFormat("dense", float_dtype), {"weight": arrays["weight"].astype(getattr(mx, float_dtype))}
    return fmt, arrays


def load_mlx_dir(path: str | os.PathLike, options: LoadOptions | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> tuple[Model, Tokenizer, LoadInfo]:
    """Load a directory written by ``save_mlx_dir``: ``(model, tokenizer, LoadInfo)``."""
    start = time.perf_counter()
    path = Path(path)
    config = read_config(path)
    options = options or LoadOptions.for_backend()
    args, formats = model_description(path, config)
    tokenizer = load_tokenizer(path, config["tokenizer"])

    stored: dict[str, mx.array] = {}
    file_bytes = 0
    for name in config["weights"]:
        file = path / str(name)
        if not file.is_file() or file.parent != path:
            raise ModelFileError(file, "weight file listed in config.json is missing")
        read_safetensors(file)  # bounds-checks the header against the file before MLX reads it
        try:
            stored.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise ModelFileError(file, f"unreadable safetensors ({e})") from None
        file_bytes += file.stat().st_size

    total = len(formats) + 1
    final_formats: dict[str, WeightFormat] = {}
    weights: list[tuple[str, mx.array]] = []
    types: dict[str, int] = {}
    for i, (module, fmt) in enumerate(formats.items(), 1):
        arrays = {k: stored.pop(f"{module}.{k}") for k in ("weight", "scales", "biases") if f"{module}.{k}" in stored}
        if "weight" not in arrays:
            raise ModelFileError(path, f"no weights for {module}")
        fmt, arrays = _adapt_matrix(fmt, arrays, options)
        final_formats[module] = fmt
        types[format_label(fmt)] = types.get(format_label(fmt), 0) + 1
        weights += [(f"{module}.{k}", v) for k, v in arrays.items()]
        if progress:
            progress(i, total, module)

    lora_dtype = options.float_dtype or config.get("lora_dtype", "float32")
    for name, array in stored.items():
        leaf = name.rsplit(".", 1)[-1]
        target = lora_dtype if leaf in LORA_MATRICES else "float32"
        if dtype_name(array.dtype) != target:
            array = array.astype(getattr(mx, target))
        weights.append((name, array))
    types["float (small)"] = len(stored)

    model = Model(args, final_formats, lora_dtype=getattr(mx, lora_dtype))
    try:
        model.load_weights(weights, strict=True)
        mx.eval(model.parameters())
        model.keep_tables_on_device()
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(path, f"weights do not fit the model in config.json ({e})") from None
    model.fingerprint = str(config.get("fingerprint", ""))
    if progress:
        progress(total, total, "done")
    weight_bytes = sum(v.nbytes for _, v in weights)
    return model, tokenizer, LoadInfo(path, time.perf_counter() - start, file_bytes, weight_bytes, types)
