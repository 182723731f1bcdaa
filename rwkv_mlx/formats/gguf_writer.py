"""Write RWKV-7 GGUF files in llama.cpp's exact layout (synthetic models, fixtures, exports).

``write_rwkv7_gguf`` produces what llama.cpp's converter (``F32``/``F16`` files) or the
converter followed by ``llama-quantize`` from the F16 file (every other file type, BF16
included) would write for the same weights: tensor names, shapes, per-tensor types,
tensor order, metadata keys, their types and order, and the RWKV world token list.

Per-tensor type policy (``tensor_type``), checked against every oracle file written by
real llama.cpp (spec 3.3 items 7-9):

* converter: 1-D tensors, ``*_norm.weight``, names not ending in ``.weight``,
  ``time_mix_w1``/``time_mix_w2``/``time_mix_lerp_fused`` -> F32; everything else -> the
  base type (F32 in an F32 file, F16 otherwise: the quantized files are made from F16).
* llama-quantize touches only >= 2-D ``*.weight`` tensors that are not norms and not RWKV
  small tensors (w0/w1/w2, a0/a1/a2, v0/v1/v2, g1/g2, lerp_fused): token_embd, output,
  time_mix_{receptance,key,value,output}, channel_mix_{key,value}.  They get the file's
  type (Q4_K for Q4_K_M, Q5_K for Q5_K_M, Q3_K for Q3_K_M, ...; the ``_M`` bumps key on
  names like ``attn_v``/``ffn_down`` that RWKV tensors never match), except
  ``output.weight``: Q6_K unless the file type is Q8_0 (then Q8_0), or Q8_0 when its row
  length is not a multiple of the file type's block.  BF16 is applied the same way, so a
  BF16 file keeps its a/v/g LoRA matrices in F16 (as the oracle's does).
* a 256-block type on a row length (ne0) that is not a multiple of 256 falls back per
  tensor: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K/IQ4_XS -> IQ4_NL (F16 if
  not even a multiple of 32).  E.g. the oracle fixb (n_embd 128, ffn 512) Q4_K_M file has
  Q5_0 everywhere but ``channel_mix_value`` (ne0 = ffn = 512: Q4_K) and output Q8_0.

Tensor order: converter order for F32/F16 files, llama.cpp's loader order (non-block
tensors first, then by layer, by name within a group) for quantized files.  Metadata:
as the oracle files, including ``tokenizer.ggml.bos_token_id``/``eos_token_id`` = 0;
``general.file_type`` sits after ``feed_forward_length`` in converter files and at the
end (after ``general.quantization_version`` = 2) in quantized ones.  The chat template
is written only when given.

Writing streams: tensor infos are laid out from the shapes first, then every tensor is
produced (``tensors`` values may be zero-argument callables), encoded and written one at
a time, so peak memory is about one float32 tensor.  The file is written to a temporary
name beside ``path`` and renamed at the end; it is removed on any exception.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, LlamaFileType, TokenType

from .. import quants
from ..arch import (ARCHITECTURE, CONTEXT_LENGTH_KEY, HEAD_COUNT_KEY, METADATA_KEYS, ModelArgs, check_model_args,
                    gguf_tensor_shapes)
from ..errors import InvalidArgumentError, ModelFileError
from ..io import atomic_write
from .vocab import BUNDLED_WORLD_VOCAB, escape_gguf_token, load_world_vocab

__all__ = [
    "FILE_TYPES",
    "CONTEXT_LENGTH",
    "EOT_TOKEN_ID",
    "tensor_type",
    "tensor_types",
    "quantized_order",
    "gguf_token_list",
    "write_rwkv7_gguf",
]

CONTEXT_LENGTH = 1048576  # llama.cpp's placeholder: RWKV is not context limited
EOT_TOKEN_ID = 261  # "\n\n"


class _FileType:
    def __init__(self, ftype: LlamaFileType, default: T | None, base: T = T.F16):
        self.ftype = ftype
        self.default = default  # None: a converter file (no llama-quantize step)
        self.base = base


FILE_TYPES: dict[str, _FileType] = {
    "F32": _FileType(LlamaFileType.ALL_F32, None, T.F32),
    "F16": _FileType(LlamaFileType.MOSTLY_F16, None),
    "BF16": _FileType(LlamaFileType.MOSTLY_BF16, T.BF16),
    "Q8_0": _FileType(LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "Q4_0": _FileType(LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": _FileType(LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
    "Q5_0": _FileType(LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": _FileType(LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
    "Q4_K_M": _FileType(LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_M": _FileType(LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": _FileType(LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    "Q3_K_M": _FileType(LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K),
    "Q2_K": _FileType(LlamaFileType.MOSTLY_Q2_K, T.Q2_K),
    "IQ4_NL": _FileType(LlamaFileType.MOSTLY_IQ4_NL, T.IQ4_NL),
    "IQ4_XS": _FileType(LlamaFileType.MOSTLY_IQ4_XS, T.IQ4_XS),
}

_FORCED_F32 = ("time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight")
_RWKV_SMALL = tuple(
    f"time_mix_{n}.weight" for n in ("w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2", "lerp_fused")
)
_K_FALLBACK = {T.Q2_K: T.IQ4_NL, T.Q3_K: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

TensorSource = Union[np.ndarray, Callable[[], np.ndarray]]


# --------------------------------------------------------------------------------------
# shapes and types


def _checked_args(args: ModelArgs) -> ModelArgs:
    if not isinstance(args, ModelArgs):
        raise InvalidArgumentError(f"the model's shape must be a ModelArgs, got {type(args).__name__}")
    check_model_args(args)
    return args


def _file_type(file_type: str) -> _FileType:
    try:
        return FILE_TYPES[file_type]
    except KeyError:
        raise InvalidArgumentError(f"file type {file_type!r} is not one of {', '.join(FILE_TYPES)}") from None


def _converter_type(name: str, shape: Sequence[int], base: T) -> T:
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    if name.endswith(_FORCED_F32):
        return T.F32
    return base


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    return (
        name.endswith("weight")
        and len(shape) >= 2
        and not name.endswith("_norm.weight")
        and not name.endswith(_RWKV_SMALL)
    )


def tensor_type(name: str, shape: Sequence[int], file_type: str) -> T:
    """The GGML type llama.cpp gives tensor ``name`` (numpy ``shape``) in a ``file_type`` file."""
    ft = _file_type(file_type)
    t = _converter_type(name, shape, ft.base)
    if ft.default is None or t == T.F32 or not _quantizable(name, shape):
        return t
    new = ft.default
    ne0 = int(shape[-1])
    if ft.default != T.BF16 and quants.BLOCK_TYPES[ft.default].block_elems > 1:
        if name == "output.weight":
            if ne0 % quants.BLOCK_TYPES[ft.default].block_elems:
                new = T.Q8_0
            elif ft.default != T.Q8_0:
                new = T.Q6_K
        if new in _K_FALLBACK and ne0 % 256:
            new = _K_FALLBACK[new]
        if ne0 % quants.BLOCK_TYPES[new].block_elems:
            new = T.F16
    return new


def tensor_types(shapes: Mapping[str, Sequence[int]], file_type: str) -> dict[str, T]:
    return {name: tensor_type(name, shape, file_type) for name, shape in shapes.items()}


def _layer_key(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def quantized_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's loader order (what llama-quantize writes): non-block tensors, then by layer; by name within."""
    return sorted(names, key=_layer_key)


