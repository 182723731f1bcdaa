"""Checkpoints written by ``torch.save`` (BlinkDL's ``.pth`` releases, state-tuning files), read without torch.

What is supported: the zip format that ``torch.save`` has written by default since
PyTorch 1.6 -- one top-level folder holding ``data.pkl`` (the pickled object) and
``data/<key>`` (the raw little-endian bytes of each storage) -- holding a dict of
tensors (nested dicts are flattened with ``.``; other values are ignored), with
float32, float16 or bfloat16 storages on any device.  Tensors may be views
(offset, strides) of a larger storage.  Not supported, each refused with one
``ModelFileError``: the legacy pre-1.6 format, other storage types (integers,
float64, quantized tensors), big-endian files, and any pickled object other
than tensors, parameters, dicts, lists, tuples, strings and numbers.

Safety.  Unpickling can normally import and call anything the file names.  The
unpickler here resolves exactly five global names, each to an inert stand-in
of our own that only records what it is given:
``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter``,
``torch.FloatStorage``/``HalfStorage``/``BFloat16Storage`` and
``collections.OrderedDict``.  Any other name is refused before anything is
built, so no code from the file ever runs.

Storages are memory-mapped where the zip stores them uncompressed (torch always
does), so ``read_pth`` costs nothing until a tensor is read and reading a
multi-GB checkpoint needs no copy of the whole file.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ModelFileError

MAX_PICKLE_BYTES = 64 << 20  # a state dict's pickle is kilobytes; bounds a hostile file

# dtype name -> numpy dtype of the stored bits (bfloat16: its uint16 bit patterns).  Checkpoints
# hold the float types; the integer ones occur in converted directories (packed codes, GGUF blocks).
STORED_DTYPES = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
    "uint8": np.dtype("u1"), "uint32": np.dtype("<u4"),
}

_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16"}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a checkpoint file, read on demand.

    ``read()`` returns the values as stored: float32/float16 arrays, or for
    bfloat16 the uint16 bit patterns (numpy has no bfloat16).  ``numpy()``
    gives float32 for bfloat16 (exact) and the stored dtype otherwise.
    """

    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * STORED_DTYPES[self.dtype].itemsize

    def numpy(self) -> np.ndarray:
        raw = self.read()
        if self.dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw


# --------------------------------------------------------------------------------------
# the restricted unpickler


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _TensorRef(storage, _as_int(storage_offset), _int_tuple(size), _int_tuple(stride))


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            if module == "torch" and name.endswith("Storage"):
                raise pickle.UnpicklingError(
                    f"storage type torch.{name} is not supported (float32, float16 and bfloat16 are)") from None
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("storage of an unknown type")
        return _StorageRef(str(key), storage_type.dtype, _as_int(numel))


