"""Between the file formats and the model: ``load`` (file -> model), ``convert`` and ``export``.

The formats (rwkv_mlx/formats) turn bytes into named tensors and metadata; the
model (rwkv_mlx/model) knows no file format; this package wires one to the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import ModelFileError
from ..formats.pth import read_state_tuning
from ..model.state import register_state_tuning_reader
from ..model.weights import LoadOptions
from .gguf import load_gguf
from .info import LoadInfo
from .mlx_dir import load_mlx_dir

__all__ = ["LoadInfo", "load", "load_gguf", "load_mlx_dir"]

register_state_tuning_reader(read_state_tuning)  # State.from_state_tuning reads .pth files through it


def load(path: str | os.PathLike, options: LoadOptions | None = None, *, return_info: bool = False,
         progress: Callable[[int, int, str], None] | None = None):
    """Load a model and its tokenizer from a GGUF file or a converted MLX directory.

    ``model, tokenizer = rwkv_mlx.load("rwkv7-g1b-2.9b-Q4_K_M.gguf")``.  With
    ``return_info=True`` a third value says how long it took and what it holds.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(path, "a directory without config.json: not a converted rwkv-mlx model")
        result = load_mlx_dir(path, options, progress=progress)
    else:
        result = load_gguf(path, options, progress=progress)
    return result if return_info else result[:2]