# --------------------------------------------------------------------------------------
# tokens


@functools.lru_cache(maxsize=1)
def _world_vocab() -> dict[int, bytes]:
    return load_world_vocab(BUNDLED_WORLD_VOCAB)


def gguf_token_list(n_vocab: int, tokens=None) -> tuple[list[str], list[int]]:
    """(tokens, token types) as llama.cpp's converter stores the RWKV world vocabulary.

    ``tokens``: ``None`` (the world vocabulary shipped with rwkv-mlx), a path to a
    ``rwkv_vocab_v20230424.txt``-style file, a mapping id -> bytes, or a sequence of bytes
    indexed by id.  Id 0 is always ``<s>`` (CONTROL); ids without a token become
    ``[PAD<id>]`` (UNUSED); ids at or beyond ``n_vocab`` are dropped.
    """
    if tokens is None:
        tokens = _world_vocab()
    if isinstance(tokens, (str, os.PathLike)):
        tokens = load_world_vocab(tokens)
    if isinstance(tokens, Mapping):
        table = {int(k): v for k, v in tokens.items()}
    else:
        table = dict(enumerate(tokens))
    out, types = ["<s>"], [int(TokenType.CONTROL)]
    for i in range(1, n_vocab):
        tok = table.get(i)
        if tok is None:
            out.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            if not isinstance(tok, (bytes, bytearray)):
                raise InvalidArgumentError(f"token {i} is {type(tok).__name__}, expected bytes")
            out.append(escape_gguf_token(bytes(tok)))
            types.append(int(TokenType.NORMAL))
    return out, types


# --------------------------------------------------------------------------------------
# the writer


