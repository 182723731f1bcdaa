"""``rwkv-mlx convert``: GGUF, BlinkDL ``.pth`` and Hugging Face checkpoints -> an MLX model directory.

One pipeline for every source: source -> canonical tensors -> quantization policy -> writer.

* Sources (``open_source``) become a ``ModelSource``: ``ModelArgs``, the vocabulary
  (``TokenList``) and one ``SourceTensor`` per model parameter, already in the
  model's names and orientation (spec 3.3's converter transformations, inverted
  for ``.pth`` and HF), holding the bytes exactly as the source stores them
  (a GGUF block type or F32/F16/BF16) and read only when converted.
* The policy (``QuantPolicy``) decides per parameter: ``keep`` maps every tensor
  onto its exact MLX form through the same helpers the GGUF loader uses
  (weights.py), so a kept GGUF computes bit for bit what loading the GGUF
  computes; ``bits=N`` requantizes the large matrices with ``mx.quantize`` from
  their exactly dequantized values, unless the stored form is already an exact
  MLX affine form of at most N bits (kept: no loss, no growth).  Small and
  sensitive tensors (lerp, w0/w1/w2, k_k, k_a, r_k, norms) stay float32, the
  a/v/g LoRAs in their stored (or ``--dtype``) float type, and the embedding and
  head at 8 bits unless asked otherwise.
* Writers: ``mlx_dir.save_mlx_dir`` (our format) or ``mlx_lm_format.save_mlx_lm_dir``.
* Safety (``output_dir``): everything is written into ``.DST.tmp-XXXX`` beside DST
  and renamed at the end; SIGINT/SIGTERM, a full disk or any error remove the
  temporary directory, and an existing DST (with ``force``) is only replaced by
  renames once the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .. import quants
from ..errors import InvalidArgumentError, ModelFileError, RwkvMlxError, UnsupportedModelError
from ..io import atomic_write
from ..formats.gguf_file import TensorInfo, open_gguf
from ..formats.hf import is_hf_dir, read_hf_dir
from ..layers import WeightFormat
from .gguf import check_tensors, file_fingerprint, model_args_from_gguf, tokenizer_from_gguf
from ..formats.mlx_dir import SHARD_BYTES, ConvertedTensor, TokenList, dtype_name, format_label, save_mlx_dir
from ..arch import (ModelArgs, check_model_file_args, gguf_tensor_shapes, gguf_to_module_name, matrix_weights,
                    parameter_shapes, rank_sources)
from ..formats.pth import StoredTensor, read_magic, read_pth
from ..model.weights import BF16, F16, F32, FLOAT_TYPES, LORA_MATRICES, LoadOptions, convert_matrix, convert_small, dense_float32

QUANT_BITS = (4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
FORMATS = ("rwkv-mlx", "mlx-lm")
DELAY_ENV = "RWKV_MLX_CONVERT_TEST_DELAY"  # seconds to sleep per tensor: lets tests interrupt a conversion
_GGML_OF_DTYPE = {"float32": F32, "float16": F16, "bfloat16": BF16}


class ConversionInterrupted(RwkvMlxError):
    """SIGTERM during a conversion (SIGINT raises KeyboardInterrupt); the output was removed."""

    exit_code = 143


# --------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class SourceTensor:
    """One model parameter as its source stores it, in the model's name and orientation.

    ``info`` carries the GGML type (F32/F16/BF16 or a block type) and the numpy
    shape; ``read()`` returns the stored bytes in the form weights.py converts:
    uint8 blocks (rows, row_bytes) for block types, float32/float16 arrays or
    bfloat16 bit patterns (uint16) for float types.
    """

    info: TensorInfo
    read: Callable[[], np.ndarray]

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class ModelSource:
    """Everything a conversion needs from one checkpoint, with no tensor data read yet."""

    path: Path
    kind: str  # "gguf" | "pth" | "hf"
    args: ModelArgs
    tensors: dict[str, SourceTensor]  # parameter path -> tensor, for every model parameter
    tokens: TokenList
    files: list[Path]
    stored_types: dict[str, tuple[int, int]]  # stored type -> (tensor count, bytes), as in the file
    vocab_file: Path | None = None
    details: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """The fast content hash the loader gives models (``Model.fingerprint``)."""
        if len(self.files) == 1:
            return file_fingerprint(self.files[0])
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode() + file_fingerprint(f).encode())
        return h.hexdigest()[:16]


def _count_types(entries) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for type_name, n_bytes in entries:
        count, size = out.get(type_name, (0, 0))
        out[type_name] = (count + 1, size + n_bytes)
    return out


def gguf_source(path: str | os.PathLike) -> ModelSource:
    g = open_gguf(path)
    args = model_args_from_gguf(g)
    check_tensors(g, args)
    tokenizer_from_gguf(g, args.vocab_size)  # the loader's checks of the token list
    types = g.metadata.get("tokenizer.ggml.token_type")
    tokens = TokenList(list(g.metadata["tokenizer.ggml.tokens"]), None if types is None else [int(t) for t in types],
                       int(g.metadata.get("tokenizer.ggml.eot_token_id", 261)))
    shapes = parameter_shapes(args)
    tensors = {}
    for gguf_name in gguf_tensor_shapes(args):
        path_ = gguf_to_module_name(gguf_name)
        if path_ is not None:
            info = replace(g.tensors[gguf_name], name=path_, shape=shapes[path_])
            tensors[path_] = SourceTensor(info, lambda n=gguf_name: g.raw(n))
    stored = _count_types((t.type_name, t.n_bytes) for t in g.tensors.values())
    details = {"general.name": g.metadata.get("general.name"), "general.file_type": g.metadata.get("general.file_type")}
    return ModelSource(g.path, "gguf", args, tensors, tokens, [g.path], stored, details=details)


_LERP = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
_BLINKDL_TRANSPOSED = {"w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"}  # (C, rank) in .pth, (rank, C) here


def _stored_info(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    if dtype not in _GGML_OF_DTYPE:
        raise InvalidArgumentError(f"{name}: dtype {dtype}")
    size = int(np.prod(shape, dtype=np.int64)) * (4 if dtype == "float32" else 2)
    return TensorInfo(name, _GGML_OF_DTYPE[dtype], shape, 0, size)


def _fits(src_shape: tuple[int, ...], shape: tuple[int, ...], name: str) -> bool:
    """Shapes that differ only as spec 3.3 allows: singleton axes ((1, 1, C) vectors) or r_k's (H, N)."""
    if src_shape == shape or tuple(d for d in src_shape if d != 1) == tuple(d for d in shape if d != 1):
        return True
    return name.endswith("att.r_k") and len(src_shape) == 2 and int(np.prod(src_shape)) == int(np.prod(shape))


