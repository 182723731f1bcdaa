"""A model in memory -> files other programs read: GGUF in llama.cpp's layout, and state files.

``export_gguf`` inverts the loader: every module path maps back to its GGUF
tensor name (``arch.gguf_to_module_name``), matrices in any storage form are
taken back to float32 (``rows`` dequantizes exactly), the fused token-shift
factors get llama.cpp's (6, 1, 1, C) shape, and layer 0's unused value-residual
LoRA is written as the copy of the in-context-rate LoRA that llama.cpp's
converter writes.  ``gguf_writer`` then encodes each tensor in the file type's
per-tensor types, so the file runs in llama.cpp as well as here.

``export_state`` writes a trained initial state (state tuning) with
``State.save``, tagged so that generation and chat can load it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..formats.gguf_writer import write_rwkv7_gguf
from ..arch import LAYER0_COPIES, gguf_tensor_shapes, gguf_to_module_name
from ..model import Model
from ..model.state import State

STATE_TUNING_KIND = "state-tuning"


def module_at(model, path: str):
    """The submodule or parameter at a dotted path (``blocks.3.att.key``)."""
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def dense_weight(layer) -> mx.array:
    """A matrix layer's weight as float32 (out, in), whatever its storage (dense, affine, GGUF blocks, adapted)."""
    out_dims = getattr(layer, "out_dims", None) or layer.weight.shape[0]
    return layer.rows(mx.arange(out_dims))


def gguf_tensors(model: Model) -> dict[str, Callable[[], np.ndarray]]:
    """GGUF tensor name -> producer of its float32 numpy value (produced lazily, one at a time)."""
    shapes = gguf_tensor_shapes(model.args)

    def producer(name: str, shape: tuple[int, ...]):
        layer_rest = name.split(".", 2)
        if layer_rest[0] == "blk" and layer_rest[1] == "0" and layer_rest[2] in LAYER0_COPIES:
            name = f"blk.0.{LAYER0_COPIES[layer_rest[2]]}"  # the copy llama.cpp's converter writes
        path = gguf_to_module_name(name)
        if path.endswith(".weight") and hasattr(module_at(model, path[: -len(".weight")]), "rows"):
            get = lambda: dense_weight(module_at(model, path[: -len(".weight")]))  # noqa: E731
        else:
            get = lambda: module_at(model, path)  # noqa: E731

        def make() -> np.ndarray:
            value = get().astype(mx.float32)
            mx.eval(value)
            return np.asarray(value).reshape(shape)

        return make

    return {name: producer(name, shape) for name, shape in shapes.items()}


def tokenizer_tokens(tokenizer) -> dict[int, bytes] | None:
    """id -> bytes of every text token (None: the world vocabulary shipped with rwkv-mlx)."""
    if tokenizer is None:
        return None
    return {i: b for i in range(1, tokenizer.vocab_size) if (b := tokenizer.token_bytes(i))}


def export_gguf(model: Model, path: str | os.PathLike, file_type: str = "F16", *, tokenizer=None,
                name: str = "rwkv7", progress: Callable[[int, int, str, str], None] | None = None):
    """Write ``model`` as an RWKV-7 GGUF of ``file_type`` (F32, F16, Q8_0, Q4_K_M, ...).

    Returns the per-tensor GGML types written.  LoRA adapters must be merged
    first (``train.lora.merge_lora``).  The file is written atomically.
    """
    return write_rwkv7_gguf(path, model.args, gguf_tensors(model), file_type,
                            tokens=tokenizer_tokens(tokenizer), name=name, progress=progress)


def export_state(state: State, path: str | os.PathLike, model: Model, metadata: dict[str, str] | None = None) -> Path:
    """Write a trained initial state (batch 1) as an rwkv-mlx state file for ``model``."""
    return state.save(path, model, metadata={"kind": STATE_TUNING_KIND, **(metadata or {})})