def _byte_shape(shape: tuple[int, ...], qtype: T) -> tuple[int, ...]:
    bt = quants.BLOCK_TYPES[qtype]
    return (*shape[:-1], shape[-1] // bt.block_elems * bt.block_bytes)


def _encode(name: str, array, shape: tuple[int, ...], qtype: T) -> np.ndarray:
    w = np.asarray(array)
    if w.shape != shape:
        raise InvalidArgumentError(f"tensor {name} has shape {w.shape}, expected {shape}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise InvalidArgumentError(f"tensor {name} holds NaN or infinite values")
    if qtype == T.F32:
        return w
    if qtype == T.F16:
        if np.abs(w).max(initial=0.0) > 65504.0:
            raise InvalidArgumentError(f"tensor {name} has values beyond the float16 range")
        return w.astype(np.float16)
    rows = w.reshape((-1, shape[-1]))
    return quants.quantize(rows, qtype).reshape(_byte_shape(shape, qtype))


def write_rwkv7_gguf(
    path: str | os.PathLike,
    args: ModelArgs,
    tensors: Mapping[str, TensorSource],
    file_type: str = "F16",
    tokens: Sequence[bytes] | Mapping[int, bytes] | str | os.PathLike | None = None,
    name: str = "rwkv7",
    progress: Callable[[int, int, str, str], None] | None = None,
    chat_template: str | None = None,
) -> dict[str, T]:
    """Write an RWKV-7 GGUF file as llama.cpp lays it out; returns the per-tensor GGML types.

    ``args``: the model's shape (rwkv_mlx.arch.ModelArgs).  ``tensors``: GGUF tensor name ->
    float32 array in numpy shape (spec 3.3; lerp_fused (6, 1, 1, C)) or a zero-argument
    callable producing it (called once, when the tensor is written).  Every tensor of
    ``arch.gguf_tensor_shapes(args)`` must be present and no other.  ``progress(i, n, name, type)``
    is called after each tensor is written.  Returns {tensor name: GGML type written}.
    Raises InvalidArgumentError for inconsistent input, ModelFileError when the file cannot
    be written; ``path`` is left untouched in both cases.
    """
    path = Path(path)
    ft = _file_type(file_type)
    args = _checked_args(args)
    shapes = gguf_tensor_shapes(args)
    missing = [n for n in shapes if n not in tensors]
    extra = [n for n in tensors if n not in shapes]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise InvalidArgumentError(f"tensors do not match an RWKV-7 model of this shape: {'; '.join(parts)}")
    types = tensor_types(shapes, file_type)
    order = list(shapes) if ft.default is None else quantized_order(list(shapes))
    tok_list, tok_types = gguf_token_list(args.vocab_size, tokens)

    try:
        with atomic_write(path) as tmp:
            writer = GGUFWriter(tmp, ARCHITECTURE)
            try:
                writer.add_name(name)
                writer.add_uint32(CONTEXT_LENGTH_KEY, CONTEXT_LENGTH)
                for field, key in METADATA_KEYS.items():
                    value = getattr(args, field)
                    if field == "norm_eps":
                        writer.add_float32(key, float(value))
                    else:
                        writer.add_uint32(key, int(value))
                if ft.default is None:
                    writer.add_file_type(int(ft.ftype))
                writer.add_uint32(HEAD_COUNT_KEY, 0)
                writer.add_tokenizer_model("rwkv")
                writer.add_token_list(tok_list)
                writer.add_token_types(tok_types)
                writer.add_bos_token_id(0)
                writer.add_eos_token_id(0)
                writer.add_eot_token_id(EOT_TOKEN_ID)
                if chat_template:
                    writer.add_chat_template(chat_template)
                if ft.default is not None:
                    writer.add_quantization_version(2)
                    writer.add_file_type(int(ft.ftype))

                for tname in order:
                    shape, qtype = shapes[tname], types[tname]
                    if qtype == T.F32:
                        writer.add_tensor_info(tname, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
                    elif qtype == T.F16:
                        writer.add_tensor_info(tname, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
                    else:
                        bshape = _byte_shape(shape, qtype)
                        writer.add_tensor_info(tname, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qtype)

                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for i, tname in enumerate(order):
                    src = tensors[tname]
                    array = src() if callable(src) else src
                    data = _encode(tname, array, shapes[tname], types[tname])
                    del array
                    writer.write_tensor_data(data)
                    del data
                    if progress is not None:
                        progress(i + 1, len(order), tname, types[tname].name)
            finally:
                writer.close()
    except OSError as e:
        raise ModelFileError(path, f"cannot write ({e.strerror or e})") from e
    return types
