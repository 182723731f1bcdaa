"""GGUF files: bounds-checked structure first, then gguf-py's memory-mapped reader.

A model file comes from the internet, so nothing it says is trusted before it
is checked against the file's size: ``scan_gguf`` walks the header, the
metadata and the tensor table with explicit bounds (every count, length,
dimension and offset) and raises ``ModelFileError`` naming the file and the
first problem.  Only then does ``gguf.GGUFReader`` map the file; tensor data
stay memory-mapped views and are never copied here.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError
from .quants import BLOCK_TYPES

GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
MAX_KEY_BYTES = 1 << 16
MAX_ELEMENTS = 1 << 40  # far above any real tensor; keeps products far from overflow

# value type id -> (struct format, size) for fixed-size scalars (GGUF spec)
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_NP_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, with shape in numpy/MLX order (ne0 last)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return BLOCK_TYPES[self.ggml_type].name


@dataclass
class GGUFFile:
    """A validated GGUF file: metadata values, the tensor table and raw tensor views."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    _data: np.ndarray | None = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as a read-only uint8 view shaped (rows, row_bytes)."""
        info = self.tensors[name]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        view = self._mapped()[info.offset : info.offset + info.n_bytes]
        return view.reshape(rows, info.n_bytes // rows)

    def _mapped(self) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data

    def file_size(self) -> int:
        return self.path.stat().st_size


class _Cursor:
    """Reads little-endian values from a mapped file, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> None:
        raise ModelFileError(self.path, what)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, type_id: int, what: str):
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (limit {limit})")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, type_id: int, key: str, depth: int = 0):
        if type_id in _SCALARS:
            return self.scalar(type_id, f"value of {key}")
        if type_id == _STRING:
            return self.string(f"value of {key}")
        if type_id == _ARRAY:
            if depth > 0:
                self.fail(f"metadata {key}: nested arrays are not supported")
            elem = self.u32(f"element type of {key}")
            count = self.u64(f"element count of {key}")
            if elem in _SCALARS:
                size = _SCALARS[elem][1]
                if count * size > self.size - self.pos:
                    self.fail(f"metadata {key}: array of {count} elements runs past the end of the file")
                raw = self.take(count * size, f"array {key}")
                return np.frombuffer(raw, dtype=_NP_SCALARS[elem]).copy()
            if elem == _STRING:
                # each string costs at least its 8-byte length: bound the count before looping
                if count * 8 > self.size - self.pos:
                    self.fail(f"metadata {key}: array of {count} strings runs past the end of the file")
                return [self.string(f"element {i} of {key}") for i in range(count)]
            self.fail(f"metadata {key}: unknown array element type {elem}")
        self.fail(f"metadata {key}: unknown value type {type_id}")


def scan_gguf(path: str | os.PathLike) -> GGUFFile:
    """Validate the whole GGUF structure against the file size; return its contents.

    Raises ``ModelFileError`` (one line: file and problem) for anything that is
    not a well-formed GGUF file: bad magic or version, counts or lengths that
    cannot fit in the file, unknown value or block types, duplicate names,
    dimensions that are not whole blocks, misaligned or overlapping data.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ModelFileError(path, "not a regular file")
        with open(path, "rb") as fh:
            if size == 0:
                raise ModelFileError(path, "empty file, not GGUF")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFileError(path, "no such file") from None
    except IsADirectoryError:
        raise ModelFileError(path, "is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFileError(path, "permission denied") from None
    try:
        # slicing the mmap itself copies small byte strings: nothing stays exported
        return _scan(_Cursor(buf, path), path, size)
    finally:
        buf.close()


def _scan(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    if size < 24 or bytes(cur.take(4, "magic")) != GGUF_MAGIC:
        cur.fail("not a GGUF file (bad magic)")
    version = cur.u32("version")
    if version not in (2, 3):
        cur.fail(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # smallest possible entries: a kv is 8 (key len) + 4 (type) + 1; a tensor info 8+4+8+4+8
    if n_kv * 13 > size or n_tensors * 32 > size:
        cur.fail(f"truncated or corrupt: header claims {n_kv} metadata entries and {n_tensors} tensors, "
                 f"more than a {size}-byte file can hold")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", MAX_KEY_BYTES)
        if key in metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(cur.u32(f"type of {key}"), key)

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, (int, np.integer)) or alignment <= 0 or alignment & (alignment - 1):
        cur.fail(f"general.alignment {alignment!r} is not a power of two")
    alignment = int(alignment)

    entries = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", MAX_KEY_BYTES)
        if name in names:
            cur.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            cur.fail(f"tensor {name}: {n_dims} dimensions (1 to {GGML_MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimension {d} of {name}") for d in range(n_dims)]
        n_elems = 1
        for d in dims:
            if d == 0 or d > MAX_ELEMENTS:
                cur.fail(f"tensor {name}: dimension {d} out of range")
            n_elems *= d
            if n_elems > MAX_ELEMENTS:
                cur.fail(f"tensor {name}: {dims} is too many elements")
        ggml_type = cur.u32(f"type of {name}")
        offset = cur.u64(f"data offset of {name}")
        block = BLOCK_TYPES.get(ggml_type)
        if block is None:
            cur.fail(f"tensor {name}: unsupported block type {ggml_type}")
        if dims[0] % block.block_elems:
            cur.fail(f"tensor {name}: rows of {dims[0]} are not whole {block.name} blocks of {block.block_elems}")
        n_bytes = n_elems // block.block_elems * block.block_bytes
        entries.append((name, ggml_type, tuple(int(d) for d in reversed(dims)), offset, n_bytes))

    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, ggml_type, shape, offset, n_bytes in entries:
        if offset % alignment:
            cur.fail(f"tensor {name}: data offset {offset} is not aligned to {alignment}")
        start = data_start + offset
        if start + n_bytes > size:
            cur.fail(f"truncated: tensor {name} needs bytes {start}..{start + n_bytes}, file has {size}")
        tensors[name] = TensorInfo(name, ggml_type, shape, start, n_bytes)
        spans.append((start, start + n_bytes, name))
    spans.sort()
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            cur.fail(f"tensors {n0} and {n1} overlap")
    return GGUFFile(path, version, metadata, tensors, alignment)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Validate ``path`` and cross-check it with gguf-py's memory-mapped reader.

    The scan above is the gatekeeper; GGUFReader then maps the same file and
    must agree on every tensor's place, so both readers see one truth.
    """
    gguf_file = scan_gguf(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file.path, "r")
    except Exception as e:  # gguf-py raises assorted types on malformed input
        raise ModelFileError(gguf_file.path, f"gguf reader failed: {e}") from None
    for t in reader.tensors:
        info = gguf_file.tensors.get(t.name)
        if info is None or info.offset != t.data_offset or info.n_bytes != t.n_bytes:
            raise ModelFileError(gguf_file.path, f"tensor {t.name}: gguf reader disagrees on its place")
    gguf_file._data = reader.data
    return gguf_file
