"""Pieces every command shares: device choice, loading with progress, tables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..errors import InvalidArgumentError, ModelFileError
from ..progress import Progress

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "rwkv7-demo-shakespeare.gguf"


def select_device(device: str) -> None:
    if device == "cpu":
        mx.set_default_device(mx.cpu)
    elif device == "gpu":
        if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
            raise InvalidArgumentError("--device gpu: no GPU backend in this MLX build (install rwkv-mlx[cuda] on NVIDIA)")
        mx.set_default_device(mx.gpu)
    elif device != "auto":
        raise InvalidArgumentError(f"--device must be auto, gpu or cpu, got {device!r}")


def resolve_model(path: Path | None) -> Path:
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise ModelFileError(DEFAULT_MODEL, "the bundled demo model is missing from this installation; pass --model")
        return DEFAULT_MODEL
    return path


def load_for_cli(path: Path | None, *, scale_dtype: str = "float32", quiet: bool = False):
    from ..loader import load
    from ..weights import LoadOptions

    if scale_dtype not in ("float32", "float16", "bfloat16"):
        raise InvalidArgumentError(f"--scale-dtype must be float32, float16 or bfloat16, got {scale_dtype!r}")
    path = resolve_model(path)
    bar = Progress(f"loading {path.name}", 1, enabled=not quiet)
    model, tokenizer, info = load(path, LoadOptions.for_backend(scale_dtype=scale_dtype), return_info=True,
                                  progress=lambda done, total, name: (setattr(bar, "total", total), bar.update(done, name)))
    bar.close(f"{info.weight_bytes / 1e6:.1f} MB of weights")
    return model, tokenizer, info


def print_table(rows: Sequence[tuple[str, str]], stream=None, header: tuple[str, str] | None = None) -> None:
    """A two-column table; markdown-compatible so it can be pasted into results/."""
    stream = stream or sys.stdout
    header = header or ("metric", "value")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows))
    w1 = max(len(header[1]), *(len(r[1]) for r in rows))
    stream.write(f"| {header[0]:<{w0}} | {header[1]:<{w1}} |\n|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|\n")
    for a, b in rows:
        stream.write(f"| {a:<{w0}} | {b:<{w1}} |\n")
    stream.flush()