def _as_param(path: Path, name: str, t: StoredTensor, shape: tuple[int, ...], transpose: bool) -> SourceTensor:
    """A checkpoint tensor as the parameter ``name``: transposed (LoRAs) or reshaped (squeeze, r_k flatten)."""
    transpose = transpose and len(t.shape) == 2
    if not _fits(t.shape[::-1] if transpose else t.shape, shape, name):
        raise ModelFileError(path, f"tensor for {name} has shape {list(t.shape)}, expected {list(shape)}")

    def read() -> np.ndarray:
        raw = t.read()
        return np.ascontiguousarray(raw.T if transpose and raw.ndim == 2 else raw).reshape(shape)

    return SourceTensor(_stored_info(name, t.dtype, shape), read)


def _stacked_lerp(path: Path, name: str, parts: list[StoredTensor], C: int) -> SourceTensor:
    for p in parts:
        if int(np.prod(p.shape)) != C:
            raise ModelFileError(path, f"a token-shift factor of {name} has shape {list(p.shape)}, expected {C} values")
    dtype = parts[0].dtype if all(p.dtype == parts[0].dtype for p in parts) else "float32"

    def read() -> np.ndarray:
        rows = [p.read() if dtype == p.dtype else p.numpy().astype(np.float32) for p in parts]
        return np.stack([r.reshape(C) for r in rows])

    return SourceTensor(_stored_info(name, dtype, (6, C)), read)


