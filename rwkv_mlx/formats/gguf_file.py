"""GGUF files: the whole structure bounds-checked against the file size, then tensor data memory-mapped.

A model file comes from the internet, so nothing it says is trusted before it
is checked: ``scan_gguf`` walks the header, the metadata and the tensor table
with explicit bounds (every count, length, dimension and offset, against the
file size and against fixed caps far above any real file), so a hostile file
costs at most a few seconds and memory proportional to its metadata, and
raises ``ModelFileError`` naming the file and the first problem.  Tensor data
then stay memory-mapped views and are never copied here.

gguf-py's ``GGUFReader`` is not used on this path: it spends about 40 us per
metadata string (2.5 s for a 65536-token vocabulary, which this scan reads in
0.03 s) and has no bounds of its own.  The tests cross-check this scan against
it on every oracle file and on every fuzzed file the scan accepts.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import ModelFileError, UnsupportedModelError
from ..quants import BLOCK_TYPES

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp reads only 2 and 3 too
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses tensor names of 64 bytes or more
DEFAULT_ALIGNMENT = 32
# Caps far above any real file (an RWKV-7 file has ~20 keys, 6 + 28 L tensors and a
# 65536-entry vocabulary), so that parsing a hostile file stays cheap in time and memory.
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24  # a metadata string (chat templates are ~10 KB)
MAX_METADATA_ENTRIES = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 21  # all metadata arrays together: 32 full world vocabularies
MAX_ELEMENTS = 1 << 40  # per tensor; keeps byte counts far from overflow

# value type id -> (struct format, size) for fixed-size scalars (GGUF spec)
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_UINT32, _STRING, _ARRAY = 4, 8, 9
_U64 = struct.Struct("<Q")
_NP_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_GGML_TYPE_NAMES = {int(t): t.name for t in GGMLQuantizationType}


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
            try:
                self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
            except OSError as e:
                raise ModelFileError(self.path, f"cannot map the file ({e.strerror or e})") from None
            if len(self._data) < max((t.offset + t.n_bytes for t in self.tensors.values()), default=0):
                raise ModelFileError(self.path, "the file shrank after it was checked")
        return self._data

    def file_size(self) -> int:
        return self.path.stat().st_size


class _Cursor:
    """Reads little-endian values from a mapped file, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path
        self.array_budget = MAX_ARRAY_ELEMENTS

    def fail(self, what: str, error=ModelFileError):
        raise error(self.path, what)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]  # slicing an mmap copies: nothing stays exported
        self.pos += n
        return out

    def scalar(self, type_id: int, what: str):
        fmt, size = _SCALARS[type_id]
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        return self.strings(1, what, limit)[0]

    def strings(self, count: int, what: str, limit: int = MAX_STRING_BYTES) -> list[str]:
        """``count`` length-prefixed UTF-8 strings in a row (a vocabulary is the hot loop of a scan: kept tight)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        for i in range(count):
            n = unpack(buf, pos)[0] if size - pos >= 8 else None
            if n is None or n > limit or n > size - pos - 8:
                self.pos = pos
                self._bad_string(n, limit, what if count == 1 else f"element {i} of {what}")
            try:
                out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8"))  # slicing an mmap copies
            except UnicodeDecodeError:
                self.fail(f"{what if count == 1 else f'element {i} of {what}'} is not valid UTF-8")
            pos += 8 + n
        self.pos = pos
        return out

    def _bad_string(self, n: int | None, limit: int, what: str) -> None:
        if n is None:
            self.need(8, f"length of {what}")
        if n > limit:
            self.fail(f"{what} is {n} bytes long (limit {limit})")
        self.pos += 8
        self.need(n, what)

    def value(self, type_id: int, key: str):
        if type_id in _SCALARS:
            return self.scalar(type_id, f"value of {key}")
        if type_id == _STRING:
            return self.string(f"value of {key}", MAX_STRING_BYTES)
        if type_id != _ARRAY:
            self.fail(f"metadata {key}: unknown value type {type_id}")
        elem = self.u32(f"element type of {key}")
        count = self.u64(f"element count of {key}")
        if elem == _ARRAY:
            self.fail(f"metadata {key}: nested arrays are not supported")
        if elem not in _SCALARS and elem != _STRING:
            self.fail(f"metadata {key}: unknown array element type {elem}")
        # each element costs at least one byte (a string: its 8-byte length)
        least = _SCALARS[elem][1] if elem in _SCALARS else 8
        if count * least > self.size - self.pos:
            self.fail(f"metadata {key}: array of {count} elements runs past the end of the file")
        if count > self.array_budget:
            self.fail(f"metadata {key}: array of {count} elements is beyond the limit of "
                      f"{MAX_ARRAY_ELEMENTS} array elements per file")
        self.array_budget -= count
        if elem == _STRING:
            return self.strings(count, f"metadata {key}")
        raw = self.take(count * least, f"array {key}")
        return np.frombuffer(raw, dtype=_NP_SCALARS[elem])


def scan_gguf(path: str | os.PathLike) -> GGUFFile:
    """Validate the whole GGUF structure against the file size; return its contents.

    Raises ``ModelFileError`` (one line: file and problem) for anything that is
    not a well-formed GGUF file: bad magic or version, counts or lengths that
    cannot fit in the file or pass the caps above, unknown value or block types,
    duplicate names, dimensions that are not whole blocks, misaligned or
    overlapping data; ``UnsupportedModelError`` for a well-formed file with a
    block type rwkv-mlx does not decode, or a big-endian one.
    """
    path = Path(path)
    try:
        if not path.is_file():
            if path.is_dir():
                raise ModelFileError(path, "is a directory, not a GGUF file")
            if path.exists():
                raise ModelFileError(path, "not a regular file")
            raise ModelFileError(path, "no such file")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ModelFileError(path, "empty file, not GGUF")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:  # permissions, I/O errors, names too long, loops of links, ...
        raise ModelFileError(path, f"cannot read ({e.strerror or e})") from None
    except ValueError as e:  # a NUL byte in the name
        raise ModelFileError(path, f"unusable path ({e})") from None
    try:
        return _scan(_Cursor(buf, path), path, size)
    finally:
        buf.close()


def _scan(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    if size < len(GGUF_MAGIC) or cur.take(len(GGUF_MAGIC), "magic") != GGUF_MAGIC:
        cur.fail("not a GGUF file (bad magic)")
    version = cur.u32("version")
    if version not in GGUF_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in GGUF_VERSIONS:
            cur.fail("big-endian GGUF files are not supported", UnsupportedModelError)
        cur.fail(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # smallest possible entries: a kv is 8 (key len) + 4 (type) + 1; a tensor info 8+4+8+4+8
    if n_kv * 13 > size - cur.pos or n_tensors * 32 > size - cur.pos:
        cur.fail(f"truncated or corrupt: header claims {n_kv} metadata entries and {n_tensors} tensors, "
                 f"more than a {size}-byte file can hold")
    if n_kv > MAX_METADATA_ENTRIES or n_tensors > MAX_TENSORS:
        cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors "
                 f"(limits {MAX_METADATA_ENTRIES} and {MAX_TENSORS})")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", MAX_KEY_BYTES)
        if key in metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        type_id = cur.u32(f"type of {key}")
        if key == "general.alignment" and type_id != _UINT32:
            cur.fail(f"general.alignment has value type {type_id}, not uint32")
        metadata[key] = cur.value(type_id, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        cur.fail(f"general.alignment {alignment} is not a power of two")

    entries = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", GGML_MAX_NAME - 1)
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
            if ggml_type in _GGML_TYPE_NAMES:
                cur.fail(f"tensor {name}: block type {_GGML_TYPE_NAMES[ggml_type]} is not supported by rwkv-mlx",
                         UnsupportedModelError)
            cur.fail(f"tensor {name}: unknown block type {ggml_type}")
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
    for (_, e0, n0), (s1, _, n1) in itertools.pairwise(spans):
        if s1 < e0:
            cur.fail(f"tensors {n0} and {n1} overlap")
    return GGUFFile(path, version, metadata, tensors, int(alignment))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Validate ``path`` (``scan_gguf``) and memory-map its tensor data for ``GGUFFile.raw``."""
    gguf_file = scan_gguf(path)
    gguf_file._mapped()
    return gguf_file
