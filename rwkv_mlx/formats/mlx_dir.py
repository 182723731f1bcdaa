"""Converted model directories (``rwkv-mlx convert``): the layout, writing it, reading its parts.

rwkv_mlx/loader/mlx_dir.py builds a model from what this module reads.

A directory holds

* ``config.json``: ``format``/``format_version``, the architecture, ``model_args``
  (``ModelArgs``), ``weight_formats`` (module path -> ``WeightFormat.to_dict()``
  for every matrix), ``lora_dtype``, the quantization recipe, the source (file
  name, format, sha256, fingerprint), the tokenizer facts and the rwkv-mlx version;
* ``model.safetensors`` (or ``model-0000K-of-0000N.safetensors`` shards): every
  model parameter under its module path, in the form the model uses it --
  ``.weight``/``.scales``/``.biases`` for affine layers (MLX's packed layout),
  raw uint8 GGUF blocks for ``ggml`` layers (a kept GGUF's block types, as stored:
  GPUs read them so, the CPU maps them at load as it maps a GGUF's), float
  arrays for the rest;
* the tokenizer: ``rwkv_vocab_v20230424.txt`` when it is the full world
  vocabulary, else ``tokenizer_tokens.json`` (the GGUF token list and types).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx

from .. import quants
from ..arch import ARCHITECTURE, LORA_MATRICES, ModelArgs, check_model_file_args
from ..errors import ModelFileError, UnsupportedModelError
from ..layers import WeightFormat
from ..version import __version__
from .hf import read_safetensors, write_safetensors
from .vocab import BUNDLED_WORLD_VOCAB, WORLD_VOCAB_FILE_NAME, WORLD_VOCAB_SIZE, unescape_gguf_token

FORMAT = "rwkv-mlx"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
TOKENS_FILE_NAME = "tokenizer_tokens.json"
SHARD_BYTES = 1 << 30  # default; the arrays of one shard are held in memory until it is written


@dataclass(frozen=True)
class TokenList:
    """A model's vocabulary in llama.cpp's GGUF form: escaped token texts, token types and the eot id.

    Every source reduces to this (a GGUF carries it; .pth and HF checkpoints get
    the world vocabulary, truncated to the model's vocabulary size).
    """

    tokens: list[str]
    token_types: list[int] | None
    eot_token_id: int | None

    @classmethod
    def world(cls, vocab_size: int, vocab_file: Path | None = None, eot_token_id: int = 261) -> "TokenList":
        from .gguf_writer import gguf_token_list

        tokens, types = gguf_token_list(vocab_size, vocab_file)
        return cls(tokens, types, eot_token_id if eot_token_id < vocab_size else None)

    def is_full_world_vocab(self) -> bool:
        """True when this is exactly the 65536-entry world vocabulary as llama.cpp stores it."""
        if len(self.tokens) != WORLD_VOCAB_SIZE:
            return False
        world = TokenList.world(WORLD_VOCAB_SIZE)
        return self.tokens == world.tokens and (self.token_types is None or list(self.token_types) == world.token_types)

    def text_tokens(self) -> dict[int, bytes]:
        """Token id -> bytes for the entries that match text (not end-of-text, control or padding)."""
        skip = {3, 5}  # gguf TokenType CONTROL, UNUSED
        types = self.token_types or [1] * len(self.tokens)
        return {i: unescape_gguf_token(t) for i, t in enumerate(self.tokens) if i and int(types[i]) not in skip}


# --------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class ConvertedTensor:
    """One model parameter in its output form: a matrix (``fmt`` set) or a small array (``fmt`` None)."""

    name: str  # parameter path: "blocks.0.att.key.weight", "blocks.0.att.w1", ...
    fmt: WeightFormat | None
    arrays: dict[str, mx.array]  # matrix: {"weight", ["scales", "biases"]}; small: {"": array}
    note: str = ""  # what happened to it, for the conversion table
    rel_error: float | None = None  # relative RMS error of a lossy step, None if exact

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.fmt is not None else self.name

    def named_arrays(self) -> dict[str, mx.array]:
        if self.fmt is None:
            return {self.name: self.arrays[""]}
        return {f"{self.module}.{k}": v for k, v in self.arrays.items()}


def write_tokenizer(out_dir: Path, tokens: TokenList, vocab_file: Path | None = None) -> dict:
    """Write the vocabulary beside the weights; returns config.json's ``tokenizer`` entry."""
    entry = {"vocab_size": len(tokens.tokens), "eot_token_id": tokens.eot_token_id}
    if tokens.is_full_world_vocab():
        shutil.copyfile(vocab_file or BUNDLED_WORLD_VOCAB, out_dir / WORLD_VOCAB_FILE_NAME)
        return {**entry, "file": WORLD_VOCAB_FILE_NAME, "full_world_vocab": True}
    payload = {"tokens": tokens.tokens, "token_types": tokens.token_types}
    (out_dir / TOKENS_FILE_NAME).write_text(json.dumps(payload, ensure_ascii=False))
    return {**entry, "file": TOKENS_FILE_NAME, "full_world_vocab": False}


class ShardWriter:
    """Collects named arrays and writes them as safetensors shards of about ``SHARD_BYTES``."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES, prefix: str = "model",
                 on_write: Callable[[str], None] | None = None):
        self.out_dir, self.shard_bytes, self.prefix, self.on_write = out_dir, shard_bytes, prefix, on_write
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, arrays: dict[str, mx.array]) -> None:
        for name, array in arrays.items():
            if self.pending and self.pending_bytes + array.nbytes > self.shard_bytes:
                self.flush()
            self.pending[name] = array
            self.pending_bytes += array.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        if self.on_write:
            self.on_write(name)
        self.total_bytes += write_safetensors(self.out_dir / name, self.pending, {"format": "mlx"})
        self.files.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending; name a single shard ``model.safetensors``, else add the HF index."""
        self.flush()
        if len(self.files) == 1:
            single = f"{self.prefix}.safetensors"
            os.replace(self.out_dir / self.files[0], self.out_dir / single)
            self.weight_map = {k: single for k in self.weight_map}
            self.files = [single]
            return self.files
        n = len(self.files)
        renamed = {}
        for i, old in enumerate(self.files, 1):
            new = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / old, self.out_dir / new)
            renamed[old] = new
        self.files = [renamed[f] for f in self.files]
        self.weight_map = {k: renamed[v] for k, v in self.weight_map.items()}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return self.files