def blinkdl_source(path: Path, kind: str, raw: dict[str, StoredTensor], *, norm_eps: float = 1e-5,
                   head_size: int | None = None, files: list[Path] | None = None,
                   vocab_file: Path | None = None, details: dict | None = None) -> ModelSource:
    """A checkpoint in BlinkDL's names and orientation (``emb.weight``, ``blocks.N.att.x_r``, w1 as (C, D))."""

    def need(name: str) -> StoredTensor:
        if name not in raw:
            raise ModelFileError(path, f"missing tensor {name}: not an RWKV-7 (x070) checkpoint")
        return raw[name]

    if any(".att.time_" in n or ".ffn.time_" in n for n in raw):
        raise UnsupportedModelError(path, "an RWKV-4/5/6 checkpoint (time_* tensors); rwkv-mlx runs RWKV-7 (x070)")
    emb = need("emb.weight")
    layers = {int(m.group(1)) for n in raw if (m := re.match(r"blocks\.(\d+)\.", n))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise ModelFileError(path, f"layer indices {sorted(layers)[:8]} are not 0..N-1")
    n_layer = max(layers) + 1
    r_k = need("blocks.0.att.r_k")
    N = r_k.shape[-1] if len(r_k.shape) == 2 else (head_size or 64)
    if head_size is not None and head_size != N:
        raise ModelFileError(path, f"config says head size {head_size} but r_k has shape {list(r_k.shape)}")
    rank = lambda n: need(n).shape[-1] if len(need(n).shape) == 2 else 0  # noqa: E731 - (C, rank) in .pth
    args = ModelArgs(
        vocab_size=emb.shape[0], n_embd=emb.shape[-1], n_layer=n_layer, ffn_dim=need("blocks.0.ffn.key.weight").shape[0],
        **{field: rank(path) for field, path in rank_sources(n_layer).items()}, head_size=N,
        norm_eps=float(norm_eps),
    )
    check_model_file_args(path, args)

    tensors: dict[str, SourceTensor] = {}
    used: set[str] = set()
    for name, shape in parameter_shapes(args).items():
        if name.endswith("att.x_lerp"):
            prefix = name[: -len("x_lerp")]
            if prefix + "x_x" in raw:
                used.add(prefix + "x_x")
                tensors[name] = _as_param(path, name, raw[prefix + "x_x"], shape, False)
            else:
                parts = [need(prefix + x) for x in _LERP]
                used.update(prefix + x for x in _LERP)
                tensors[name] = _stacked_lerp(path, name, parts, args.n_embd)
            continue
        src = "blocks.0." + name if name.startswith("ln0.") else name
        used.add(src)
        leaf = name.rsplit(".", 1)[-1]
        tensors[name] = _as_param(path, name, need(src), shape, leaf in _BLINKDL_TRANSPOSED)
    layer0_dummies = {f"blocks.0.att.v{i}" for i in range(3)}
    unknown = sorted(set(raw) - used - layer0_dummies)
    if unknown:
        raise UnsupportedModelError(path, f"tensors rwkv-mlx does not know: {', '.join(unknown[:4])}"
                                          f"{' ...' if len(unknown) > 4 else ''}")
    tokens = TokenList.world(args.vocab_size, vocab_file)
    stored = _count_types((t.dtype, t.nbytes) for t in raw.values())
    return ModelSource(path, kind, args, tensors, tokens, files or [path], stored, vocab_file, details or {})


def open_source(path: str | os.PathLike) -> ModelSource:
    """Any supported checkpoint: a GGUF file, a ``torch.save`` .pth file or an HF directory."""
    path = Path(path)
    if path.is_dir():
        if not is_hf_dir(path):
            raise ModelFileError(path, "a directory without an HF config.json (converted rwkv-mlx directories "
                                       "need no conversion)")
        ckpt = read_hf_dir(path)
        return blinkdl_source(path, "hf", ckpt.tensors, norm_eps=ckpt.norm_eps, head_size=ckpt.head_size,
                              files=ckpt.files + [path / "config.json"], vocab_file=ckpt.vocab_file,
                              details={"layout": ckpt.layout, "architectures": ckpt.config.get("architectures")})
    magic = read_magic(path)
    if magic == b"GGUF":
        return gguf_source(path)
    if magic[:2] == b"PK" or path.suffix in (".pth", ".pt", ".bin"):
        return blinkdl_source(path, "pth", read_pth(path))
    raise ModelFileError(path, "not a GGUF file, a .pth checkpoint or a Hugging Face directory")


def sha256_files(files: list[Path], chunk: int = 1 << 24, stop: threading.Event | None = None) -> str:
    """sha256 of the files' contents in order; returns "" early once ``stop`` is set."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                if stop is not None and stop.is_set():
                    return ""
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# the quantization policy


@dataclass(frozen=True)
class QuantPolicy:
    """What to do with each parameter.

    bits: None keeps every tensor in its stored form (exact); 4/5/6/8 requantizes
        the large matrices with ``mx.quantize`` (affine, ``group_size``).
    embedding_bits: the same choice for ``emb`` and ``head`` (default 8 when
        ``bits`` is set, else keep).
    dtype: float dtype of dense matrices, LoRA matrices and new scales (None:
        as stored; new scales float16).
    allow_ggml: keep GGUF blocks as stored (the types the GPU decode kernels read, and
        those without an MLX form), which each backend then maps at load as it maps a
        GGUF's; False (mlx-lm) maps them onto MLX affine codes, or dequantizes them exactly
        to float32 (or ``dtype``) when they have no affine image.
    """

    bits: int | None = None
    group_size: int = 64
    embedding_bits: int | None = None
    dtype: str | None = None
    allow_ggml: bool = True

    @classmethod
    def make(cls, quantize: str | int | None = "keep", group_size: int = 64, dtype: str | None = None,
             quantize_embeddings: str | int | None = "auto", allow_ggml: bool = True) -> "QuantPolicy":
        bits = _parse_bits(quantize, "--quantize")
        if quantize_embeddings in ("auto", None):
            emb_bits = 8 if bits is not None else None
        else:
            emb_bits = _parse_bits(quantize_embeddings, "--quantize-embeddings")
        if group_size not in GROUP_SIZES:
            raise InvalidArgumentError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
        return cls(bits, group_size, emb_bits, dtype, allow_ggml)

    def bits_for(self, name: str) -> int | None:
        return self.embedding_bits if name in ("emb.weight", "head.weight") else self.bits

    def describe(self) -> dict:
        return {"method": "keep" if self.bits is None else "affine", "bits": self.bits, "group_size": self.group_size,
                "embedding_bits": self.embedding_bits, "dtype": self.dtype}

    def keep_options(self) -> LoadOptions:
        # float32 scales keep GGUF's K-quant scales exact (d * sc has up to 17 significant bits)
        return LoadOptions(float_dtype=self.dtype, scale_dtype="float32", ggml_native=self.allow_ggml, affine=True)


def _parse_bits(value, what: str) -> int | None:
    if value in ("keep", None):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = -1
    if bits not in QUANT_BITS:
        raise InvalidArgumentError(f"{what} must be keep or one of {', '.join(map(str, QUANT_BITS))}, got {value!r}")
    return bits


def _relative_rms(approx: mx.array, exact: mx.array) -> float:
    num = mx.sum(mx.square(approx - exact))
    den = mx.sum(mx.square(exact))
    return float(mx.sqrt(num / mx.maximum(den, 1e-30)))


def _exact_affine_bits(t: SourceTensor) -> int | None:
    """Code width of the stored block type's exact MLX affine form (from one row), None if it has none."""
    block = quants.BLOCK_TYPES[t.info.ggml_type]
    if block.to_affine is None:
        return None
    return block.to_affine(np.asarray(t.read()[:1])).bits


def convert_tensor(t: SourceTensor, is_matrix: bool, policy: QuantPolicy) -> ConvertedTensor:
    """One parameter in its output form, evaluated."""
    info, name = t.info, t.name
    type_name = quants.BLOCK_TYPES[info.ggml_type].name
    if not is_matrix:
        lora = name.rsplit(".", 1)[-1] in LORA_MATRICES
        array = convert_small(t.read(), info, policy.dtype if lora else "float32")
        mx.eval(array)
        return ConvertedTensor(name, None, {"": array}, f"{dtype_name(array.dtype)} (from {type_name})")
    bits = policy.bits_for(name)
    if bits is None or (_exact_affine_bits(t) or 99) <= bits:
        fmt, arrays = convert_matrix(t.read(), info, policy.keep_options())
        mx.eval(*arrays.values())
        exact = "kept" if info.ggml_type in FLOAT_TYPES or fmt.kind != "dense" else "dequantized"
        return ConvertedTensor(name, fmt, arrays, f"{format_label(fmt)} ({exact} {type_name})")
    w = dense_float32(t.read(), info)
    cols = info.shape[-1]
    group = next((g for g in (policy.group_size, 64, 32) if cols % g == 0 and g <= policy.group_size), None)
    if group is None:
        dtype = policy.dtype or "float16"
        dense = w.astype(getattr(mx, dtype))
        err = _relative_rms(dense.astype(mx.float32), w)
        mx.eval(dense)
        return ConvertedTensor(name, WeightFormat("dense", dtype), {"weight": dense},
                               f"dense {dtype} (rows of {cols} fit no group)", err)
    scale_dtype = policy.dtype or "float16"
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    scales, biases = scales.astype(getattr(mx, scale_dtype)), biases.astype(getattr(mx, scale_dtype))
    err = _relative_rms(mx.dequantize(wq, scales, biases, group_size=group, bits=bits).astype(mx.float32), w)
    mx.eval(wq, scales, biases)
    fmt = WeightFormat("affine", scale_dtype, bits=bits, group_size=group)
    return ConvertedTensor(name, fmt, {"weight": wq, "scales": scales, "biases": biases},
                           f"{format_label(fmt)} (from {type_name})", err)


def iter_converted(source: ModelSource, policy: QuantPolicy) -> Iterator[ConvertedTensor]:
    """Every parameter of ``source`` converted by ``policy``, one at a time."""
    matrices = matrix_weights(source.args)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    for name, t in source.tensors.items():
        yield convert_tensor(t, name in matrices, policy)
        if delay:
            time.sleep(delay)


# --------------------------------------------------------------------------------------
# safe output


class _Signals:
    """SIGINT/SIGTERM raise in the main thread while converting; deferred while renaming and cleaning up."""

    def __init__(self):
        self.saved: dict[int, object] = {}
        self.pending: int | None = None
        self.deferring = False

    def _handler(self, signum, _frame):
        if self.deferring:
            self.pending = self.pending or signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum, finished: bool = False):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise ConversionInterrupted("terminated (SIGTERM) " + ("after the output was complete" if finished else
                                                               "; the unfinished output was removed"))

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread; try/finally still cleans up
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        self.saved.clear()

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


