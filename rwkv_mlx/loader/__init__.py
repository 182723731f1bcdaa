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
from .checkpoint import is_checkpoint, load_checkpoint
from .gguf import load_gguf
from .hub import resolve_model
from .info import LoadInfo
from .mlx_dir import load_mlx_dir

__all__ = ["DEMO_MODEL", "LoadInfo", "demo_model", "load", "load_gguf", "load_mlx_dir"]

register_state_tuning_reader(read_state_tuning)  # State.from_state_tuning reads .pth files through it


# the 4-layer model trained on Tiny Shakespeare that ships in the package (scripts/train_demo_model.py)
DEMO_MODEL = Path(__file__).resolve().parents[1] / "data" / "rwkv7-demo-shakespeare.gguf"


def demo_model() -> Path:
    """The bundled demo model's path, or ModelFileError where an installation lacks it."""
    if not DEMO_MODEL.is_file():
        raise ModelFileError(DEMO_MODEL, "the bundled demo model is missing from this installation; name a model to load")
    return DEMO_MODEL


def load(path: str | os.PathLike | None = None, options: LoadOptions | None = None, *, return_info: bool = False,
         progress: Callable[[int, int, str], None] | None = None, file: str | None = None):
    """Load a model and its tokenizer from a GGUF file, a converted MLX directory, a .pth file,
    a Hugging Face directory (both converted in memory, checkpoint.py) or a Hub repo.

    ``model, tokenizer = rwkv_mlx.load("rwkv7-g1b-2.9b-Q4_K_M.gguf")``; ``"ORG/REPO"``,
    ``"ORG/REPO:Q4_K_M"`` or ``("ORG/REPO", file="NAME")`` download from the Hugging Face
    Hub (hub.py); no path loads the bundled demo model, as the commands do without --model.
    With ``return_info=True`` a third value says how long it took and what it holds.
    """
    path = resolve_model(demo_model() if path is None else path, file)
    if is_checkpoint(path):  # what `convert` reads (.pth, Hugging Face directory), converted in memory
        result = load_checkpoint(path, options, progress=progress)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(path, "a directory without config.json: not a converted rwkv-mlx model")
        result = load_mlx_dir(path, options, progress=progress)
    else:
        result = load_gguf(path, options, progress=progress)
    return result if return_info else result[:2]
