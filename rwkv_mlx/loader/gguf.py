"""A GGUF file -> (model, tokenizer), with every check up front: ``load_gguf``.

A GGUF file is validated completely (structure, architecture, metadata, every
tensor's presence and shape) before any weight is converted, so a bad file
costs milliseconds and yields one clear ``ModelFileError``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from ..arch import (ARCHITECTURE, DEFAULT_NORM_EPS, LORA_RANKS, METADATA_KEYS, ModelArgs, check_model_file_args,
                    gguf_tensor_shapes, gguf_to_module_name, matrix_weights, module_to_gguf_name, parameter_shapes,
                    rank_sources)
from ..errors import InvalidArgumentError, ModelFileError, UnsupportedModelError
from ..formats.gguf_file import GGUFFile, open_gguf
from ..model import Model
from ..model.weights import FLOAT_TYPES, LoadOptions, convert_tensor
from ..text.tokenizer import Tokenizer
from .info import LoadInfo, file_fingerprint


def _meta(g: GGUFFile, key: str, kind=int, required: bool = True, default=None):
    if key not in g.metadata:
        if required:
            raise ModelFileError(g.path, f"missing metadata {key}")
        return default
    value = g.metadata[key]
    try:
        if isinstance(value, (list, np.ndarray, str)):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelFileError(g.path, f"metadata {key} has an unusable value {value!r}") from None


def model_args_from_gguf(g: GGUFFile) -> ModelArgs:
    """Hyper-parameters from metadata and tensor shapes; refuses anything but rwkv7."""
    arch = g.metadata.get("general.architecture")
    if arch is None:
        raise ModelFileError(g.path, "no general.architecture: not a model file")
    if not isinstance(arch, str):
        raise ModelFileError(g.path, f"general.architecture is {arch!r}, not a name")
    if arch != ARCHITECTURE:
        raise UnsupportedModelError(g.path, f"architecture {arch!r} is not supported (rwkv-mlx runs {ARCHITECTURE!r} only)")
    keys = METADATA_KEYS
    C = _meta(g, keys["n_embd"])
    L = _meta(g, keys["n_layer"])
    N = _meta(g, keys["head_size"])
    F = _meta(g, keys["ffn_dim"])
    eps = _meta(g, keys["norm_eps"], float, required=False, default=DEFAULT_NORM_EPS)
    if not (math.isfinite(eps) and eps > 0):
        raise ModelFileError(g.path, f"metadata {keys['norm_eps']} = {eps} is not a positive number")
    # bound the layer count by the file before anything loops over layers
    layers = {name.split(".", 2)[1] for name in g.tensors if name.startswith("blk.")}
    if L > len(layers):
        raise ModelFileError(g.path, f"metadata {keys['n_layer']} = {L} but the file has tensors for {len(layers)} layers")

    def rows_of(name: str) -> int:
        if name not in g.tensors:
            raise ModelFileError(g.path, f"missing tensor {name}")
        return g.tensors[name].shape[0]

    # LoRA ranks come from tensor shapes (the metadata may lack some); the
    # shape check below then holds every tensor to them.
    args = ModelArgs(
        vocab_size=rows_of(module_to_gguf_name("emb.weight")), n_embd=C, n_layer=L, ffn_dim=F,
        **{field: rows_of(module_to_gguf_name(path)) for field, path in rank_sources(L).items()},
        head_size=N, norm_eps=eps,
    )
    check_model_file_args(g.path, args)
    for field in LORA_RANKS:
        stated, value = _meta(g, keys[field], required=False), getattr(args, field)
        if stated is not None and stated != value and not (field == "value_rank" and L == 1):
            raise ModelFileError(g.path, f"metadata {keys[field]} = {stated} but the tensors have rank {value}")
    return args


def check_tensors(g: GGUFFile, args: ModelArgs) -> None:
    for name, shape in gguf_tensor_shapes(args).items():
        info = g.tensors.get(name)
        if info is None:
            raise ModelFileError(g.path, f"missing tensor {name}")
        if info.shape != shape:
            raise ModelFileError(g.path, f"tensor {name} has shape {list(info.shape)}, expected {list(shape)}")


def tokenizer_from_gguf(g: GGUFFile, vocab_size: int) -> Tokenizer:
    model = g.metadata.get("tokenizer.ggml.model")
    if model != "rwkv":
        raise UnsupportedModelError(g.path, f"tokenizer {model!r} is not the RWKV world tokenizer")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFileError(g.path, "missing tokenizer.ggml.tokens")
    if len(tokens) > vocab_size:
        raise ModelFileError(g.path, f"{len(tokens)} tokens but the embedding has {vocab_size} rows")
    types = g.metadata.get("tokenizer.ggml.token_type")
    if types is not None and not (isinstance(types, np.ndarray) and types.dtype.kind in "iu"):
        raise ModelFileError(g.path, "tokenizer.ggml.token_type is not an array of integers")
    eot = g.metadata.get("tokenizer.ggml.eot_token_id", 261)
    if not isinstance(eot, int) or isinstance(eot, bool):
        raise ModelFileError(g.path, f"tokenizer.ggml.eot_token_id is {eot!r}, not a token id")
    try:
        return Tokenizer.from_gguf(tokens, None if types is None else types.tolist(), eot)
    except (ValueError, InvalidArgumentError) as e:
        raise ModelFileError(g.path, f"token list unusable: {e}") from None


def load_gguf(path: str | os.PathLike, options: LoadOptions | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> tuple[Model, Tokenizer, LoadInfo]:
    start = time.perf_counter()
    g = open_gguf(path)
    args = model_args_from_gguf(g)
    check_tensors(g, args)
    tokenizer = tokenizer_from_gguf(g, args.vocab_size)
    options = options or LoadOptions.for_backend()

    names = {}
    for name in gguf_tensor_shapes(args):
        module_path = gguf_to_module_name(name)
        if module_path is not None:
            names[name] = module_path
    shapes = parameter_shapes(args)
    matrices = matrix_weights(args)

    formats, weights = {}, []
    total = len(names)

    def tick(name: str, done=[0]):
        done[0] += 1
        if progress:
            progress(done[0], total, name)

    # one tensor at a time, each evaluated before the next is read: peak memory stays
    # near one tensor above the model itself
    for gguf_name, module_path in names.items():
        fmt, arrays = convert_tensor(g.raw(gguf_name), g.tensors[gguf_name], module_path in matrices, module_path,
                                     options)
        mx.eval(*arrays.values())
        tick(gguf_name)
        if fmt is not None:
            layer = module_path[: -len(".weight")]
            formats[layer] = fmt
            weights += [(f"{layer}.{k}", v) for k, v in arrays.items()]
        else:
            weights.append((module_path, arrays[""].reshape(shapes[module_path])))

    lora = g.tensors[module_to_gguf_name(rank_sources(args.n_layer)["iclr_rank"])].ggml_type  # the LoRA matrices' stored type
    lora_dtype = getattr(mx, options.float_dtype or FLOAT_TYPES.get(lora, "float32"))
    model = Model(args, formats, lora_dtype=lora_dtype)
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    model.keep_tables_on_device()
    model.fingerprint = file_fingerprint(g.path)
    types: dict[str, int] = {}
    for info in g.tensors.values():
        types[info.type_name] = types.get(info.type_name, 0) + 1
    info = LoadInfo(g.path, time.perf_counter() - start, g.file_size(),
                    sum(v.nbytes for _, v in weights), types)
    return model, tokenizer, info