def save_mlx_dir(
    out_dir: str | os.PathLike,
    args: ModelArgs,
    tensors: Iterable[ConvertedTensor],
    tokens: TokenList,
    *,
    source: dict | Callable[[], dict],
    quantization: dict,
    fingerprint: str,
    vocab_file: Path | None = None,
    on_tensor: Callable[[ConvertedTensor], None] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Write a converted model into the (empty, existing) directory ``out_dir``; returns its config.

    ``tensors`` is consumed one at a time (each is written with its shard), so
    a model larger than memory converts in about one shard of memory.
    ``on_tensor`` sees each tensor after it is queued (progress, error tables).
    ``source`` may be a callable, called once the tensors are written (a hash
    of the source computed meanwhile).
    """
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, shard_bytes)
    formats: dict[str, dict] = {}
    lora_dtype = None
    for t in tensors:
        if t.fmt is not None:
            formats[t.module] = t.fmt.to_dict()
        elif t.name.rsplit(".", 1)[-1] in LORA_MATRICES:
            lora_dtype = lora_dtype or dtype_name(t.arrays[""].dtype)
        writer.add(t.named_arrays())
        if on_tensor:
            on_tensor(t)
    files = writer.close()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "rwkv_mlx_version": __version__,
        "model_args": args.to_dict(),
        "weight_formats": formats,
        "lora_dtype": lora_dtype or "float32",
        "quantization": quantization,
        "source": source() if callable(source) else source,
        "fingerprint": fingerprint,
        "tokenizer": write_tokenizer(out_dir, tokens, vocab_file),
        "weights": files,
        "weight_bytes": writer.total_bytes,
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return config


def dtype_name(dtype: mx.Dtype) -> str:
    """'float16' for mx.float16."""
    return str(dtype).rsplit(".", 1)[-1]


# --------------------------------------------------------------------------------------
# reading


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a converted directory, checked to be ours and readable by this version."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise ModelFileError(path, "no config.json: not a converted rwkv-mlx model") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(path / CONFIG_NAME, f"unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        what = config.get("model_type") if isinstance(config, dict) else None
        hint = (f"a Hugging Face / mlx-lm directory (model_type {what!r}); "
                "run `rwkv-mlx convert` on it first" if what else "not a converted rwkv-mlx model")
        raise UnsupportedModelError(path, hint)
    version = config.get("format_version", 0)
    if not isinstance(version, int):
        raise ModelFileError(path / CONFIG_NAME, f"format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise UnsupportedModelError(path, f"written by a newer rwkv-mlx (format version {config['format_version']}); "
                                          "upgrade rwkv-mlx to load it")
    for key in ("model_args", "weight_formats", "tokenizer", "weights"):
        if key not in config:
            raise ModelFileError(path / CONFIG_NAME, f"missing {key}")
    return config


_FLOATS = ("float32", "float16", "bfloat16")


def model_description(path: Path, config: dict) -> tuple[ModelArgs, dict[str, WeightFormat]]:
    """ModelArgs and weight formats from config.json, every value checked before a layer is built."""
    where = path / CONFIG_NAME
    try:
        raw_args = dict(config["model_args"])
        args = ModelArgs.from_dict(raw_args)
        formats = {str(k): WeightFormat.from_dict(dict(v)) for k, v in dict(config["weight_formats"]).items()}
    except (TypeError, ValueError) as e:
        raise ModelFileError(where, f"bad model_args or weight_formats ({e})") from None
    for key, value in args.to_dict().items():
        if not isinstance(value, float if key == "norm_eps" else int) or isinstance(value, bool):
            raise ModelFileError(where, f"model_args {key} = {value!r} is not a number")
    check_model_file_args(path, args)
    for module, fmt in formats.items():
        ok = {
            "dense": fmt.dtype in _FLOATS,
            "affine": fmt.dtype in _FLOATS and fmt.bits in (2, 3, 4, 5, 6, 8) and fmt.group_size in (32, 64, 128),
            "ggml": fmt.ggml_type in quants.BLOCK_TYPES,
        }.get(fmt.kind, False)
        if not ok:
            raise ModelFileError(where, f"weight format of {module} is not one rwkv-mlx knows: {fmt.to_dict()}")
    return args, formats


def format_label(fmt: WeightFormat) -> str:
    """A short human name for a storage form (tables, LoadInfo)."""
    if fmt.kind == "affine":
        return f"affine {fmt.bits}-bit g{fmt.group_size} ({fmt.dtype} scales)"
    if fmt.kind == "ggml":
        return f"ggml {quants.BLOCK_TYPES[fmt.ggml_type].name}"
    return f"dense {fmt.dtype}"


def iter_stored_tensors(path: str | os.PathLike, config: dict) -> Iterator[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype, shape, bytes) of every array in a converted directory, from the safetensors headers only."""
    path = Path(path)
    for name in config["weights"]:
        tensors, _ = read_safetensors(path / name)
        for tname, t in tensors.items():
            yield tname, t.dtype, t.shape, t.nbytes
