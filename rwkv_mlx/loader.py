"""``load(path) -> (model, tokenizer)``: file -> tensors -> model, with every check up front.

A GGUF file is validated completely (structure, architecture, metadata, every
tensor's presence and shape) before any weight is converted, so a bad file
costs milliseconds and yields one clear ``ModelFileError``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .errors import InvalidArgumentError, ModelFileError, UnsupportedModelError
from .checkpoint import is_checkpoint, load_checkpoint
from .gguf_file import GGUFFile, open_gguf
from .hub import resolve_model
from .model import MATRIX_MODULES, Model, ModelArgs, check_model_file_args, gguf_tensor_shapes, gguf_to_module_name
from .tokenizer import Tokenizer
from .weights import FLOAT_TYPES, LoadOptions, convert_tensors

ARCHITECTURE = "rwkv7"


@dataclass
class LoadInfo:
    """What loading cost, for the CLI and the benchmark."""

    path: Path
    seconds: float
    file_bytes: int
    weight_bytes: int
    tensor_types: dict[str, int]


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
    p = ARCHITECTURE
    C = _meta(g, f"{p}.embedding_length")
    L = _meta(g, f"{p}.block_count")
    N = _meta(g, f"{p}.wkv.head_size")
    F = _meta(g, f"{p}.feed_forward_length")
    eps = _meta(g, f"{p}.attention.layer_norm_epsilon", float, required=False, default=1e-5)
    if not (math.isfinite(eps) and eps > 0):
        raise ModelFileError(g.path, f"metadata {p}.attention.layer_norm_epsilon = {eps} is not a positive number")
    # bound the layer count by the file before anything loops over layers
    layers = {name.split(".", 2)[1] for name in g.tensors if name.startswith("blk.")}
    if L > len(layers):
        raise ModelFileError(g.path, f"metadata {p}.block_count = {L} but the file has tensors for {len(layers)} layers")

    def rows_of(name: str) -> int:
        if name not in g.tensors:
            raise ModelFileError(g.path, f"missing tensor {name}")
        return g.tensors[name].shape[0]

    # LoRA ranks come from tensor shapes (the metadata may lack some); the
    # shape check below then holds every tensor to them.
    value_src = "blk.1.time_mix_v1.weight" if L > 1 else "blk.0.time_mix_v1.weight"
    args = ModelArgs(
        vocab_size=rows_of("token_embd.weight"), n_embd=C, n_layer=L, ffn_dim=F,
        decay_rank=rows_of("blk.0.time_mix_w1.weight"), iclr_rank=rows_of("blk.0.time_mix_a1.weight"),
        value_rank=rows_of(value_src), gate_rank=rows_of("blk.0.time_mix_g1.weight"),
        head_size=N, norm_eps=eps,
    )
    check_model_file_args(g.path, args)
    for key, value in (("decay_lora_rank", args.decay_rank), ("iclr_lora_rank", args.iclr_rank),
                       ("value_residual_mix_lora_rank", args.value_rank), ("gate_lora_rank", args.gate_rank)):
        stated = _meta(g, f"{p}.attention.{key}", required=False)
        if stated is not None and stated != value and not (key.startswith("value") and L == 1):
            raise ModelFileError(g.path, f"metadata {p}.attention.{key} = {stated} but the tensors have rank {value}")
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


def file_fingerprint(path: Path, chunk: int = 1 << 16, samples: int = 32) -> str:
    """A fast content hash: size, head, tail and evenly spaced chunks (a full hash of GBs takes seconds)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    starts = [(size - chunk) * i // samples for i in range(samples + 1)] if size > chunk else [0]
    with open(path, "rb") as f:
        for start in starts:
            f.seek(start)
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


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
    matrices = {"emb.weight", "head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(args.n_layer) for m in MATRIX_MODULES}

    formats, weights = {}, []
    total = len(names)

    def tick(name: str, done=[0]):
        done[0] += 1
        if progress:
            progress(done[0], total, name)

    for module_path, fmt, arrays in convert_tensors(g, names, matrices, options, tick):
        if fmt is not None:
            layer = module_path[: -len(".weight")]
            formats[layer] = fmt
            weights += [(f"{layer}.{k}", v) for k, v in arrays.items()]
        else:
            arr = arrays[""]
            if module_path.endswith("att.x_lerp"):
                arr = arr.reshape(6, args.n_embd)
            weights.append((module_path, arr))

    lora = g.tensors["blk.0.time_mix_a1.weight"].ggml_type
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


def load(path: str | os.PathLike, options: LoadOptions | None = None, *, return_info: bool = False,
         progress: Callable[[int, int, str], None] | None = None, file: str | None = None):
    """Load a model and its tokenizer from a GGUF file, a converted MLX directory, a .pth file,
    a Hugging Face directory (both converted in memory, checkpoint.py) or a Hub repo.

    ``model, tokenizer = rwkv_mlx.load("rwkv7-g1b-2.9b-Q4_K_M.gguf")``; ``"ORG/REPO"``,
    ``"ORG/REPO:Q4_K_M"`` or ``("ORG/REPO", file="NAME")`` download from the Hugging Face
    Hub (hub.py).  With ``return_info=True`` a third value says how long it took and what it holds.
    """
    path = resolve_model(path, file)
    if is_checkpoint(path):  # what `convert` reads (.pth, Hugging Face directory), converted in memory
        result = load_checkpoint(path, options, progress=progress)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(path, "a directory without config.json: not a converted rwkv-mlx model")
        from .mlx_dir import load_mlx_dir

        result = load_mlx_dir(path, options, progress=progress)
    else:
        result = load_gguf(path, options, progress=progress)
    return result if return_info else result[:2]
