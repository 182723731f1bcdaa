"""Loading what ``convert`` reads -- BlinkDL ``.pth`` files and Hugging Face directories -- directly.

The checkpoint is converted in memory, tensor by tensor, through the same
source readers as ``rwkv-mlx convert`` (convert.open_source: the restricted
unpickler of pth.py, so a hostile pickle is still refused before anything is
built) and the same per-tensor mapping as the GGUF loader (weights.py).  Nothing
is written to disk; ``rwkv-mlx convert`` once makes later loads faster.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A ``torch.save`` zip (.pth/.pt/.bin) or a Hugging Face directory: not a GGUF, not a converted directory.

    Cheap, and imports no reader: every load asks it first.
    """
    path = Path(path)
    if path.is_dir():
        from ..formats.hf import is_hf_dir

        return is_hf_dir(path)
    if not path.is_file():  # missing, a FIFO (opening it would block), a device: the GGUF loader says so
        return False
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:  # unreadable: the GGUF loader says so
        return False
    return magic != b"GGUF" and (magic[:2] == b"PK" or path.suffix in (".pth", ".pt", ".bin"))


def load_checkpoint(path: str | os.PathLike, options=None, progress: Callable[[int, int, str], None] | None = None):
    """``(model, tokenizer, LoadInfo)`` for a .pth file or a Hugging Face directory."""
    import mlx.core as mx

    from ..arch import matrix_weights
    from ..text.tokenizer import Tokenizer
    from .convert import open_source
    from .info import LoadInfo
    from ..model import Model
    from ..model.weights import FLOAT_TYPES, LORA_MATRICES, LoadOptions, convert_matrix, convert_small

    start = time.perf_counter()
    source = open_source(path)
    options = options or LoadOptions.for_backend()
    matrices = matrix_weights(source.args)
    formats, weights, types = {}, [], {}
    for done, (name, t) in enumerate(source.tensors.items(), 1):
        if name in matrices:
            fmt, arrays = convert_matrix(t.read(), t.info, options)
            layer = name[: -len(".weight")]
            formats[layer] = fmt
            named = {f"{layer}.{k}": v for k, v in arrays.items()}
        else:
            keep = options.float_dtype is None and name.rsplit(".", 1)[-1] in LORA_MATRICES
            named = {name: convert_small(t.read(), t.info, None if keep else "float32")}
        mx.eval(*named.values())
        weights += named.items()
        types[t.info.type_name] = types.get(t.info.type_name, 0) + 1
        if progress:
            progress(done, len(source.tensors), name)
    lora = source.tensors["blocks.0.att.a1"].info.ggml_type
    model = Model(source.args, formats, lora_dtype=getattr(mx, options.float_dtype or FLOAT_TYPES[lora]))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    model.keep_tables_on_device()
    model.fingerprint = source.fingerprint()
    info = LoadInfo(source.path, time.perf_counter() - start, sum(f.stat().st_size for f in source.files),
                    sum(v.nbytes for _, v in weights), types)
    tokens = source.tokens
    return model, Tokenizer.from_gguf(tokens.tokens, tokens.token_types, tokens.eot_token_id), info