@contextlib.contextmanager
def output_dir(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside ``dst`` that becomes ``dst`` if the block succeeds.

    Without ``force`` an existing ``dst`` is refused; with it, the old one is
    renamed aside, the new one renamed in, then the old one deleted -- so a
    failed or interrupted conversion never touches it.  On any exception,
    SIGINT or SIGTERM the temporary directory is removed.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise InvalidArgumentError(f"{dst} already exists; pass --force to replace it")
    if dst.exists() and not dst.is_dir():
        raise InvalidArgumentError(f"{dst} exists and is not a directory; remove it first")
    signals = _Signals()
    signals.install()  # before the directory exists, so no signal can leave it behind
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = stack.enter_context(atomic_write(dst, directory=True, guard=signals.deferred))
            except OSError as e:
                raise OSError(e.errno, f"cannot create a directory beside {dst}: {e.strerror}") from None
            yield tmp  # then renamed into place, or removed
        finished = True
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device of {dst.parent}; nothing was written") from None
        raise
    finally:
        signals.restore()
        if signals.pending is not None:
            _Signals._raise(signals.pending, finished)


# --------------------------------------------------------------------------------------
# the conversion


@contextlib.contextmanager
def _set_on_error(event: threading.Event):
    try:
        yield
    except BaseException:
        event.set()
        raise


@dataclass
class ConvertReport:
    dst: Path
    source: ModelSource
    policy: QuantPolicy
    fmt: str
    rows: list[ConvertedTensor] = field(default_factory=list)
    seconds: float = 0.0
    weight_bytes: int = 0

    def lossy(self) -> list[ConvertedTensor]:
        return [r for r in self.rows if r.rel_error is not None]


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, quantize: str | int | None = "keep",
            group_size: int = 64, dtype: str | None = None, quantize_embeddings: str | int | None = "auto",
            fmt: str = "rwkv-mlx", force: bool = False, shard_bytes: int = SHARD_BYTES,
            progress: Callable[[int, int, str], None] | None = None) -> ConvertReport:
    """Convert ``src`` (GGUF, .pth or HF directory) into the directory ``dst``; see the module docstring."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shard_bytes <= 0:
        raise InvalidArgumentError(f"--shard-size must be positive, got {shard_bytes}")
    policy = QuantPolicy.make(quantize, group_size, dtype, quantize_embeddings, allow_ggml=fmt == "rwkv-mlx")
    start = time.perf_counter()
    source = open_source(src)
    dst = Path(dst)
    if dst.absolute() == source.path.absolute() or source.path.absolute() in dst.absolute().parents:
        raise InvalidArgumentError(f"{dst} would overwrite the source {source.path}")
    report = ConvertReport(dst, source, policy, fmt)
    total = len(source.tensors)

    def on_tensor(t: ConvertedTensor) -> None:
        report.rows.append(t)
        if progress:
            progress(len(report.rows), total, t.name)

    fingerprint = source.fingerprint()
    if policy.bits is not None or policy.embedding_bits is not None or policy.dtype is not None:
        recipe = f"{fingerprint}:{sorted(policy.describe().items())}:{fmt}"
        fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    stop_hashing = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="rwkv-mlx-sha256") as pool, _set_on_error(stop_hashing):
        # the hash overlaps the conversion (hashlib drops the GIL) and stops early if the conversion fails
        digest: Future = pool.submit(sha256_files, source.files, stop=stop_hashing)
        with output_dir(dst, force) as tmp:
            tensors = iter_converted(source, policy)
            meta = {"path": source.path.name, "format": source.kind, "fingerprint": source.fingerprint(),
                    "bytes": sum(f.stat().st_size for f in source.files), **{k: v for k, v in source.details.items() if v}}
            if fmt == "rwkv-mlx":
                config = save_mlx_dir(tmp, source.args, tensors, source.tokens,
                                      source=lambda: {**meta, "sha256": digest.result()},
                                      quantization=policy.describe(), fingerprint=fingerprint,
                                      vocab_file=source.vocab_file, on_tensor=on_tensor, shard_bytes=shard_bytes)
            else:
                from ..formats.mlx_lm_format import save_mlx_lm_dir

                config = save_mlx_lm_dir(tmp, source.args, tensors, source.tokens, on_tensor=on_tensor,
                                         shard_bytes=shard_bytes,
                                         source=lambda: {**meta, "sha256": digest.result()})
            report.weight_bytes = int(config.get("weight_bytes", 0))
    report.seconds = time.perf_counter() - start
    return report