def _as_int(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise pickle.UnpicklingError(f"expected a non-negative integer, got {str(value)[:40]}")
    return value


def _int_tuple(value) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise pickle.UnpicklingError("tensor size or stride is not a tuple")
    return tuple(_as_int(v) for v in value)


# --------------------------------------------------------------------------------------
# the zip container


class _Archive:
    """Where each storage's bytes lie in the file, and a lazily opened map of it."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str):
        self.path, self.prefix = path, prefix
        self.size = path.stat().st_size
        self.entries = {i.filename: i for i in zf.infolist()}
        self._map: np.ndarray | None = None

    def storage(self, ref: _StorageRef) -> np.ndarray:
        name = f"{self.prefix}data/{ref.key}"
        info = self.entries.get(name)
        dtype = STORED_DTYPES[ref.dtype]
        need = ref.numel * dtype.itemsize
        if info is None:
            raise ModelFileError(self.path, f"storage {ref.key} is missing from the archive")
        if info.file_size < need:
            raise ModelFileError(self.path, f"storage {ref.key} holds {info.file_size} bytes, its tensors need {need}")
        if info.compress_type != zipfile.ZIP_STORED:
            with zipfile.ZipFile(self.path) as zf, zf.open(name) as fh:
                data = fh.read(need)  # never more than the tensors need: a compressed entry may claim any size
            return np.frombuffer(data, dtype=np.uint8).view(dtype)
        start = self._data_offset(info)
        if start + need > self.size:
            raise ModelFileError(self.path, f"storage {ref.key} runs past the end of the file")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[start : start + need].view(dtype)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        # the local header repeats the name and may carry a different extra field than the central directory
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise ModelFileError(self.path, f"corrupt zip entry {info.filename}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        return info.header_offset + 30 + name_len + extra_len


def _tensor(archive: _Archive, ref: _TensorRef, name: str) -> StoredTensor:
    numel = ref.storage.numel
    if len(ref.shape) != len(ref.stride):
        raise ModelFileError(archive.path, f"tensor {name}: size and stride differ in length")
    count = int(np.prod(ref.shape, dtype=np.int64))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if count else ref.offset - 1
    if last >= numel:
        raise ModelFileError(archive.path, f"tensor {name} reaches element {last} of a storage of {numel}")
    dtype = ref.storage.dtype
    itemsize = STORED_DTYPES[dtype].itemsize

    def read() -> np.ndarray:
        storage = archive.storage(ref.storage)
        if count == 0:
            return np.zeros(ref.shape, dtype=storage.dtype)
        base = storage[ref.offset :]
        view = np.lib.stride_tricks.as_strided(base, ref.shape, tuple(s * itemsize for s in ref.stride), writeable=False)
        return view if view.flags.c_contiguous else np.ascontiguousarray(view)

    return StoredTensor(dtype, ref.shape, read)


def _flatten(obj, prefix: str, out: dict[str, _TensorRef]) -> None:
    if isinstance(obj, _TensorRef):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def read_magic(path: Path, n: int = 4) -> bytes:
    """The first ``n`` bytes of a file, or ModelFileError naming it."""
    if path.is_dir():
        raise ModelFileError(path, "is a directory, not a model file")
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise ModelFileError(path, "no such file") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read ({e.strerror})") from None


def read_pth(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """The tensors of a ``torch.save`` file, by name, without reading their data."""
    path = Path(path)
    magic = read_magic(path)
    if magic != b"PK\x03\x04":
        if magic[:2] == b"\x80\x02" or magic[:1] == b"\x80":
            raise ModelFileError(path, "legacy torch.save format (PyTorch < 1.6) is not supported; "
                                       "re-save it with a current PyTorch")
        raise ModelFileError(path, "not a PyTorch checkpoint (expected a zip archive written by torch.save)")
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
            if len(pkl) != 1:
                raise ModelFileError(path, "no data.pkl in the archive: not a torch.save checkpoint")
            prefix = pkl[0][: -len("data.pkl")]
            info = zf.getinfo(pkl[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise ModelFileError(path, f"data.pkl is {info.file_size} bytes (limit {MAX_PICKLE_BYTES})")
            order = zf.read(prefix + "byteorder").strip() if prefix + "byteorder" in zf.namelist() else b"little"
            if order != b"little":
                raise ModelFileError(path, f"byte order {order.decode(errors='replace')!r} is not supported")
            with zf.open(pkl[0]) as fh:
                data = fh.read(MAX_PICKLE_BYTES + 1)
            archive = _Archive(path, zf, prefix)
    except zipfile.BadZipFile as e:
        raise ModelFileError(path, f"corrupt zip archive ({e})") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise ModelFileError(path, f"data.pkl: {e}") from None
    refs: dict[str, _TensorRef] = {}
    _flatten(obj, "", refs)
    if not refs:
        raise ModelFileError(path, "holds no tensors")
    return {name: _tensor(archive, ref, name) for name, ref in refs.items()}


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``torch.save`` file as a numpy array, read into memory.

    bfloat16 tensors come back as float32 (exactly); float32 and float16 as
    stored.  Raises ``ModelFileError`` for anything but a checkpoint of tensors.
    For multi-GB checkpoints use ``read_pth``, which reads tensors one at a time.
    """
    return {name: np.array(t.numpy()) for name, t in read_pth(path).items()}


def read_state_tuning(path: str | os.PathLike, n_layer: int, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Each layer's ``blocks.N.att.time_state`` of a BlinkDL state-tuning file, as stored (key-by-value).

    Names and shapes are checked before any tensor is read: a full checkpoint given
    by mistake costs nothing.
    """
    tensors = read_pth(path)
    want = tuple(shape)
    if not any(name.endswith(".att.time_state") for name in tensors):
        raise ModelFileError(path, "no blocks.N.att.time_state tensors: not a state-tuning file")
    out = []
    for i in range(n_layer):
        name = f"blocks.{i}.att.time_state"
        if name not in tensors:
            raise ModelFileError(path, f"missing {name}: not a state-tuning file for this {n_layer}-layer model")
        got = list(tensors[name].shape)
        if got != list(want):
            raise ModelFileError(path, f"{name} has shape {got}, this model needs {list(want)}")
        t = tensors[name].numpy()
        if not np.isfinite(t).all():
            raise ModelFileError(path, f"{name} holds NaN or infinite values")
        out.append(t)
    return out
