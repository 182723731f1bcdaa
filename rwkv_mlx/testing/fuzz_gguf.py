"""Fuzz rwkv-mlx's GGUF loader with broken and hostile files.

Every case is a mutated copy of a valid RWKV-7 GGUF file (an oracle file, or a tiny
synthetic model written by ``rwkv_mlx.formats.gguf_writer``).  ``rwkv_mlx.load(path,
LoadOptions.for_backend("cpu"))`` must either load it (and then run one forward pass over
two tokens) or raise ``ModelFileError`` (or a subclass) whose message is one line starting
with the file name -- within a time bound and a memory bound.  Anything else is a failure:
another exception, a MemoryError, a crash (a signal), a hang, a memory spike, a file that
must be rejected (a truncation) but loads, or a file the scan accepts that gguf-py's reader
reads differently.

Case families:
  truncate  cut at every structural boundary (after the magic, the version, the counts,
            each kv's key length / key / type / value and array parts, each tensor-info
            field, the end of the tensor table, the alignment padding, each tensor's
            data) and one byte before it
  flip      single-bit flips at seeded positions in the header, metadata, tensor-info,
            padding and data regions
  absurd    counts, lengths, dimensions, offsets and type ids set to 2^60, 2^63,
            2^64-1 (-1 as an i64), 2^32, 0, ...
  semantic  well-formed files with the wrong architecture (arwkv7, llama, none), missing
            or misshapen tensors, wrong metadata types, unknown or unsupported block
            types, duplicate names, bad alignment, mismatched token lists

Cases run in a worker process (one import of MLX for many cases); the parent enforces a
per-case timeout and restarts the worker after a crash or a hang.  The worker reports its
peak RSS (VmHWM, or getrusage) and MLX's peak memory for every case.

    python scripts/fuzz_gguf.py --minutes 10               # oracle files + tiny models
    python scripts/fuzz_gguf.py --minutes 1 --base my.gguf --seed 7

The GGUF editor here (``GGUFEditor``) finds every structural offset once, with gguf-py's
reader (independent of rwkv-mlx's scanner), then patches bytes or rebuilds the file with
changed metadata and tensor infos around the original tensor data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


U32, I32, F32, BOOL, STRING, ARRAY, U64, I64 = 4, 5, 6, 7, 8, 9, 10, 11
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
ABSURD_U64 = (1 << 32, 1 << 60, 1 << 63, (1 << 64) - 1)
ABSURD_U32 = (1 << 31, (1 << 32) - 1)
ACCEPTED = ("rejected", "loaded")  # outcomes that pass
RSS_BOUND = 512 << 20  # growth of the worker's peak RSS over its warm-up, per case
# the oracle beside a checkout (../shared/oracle), as the tests find it
ORACLE_MODELS = Path(os.environ.get("RWKV_MLX_ORACLE", Path(__file__).resolve().parents[3] / "shared" / "oracle")) / "models"
TINY_SHAPE = dict(n_layer=2, n_embd=64, ffn=128, ranks=(8, 8, 8, 8), head_size=32)
TINY_VOCAB = 512  # covers every single byte (ids 1..256) and the end-of-turn id 261


# --------------------------------------------------------------------------------------
# where everything is in a GGUF file


@dataclass
class Entry:
    """One metadata entry or tensor-info entry: its name and the (start, end, label) of each part."""

    name: str
    parts: list[tuple[int, int, str]]
    value_type: int = -1  # metadata only

    @property
    def start(self) -> int:
        return self.parts[0][0]

    @property
    def end(self) -> int:
        return self.parts[-1][1]

    def part(self, label: str) -> tuple[int, int]:
        for start, end, lab in self.parts:
            if lab == label:
                return start, end
        raise KeyError(label)


@dataclass
class Layout:
    """Offsets of every structural part of a valid GGUF file, found by gguf-py's reader."""

    size: int
    alignment: int
    kvs: list[Entry]
    infos: list[Entry]
    info_end: int
    data_start: int
    tensors: dict[str, tuple[list[int], int, int, int, int]]  # name -> (dims ne0-first, type, rel offset, abs start, n_bytes)

    @classmethod
    def of(cls, path: Path) -> Layout:
        from gguf import GGUFReader, GGUFValueType

        reader = GGUFReader(path)
        kvs = []
        for key, f in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            vtype = int(f.types[0])
            labels = ["key length", "key", "value type"]
            if vtype == GGUFValueType.STRING:
                labels += ["value length", "value"]
            elif vtype == GGUFValueType.ARRAY:
                labels += ["element type", "element count"]
                if f.types[1] == GGUFValueType.STRING:
                    for i in range(len(f.parts[5:]) // 2):
                        labels += [f"element {i} length", f"element {i}"]
                else:
                    labels += [f"element {i}" for i in range(len(f.parts[5:]))]
            else:
                labels += ["value"]
            kvs.append(Entry(key, _spans(f.offset, f.parts, labels), vtype))
        infos, tensors = [], {}
        for t in reader.tensors:
            f = t.field
            n_dims = int(f.parts[2][0])
            labels = ["name length", "name", "dimension count", *[f"dimension {d}" for d in range(n_dims)], "type", "offset"]
            sizes = [f.parts[0].nbytes, f.parts[1].nbytes, 4, *[8] * n_dims, 4, 8]
            parts, pos = [], f.offset
            for size, label in zip(sizes, labels):
                parts.append((pos, pos + size, label))
                pos += size
            infos.append(Entry(t.name, parts))
            rel = int(f.parts[-1][0])
            tensors[t.name] = ([int(d) for d in f.parts[3]], int(t.tensor_type), rel, reader.data_offset + rel, int(t.n_bytes))
        info_end = infos[-1].end if infos else (kvs[-1].end if kvs else 24)
        return cls(path.stat().st_size, reader.alignment, kvs, infos, info_end, reader.data_offset, tensors)


def _spans(offset: int, parts, labels: list[str]) -> list[tuple[int, int, str]]:
    out, pos = [], offset
    for part, label in zip(parts, labels):
        out.append((pos, pos + part.nbytes, label))
        pos += part.nbytes
    return out


# --------------------------------------------------------------------------------------
# writing GGUF pieces


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(vtype: int, value) -> bytes:
    """The bytes of a value of ``vtype``; an array value is (element type, list of values)."""
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        elem, values = value
        return struct.pack("<IQ", elem, len(values)) + b"".join(gguf_value(elem, v) for v in values)
    return struct.pack(_FMT[vtype], value)


def gguf_kv(key: str, vtype: int, value) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)


def gguf_tensor_info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


class GGUFEditor:
    """A valid GGUF file as bytes plus its layout: patch bytes, or rebuild with changed metadata/tensor infos."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data = self.path.read_bytes()
        self.layout = Layout.of(self.path)

    def kv(self, key: str) -> Entry:
        return next(e for e in self.layout.kvs if e.name == key)

    def info(self, name: str) -> Entry:
        return next(e for e in self.layout.infos if e.name == name)

    def truncated(self, n: int) -> bytes:
        return self.data[:n]

    def patched(self, pos: int, raw: bytes) -> bytes:
        return self.data[:pos] + raw + self.data[pos + len(raw):]

    def flipped(self, bit: int) -> bytes:
        pos = bit // 8
        return self.patched(pos, bytes([self.data[pos] ^ (1 << (bit % 8))]))

    def with_int(self, span: tuple[int, int], value: int) -> bytes:
        """Overwrite a u32 or u64 field (by its span) with ``value`` (taken modulo its width)."""
        start, end = span
        width = end - start
        return self.patched(start, (value % (1 << (8 * width))).to_bytes(width, "little"))

    def rebuilt(self, kvs: dict[str, bytes | None] | None = None, infos: dict[str, bytes | None] | None = None,
                append_kvs: list[bytes] = (), append_infos: list[bytes] = (), version: int = 3,
                alignment: int | None = None, tail: bytes = b"") -> bytes:
        """The file with some kv entries / tensor infos replaced by raw bytes (None drops one), the data kept.

        Tensor data offsets are relative to the data section, so the data bytes are
        reused unchanged after the new table, padded to ``alignment``; ``tail`` is appended.
        """
        kvs, infos = kvs or {}, infos or {}
        kv_blobs = [kvs.get(e.name, self.data[e.start : e.end]) for e in self.layout.kvs] + list(append_kvs)
        info_blobs = [infos.get(e.name, self.data[e.start : e.end]) for e in self.layout.infos] + list(append_infos)
        kv_blobs = [b for b in kv_blobs if b is not None]
        info_blobs = [b for b in info_blobs if b is not None]
        head = b"GGUF" + struct.pack("<IQQ", version, len(info_blobs), len(kv_blobs)) + b"".join(kv_blobs) + b"".join(info_blobs)
        align = alignment or self.layout.alignment
        head += b"\0" * (-len(head) % align)
        return head + self.data[self.layout.data_start :] + tail

    def with_kv(self, key: str, vtype: int, value) -> bytes:
        """Replace (or add) metadata ``key``."""
        blob = gguf_kv(key, vtype, value)
        if any(e.name == key for e in self.layout.kvs):
            return self.rebuilt(kvs={key: blob})
        return self.rebuilt(append_kvs=[blob])

    def without_kv(self, key: str) -> bytes:
        return self.rebuilt(kvs={key: None})

    def with_tensor(self, name: str, *, new_name: str | None = None, dims: list[int] | None = None,
                    ggml_type: int | None = None, offset: int | None = None) -> bytes:
        old_dims, old_type, old_offset, _, _ = self.layout.tensors[name]
        blob = gguf_tensor_info(new_name or name, old_dims if dims is None else dims,
                                old_type if ggml_type is None else ggml_type, old_offset if offset is None else offset)
        return self.rebuilt(infos={name: blob})

    def without_tensor(self, name: str) -> bytes:
        return self.rebuilt(infos={name: None})


# --------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    family: str
    label: str
    make: Callable[[], bytes]
    must_reject: bool = False
    match: str | None = None  # a fragment the error message must contain
    crosscheck: bool = False  # compare the scan with gguf-py's reader if the scan accepts
    selftest: str | None = None  # "hang", "crash" or "memory": make the worker misbehave (tests the harness)


def truncation_points(ed: GGUFEditor, rng: random.Random, elements: int) -> list[tuple[int, str]]:
    """(length, label) for a cut after each structural part, and after ``elements`` sampled array elements."""
    lay = ed.layout
    points = [(4, "after magic"), (8, "after version"), (16, "after tensor count"), (24, "after metadata count")]
    inside_arrays = []
    for e in lay.kvs:
        for _, end, label in e.parts:
            (inside_arrays if label.startswith("element ") else points).append((end, f"kv {e.name}: after {label}"))
    points += rng.sample(inside_arrays, min(elements, len(inside_arrays)))
    for e in lay.infos:
        points += [(end, f"tensor info {e.name}: after {label}") for _, end, label in e.parts]
    points += [(lay.info_end, "end of tensor table"), (lay.data_start, "after alignment padding")]
    for name, (_, _, _, start, n_bytes) in lay.tensors.items():
        points += [(start + n_bytes // 2, f"inside data of {name}"), (start + n_bytes, f"after data of {name}")]
    out = []
    for n, label in points:
        out += [(n, label), (n - 1, f"1 byte short: {label}")]
    return [(n, label) for n, label in dict(out).items() if 0 < n < lay.size]


def truncate_cases(ed: GGUFEditor, rng: random.Random, limit: int | None, elements: int) -> Iterator[Case]:
    points = truncation_points(ed, rng, elements)
    if limit is not None and len(points) > limit:
        points = rng.sample(points, limit)
    data_end = max(start + n for _, _, _, start, n in ed.layout.tensors.values())
    for n, label in sorted(points):
        # a cut inside trailing padding after the last tensor leaves a valid file
        yield Case("truncate", f"{label} ({n} bytes)", lambda n=n: ed.truncated(n), must_reject=n < data_end)


REGIONS = ("header", "metadata", "tensor info", "padding", "data")


def regions(ed: GGUFEditor) -> dict[str, tuple[int, int]]:
    lay = ed.layout
    first_info = lay.infos[0].start if lay.infos else lay.info_end
    bounds = (0, 24, first_info, lay.info_end, lay.data_start, lay.size)
    return {region: (bounds[i], bounds[i + 1]) for i, region in enumerate(REGIONS)}


def flip_cases(ed: GGUFEditor, rng: random.Random, per_region: dict[str, int]) -> Iterator[Case]:
    for region, (start, end) in regions(ed).items():
        for _ in range(per_region.get(region, 0) if end > start else 0):
            bit = rng.randrange(start * 8, end * 8)
            yield Case("flip", f"{region}: bit {bit % 8} of byte {bit // 8}", lambda bit=bit: ed.flipped(bit),
                       crosscheck=region != "data")


def absurd_targets(ed: GGUFEditor) -> list[tuple[tuple[int, int], int, str]]:
    """(span, value, label) for every count, length, type, dimension and offset field."""
    lay = ed.layout
    out = [((4, 8), v, "version") for v in (0, 1, 4, 3 << 24, *ABSURD_U32)]
    out += [((8, 16), v, "tensor count") for v in (*ABSURD_U64, lay.size // 32 + 1)]
    out += [((16, 24), v, "metadata count") for v in (*ABSURD_U64, lay.size // 13 + 1)]
    for e in lay.kvs:
        out += [(e.part("key length"), v, f"kv {e.name}: key length") for v in (*ABSURD_U64, 1 << 17)]
        out += [(e.part("value type"), v, f"kv {e.name}: value type") for v in (13, ARRAY, *ABSURD_U32)]
        if e.value_type == STRING:
            out += [(e.part("value length"), v, f"kv {e.name}: string length") for v in ABSURD_U64]
        if e.value_type == ARRAY:
            out += [(e.part("element count"), v, f"kv {e.name}: element count") for v in (*ABSURD_U64, (1 << 21) + 1)]
            out += [(e.part("element type"), v, f"kv {e.name}: element type") for v in (13, ARRAY, *ABSURD_U32)]
    for e in lay.infos:
        dims, _, offset, _, _ = lay.tensors[e.name]
        out += [(e.part("name length"), v, f"tensor {e.name}: name length") for v in (*ABSURD_U64, 64)]
        out += [(e.part("dimension count"), v, f"tensor {e.name}: dimension count") for v in (0, 5, *ABSURD_U32)]
        for d in range(len(dims)):
            out += [(e.part(f"dimension {d}"), v, f"tensor {e.name}: dimension {d}") for v in (0, *ABSURD_U64)]
        out += [(e.part("type"), v, f"tensor {e.name}: type") for v in (16, 99, *ABSURD_U32)]
        out += [(e.part("offset"), v, f"tensor {e.name}: offset")
                for v in (offset + 1, lay.size, *ABSURD_U64, (1 << 64) - lay.alignment)]
    return out


def absurd_cases(ed: GGUFEditor, rng: random.Random, limit: int | None) -> Iterator[Case]:
    targets = absurd_targets(ed)
    if limit is not None and len(targets) > limit:
        targets = rng.sample(targets, limit)
    for span, value, label in targets:
        yield Case("absurd", f"{label} = {value}", lambda span=span, value=value: ed.with_int(span, value),
                   crosscheck=True)


def semantic_cases(ed: GGUFEditor) -> Iterator[Case]:
    """Well-formed files that are not usable RWKV-7 models (or, marked, still are)."""
    lay = ed.layout
    names = list(lay.tensors)
    n_layer = sum(1 for n in names if n.endswith(".attn_norm.weight"))
    vocab = lay.tensors["token_embd.weight"][0][1]
    tokens_n = len([p for p in ed.kv("tokenizer.ggml.tokens").parts if p[2].startswith("element ") and "length" not in p[2]])

    def case(label, make, must_reject=True, match=None):
        return Case("semantic", label, make, must_reject=must_reject, match=match, crosscheck=True)

    arch = "general.architecture"
    yield case("architecture arwkv7", lambda: ed.with_kv(arch, STRING, "arwkv7"), match="arwkv7")
    yield case("architecture llama", lambda: ed.with_kv(arch, STRING, "llama"), match="llama")
    yield case("architecture empty", lambda: ed.with_kv(arch, STRING, ""))
    yield case("no architecture key", lambda: ed.without_kv(arch), match="general.architecture")
    yield case("architecture as uint32", lambda: ed.with_kv(arch, U32, 7))
    yield case("architecture as array", lambda: ed.with_kv(arch, ARRAY, (STRING, ["rwkv7"])))
    for key in ("rwkv7.embedding_length", "rwkv7.block_count", "rwkv7.wkv.head_size", "rwkv7.feed_forward_length"):
        yield case(f"missing {key}", lambda key=key: ed.without_kv(key), match=key)
        yield case(f"{key} as array", lambda key=key: ed.with_kv(key, ARRAY, (U32, [64])), match=key)
        yield case(f"{key} as string", lambda key=key: ed.with_kv(key, STRING, "abc"), match=key)
        for v in (float("nan"), float("inf")):
            yield case(f"{key} as float {v}", lambda key=key, v=v: ed.with_kv(key, F32, v), match=key)
        for v in (0, -1):
            yield case(f"{key} = {v} (i64)", lambda key=key, v=v: ed.with_kv(key, I64, v))
        for v in (3, 1 << 31, 1 << 40, (1 << 64) - 1):
            yield case(f"{key} = {v} (u64)", lambda key=key, v=v: ed.with_kv(key, U64, v))
    yield case("block_count one too many", lambda: ed.with_kv("rwkv7.block_count", U32, n_layer + 1))
    yield case("decay rank metadata mismatch", lambda: ed.with_kv("rwkv7.attention.decay_lora_rank", U32, 999), match="999")
    for v in (float("nan"), float("inf"), -1.0, 0.0):
        yield case(f"layer_norm_epsilon = {v}", lambda v=v: ed.with_kv("rwkv7.attention.layer_norm_epsilon", F32, v))
    yield case("layer_norm_epsilon as string", lambda: ed.with_kv("rwkv7.attention.layer_norm_epsilon", STRING, "x"))
    # tokenizer
    tok = "tokenizer.ggml."
    yield case("tokenizer model gpt2", lambda: ed.with_kv(tok + "model", STRING, "gpt2"), match="gpt2")
    yield case("no tokenizer model", lambda: ed.without_kv(tok + "model"))
    yield case("no token list", lambda: ed.without_kv(tok + "tokens"), match="tokens")
    yield case("empty token list", lambda: ed.with_kv(tok + "tokens", ARRAY, (STRING, [])))
    yield case("token list as uint32", lambda: ed.with_kv(tok + "tokens", ARRAY, (U32, list(range(tokens_n)))))
    yield case("token list longer than the embedding",
               lambda: ed.with_kv(tok + "tokens", ARRAY, (STRING, [f"t{i}" for i in range(vocab + 1)])))
    yield case("token list not valid escapes",
               lambda: ed.with_kv(tok + "tokens", ARRAY, (STRING, ["<s>"] + ["\\x"] * (tokens_n - 1))))
    yield case("token types one short", lambda: ed.with_kv(tok + "token_type", ARRAY, (I32, [1] * (tokens_n - 1))))
    yield case("token types as strings", lambda: ed.with_kv(tok + "token_type", ARRAY, (STRING, ["x"] * tokens_n)))
    yield case("token types as scalar", lambda: ed.with_kv(tok + "token_type", U32, 1))
    for vtype, v in ((STRING, "x"), (U32, 10**9), (I32, -1), (ARRAY, (U32, [1, 2])), (F32, float("nan"))):
        yield case(f"eot token id = {v!r}", lambda vtype=vtype, v=v: ed.with_kv(tok + "eot_token_id", vtype, v))
    # alignment and version
    align = "general.alignment"
    for vtype, v in ((U32, 0), (U32, 3), (U32, 48), (U64, 32), (I32, 32), (STRING, "32"), (U32, 1 << 31)):
        yield case(f"{align} = {v!r} (type {vtype})", lambda vtype=vtype, v=v: ed.rebuilt(append_kvs=[gguf_kv(align, vtype, v)]))
    yield case(f"{align} = 64, data not 64-aligned",
               lambda: ed.rebuilt(append_kvs=[gguf_kv(align, U32, 64)], alignment=64),
               must_reject=any(rel % 64 for _, _, rel, _, _ in lay.tensors.values()))
    yield case(f"{align} = 16 (valid)", lambda: ed.rebuilt(append_kvs=[gguf_kv(align, U32, 16)], alignment=16),
               must_reject=False)
    for version in (1, 2, 4):
        yield case(f"GGUF version {version}", lambda version=version: ed.rebuilt(version=version), must_reject=version != 2)
    yield case("duplicate metadata key", lambda: ed.rebuilt(append_kvs=[gguf_kv(arch, STRING, "rwkv7")]), match="duplicate")
    # tensors
    picks = ["token_embd.weight", "output.weight", "blk.0.time_mix_w1.weight", "blk.0.time_mix_a1.weight",
             f"blk.{n_layer - 1}.time_mix_v1.weight", f"blk.{n_layer - 1}.channel_mix_value.weight",
             "output_norm.bias", "blk.0.time_mix_lerp_fused.weight"]
    for name in picks:
        dims, gtype, offset, _, _ = lay.tensors[name]
        yield case(f"missing tensor {name}", lambda name=name: ed.without_tensor(name), match=name)
        # misshapen: the message names the tensor or the metadata it contradicts (a LoRA rank, the vocabulary)
        if len(dims) >= 2:
            yield case(f"{name} dims swapped", lambda name=name, dims=dims: ed.with_tensor(name, dims=[dims[1], dims[0], *dims[2:]]))
            yield case(f"{name} one row short", lambda name=name, dims=dims: ed.with_tensor(name, dims=[dims[0], dims[1] - 1, *dims[2:]]))
        yield case(f"{name} with an extra dimension",
                   lambda name=name, dims=dims: ed.with_tensor(name, dims=[*dims, 1] if len(dims) < 4 else [*dims[:3], 2]))
        yield case(f"{name} block type IQ2_XXS (unsupported)", lambda name=name: ed.with_tensor(name, ggml_type=16), match="IQ2_XXS")
        yield case(f"{name} block type 99 (unknown)", lambda name=name: ed.with_tensor(name, ggml_type=99), match="99")
        yield case(f"{name} data offset misaligned", lambda name=name, offset=offset: ed.with_tensor(name, offset=offset + lay.alignment // 2))
        yield case(f"{name} data offset past the end", lambda name=name: ed.with_tensor(name, offset=lay.size))
        other = names[(names.index(name) + 1) % len(names)]
        yield case(f"{name} data overlapping {other}", lambda name=name, other=other: ed.with_tensor(name, offset=lay.tensors[other][2]),
                   match="overlap")
        yield case(f"{name} renamed to {other} (duplicate)", lambda name=name, other=other: ed.with_tensor(name, new_name=other),
                   match="duplicate")
        if gtype == 0 and len(dims) == 1:
            yield case(f"{name} F32 relabelled F16 (valid, different values)", lambda name=name: ed.with_tensor(name, ggml_type=1),
                       must_reject=False)
    yield case("empty tensor table", lambda: ed.rebuilt(infos={n: None for n in names}))
    end = -(-(lay.size - lay.data_start) // lay.alignment) * lay.alignment  # past every tensor's data
    yield case("extra unknown tensor (valid)", lambda: ed.rebuilt(
        append_infos=[gguf_tensor_info("extra.weight", [32], 0, end)],
        tail=b"\0" * (lay.data_start + end - lay.size) + b"\1" * 128), must_reject=False)


def base_cases(ed: GGUFEditor, rng: random.Random, *, truncations: int | None, elements: int, flips: int,
               absurd: int | None) -> list[Case]:
    """Cases from one base file: ``truncations``/``absurd`` cap those families (None: all), ``elements``
    adds cuts inside metadata arrays, ``flips`` bit flips per region (an eighth of it in tensor data,
    where each flip costs a full load)."""
    per_region = {region: flips for region in REGIONS}
    per_region["data"] = max(flips // 8, 1)
    return [*truncate_cases(ed, rng, truncations, elements), *flip_cases(ed, rng, per_region),
            *absurd_cases(ed, rng, absurd), *semantic_cases(ed)]


def ci_plan(workdir: Path, seed: int = 0, oracle_models: Path = ORACLE_MODELS) -> list[tuple[Path, Case]]:
    """The seeded pass the test suite runs (under a minute on 2 cores): every structural cut, every
    absurd value and every semantic case on two tiny models (F32; Q4_K_M, which mixes F32, F16, Q5_0
    and Q8_0), samples of cuts and absurd values plus every semantic case on two oracle files when
    present, and seeded bit flips in each region of each file."""
    rng = random.Random(seed)
    plan = []
    tiny = write_tiny_model(workdir / "tiny-F32.gguf", "F32")
    plan += [(tiny, c) for c in base_cases(GGUFEditor(tiny), rng, truncations=None, elements=32, flips=100, absurd=None)]
    mixed = write_tiny_model(workdir / "tiny-Q4_K_M.gguf", "Q4_K_M")
    plan += [(mixed, c) for c in base_cases(GGUFEditor(mixed), rng, truncations=None, elements=32, flips=60, absurd=None)]
    for name in ("fixb-Q4_K_M", "fixa-Q6_K"):
        path = oracle_models / f"{name}.gguf"
        if path.is_file():
            for case in base_cases(GGUFEditor(path), rng, truncations=300, elements=32, flips=30, absurd=300):
                case.crosscheck = False  # gguf-py needs 0.2 s for a 4096-token file; the tiny files cover it
                plan.append((path, case))
    return plan


# --------------------------------------------------------------------------------------
# running cases


def write_tiny_model(path: Path, file_type: str = "F32", seed: int = 0) -> Path:
    """A 2-layer, 64-wide RWKV-7 with a 512-token vocabulary, written by rwkv_mlx.formats.gguf_writer."""
    from .synthetic import make_synthetic_model, synthetic_args

    make_synthetic_model(path, file_type, synthetic_args(**TINY_SHAPE, vocab=TINY_VOCAB), seed=seed)
    return path


def run_cli(args: list[str], stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``rwkv-mlx ARGS`` in a fresh interpreter (bytes in and out), as a user runs it."""
    code = "import sys; from rwkv_mlx.cli import main; sys.argv[0] = 'rwkv-mlx'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, env=env,
                          stdin=subprocess.DEVNULL if stdin is None else None, timeout=300)


def crosscheck(path: str) -> str | None:
    """None when the scan rejects the file or gguf-py's reader reads it the same; else the difference."""
    from gguf import GGUFReader

    from rwkv_mlx.errors import ModelFileError
    from rwkv_mlx.formats.gguf_file import scan_gguf

    try:
        g = scan_gguf(path)
    except ModelFileError:
        return None
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- any failure of the other reader is the finding
        return f"scan accepts, gguf-py raises {type(e).__name__}: {e}"
    theirs = {t.name: (t.data_offset, int(t.n_bytes), int(t.tensor_type), tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
    ours = {n: (i.offset, i.n_bytes, i.ggml_type, i.shape) for n, i in g.tensors.items()}
    if theirs != ours:
        diff = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        return f"tensor table differs from gguf-py's at {diff[:3]}"
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if list(fields) != list(g.metadata):
        return "metadata keys differ from gguf-py's"
    for key, f in fields.items():
        if not _same_value(g.metadata[key], f.contents()):
            return f"metadata {key} differs from gguf-py's"
    return None


def _same_value(ours, theirs) -> bool:
    ours = ours.tolist() if hasattr(ours, "tolist") else ours
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(map(_same_value, ours, theirs))
    if isinstance(ours, float) and math.isnan(ours):
        return isinstance(theirs, float) and math.isnan(theirs)
    return ours == theirs


def worker_main() -> None:
    """Load each path read from stdin; answer one JSON line per case on the original stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr
    import mlx.core as mx

    import rwkv_mlx
    from rwkv_mlx import LoadOptions
    from rwkv_mlx.errors import ModelFileError

    options = LoadOptions.for_backend("cpu")
    for line in sys.stdin:
        req = json.loads(line)
        path = req["path"]
        ballast = _misbehave(req.get("selftest"))  # noqa: F841 -- kept alive through the case
        mx.reset_peak_memory()
        start = time.perf_counter()
        res = {"outcome": "loaded"}
        try:
            model, _ = rwkv_mlx.load(path, options)
            logits, state = model(mx.array([[0, min(1, model.args.vocab_size - 1)]]))
            mx.eval(logits, *state.arrays())
            del model, logits, state
        except ModelFileError as e:
            msg = str(e)
            res.update(outcome="rejected", error=type(e).__name__, exit_code=e.exit_code, message=msg)
            if "\n" in msg or not msg.startswith(f"{path}: "):
                res["outcome"] = "bad-message"
        except MemoryError:
            res.update(outcome="memory-error")
        except Exception as e:  # noqa: BLE001 -- the finding: anything but our error
            res.update(outcome="wrong-error", error=type(e).__name__, message=str(e)[:300],
                       where=traceback.format_exc(limit=-3)[-600:])
        res["seconds"] = time.perf_counter() - start
        res["mlx_peak"] = mx.get_peak_memory()
        res["maxrss"] = peak_rss()
        if req.get("crosscheck"):
            res["crosscheck"] = crosscheck(path)
        print(json.dumps(res), file=out)


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    On Linux ``ru_maxrss`` keeps the parent's RSS at fork across exec, so a worker started by
    a big process (a long test session) would measure against the parent's peak and miss its
    own spikes; ``VmHWM`` counts this process image only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _misbehave(how: str | None):
    if how == "hang":
        time.sleep(3600)
    elif how == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "memory":
        # bytearray(n) is calloc'd from untouched zero pages and never reaches RSS; filling it
        # with a non-zero byte writes every page, so the spike is real wherever it runs.
        return b"\x01" * (RSS_BOUND + (64 << 20))
    return None


class Worker:
    """A worker process and the bounds it runs each case under."""

    def __init__(self, timeout: float, log: Path):
        self.timeout, self.log = timeout, log
        self.proc: subprocess.Popen | None = None
        self.baseline_rss = 0

    def start(self, warmup: Path) -> None:
        with open(self.log, "ab") as log:
            # the package's parent on PYTHONPATH: the worker finds rwkv_mlx installed or not
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]))
            self.proc = subprocess.Popen([sys.executable, "-m", "rwkv_mlx.testing.fuzz_gguf", "--worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env)
        res = self.ask({"path": str(warmup)}, timeout=max(self.timeout, 60))
        if res.get("outcome") != "loaded":
            raise RuntimeError(f"worker cannot load the valid base file {warmup}: {res}")
        self.baseline_rss = res["maxrss"]

    def ask(self, req: dict, timeout: float | None = None) -> dict:
        assert self.proc is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout or self.timeout):
                self.stop()
                return {"outcome": "hang", "message": f"no answer in {timeout or self.timeout:.0f} s"}
        line = self.proc.stdout.readline()
        return json.loads(line) if line else self._died()

    def _died(self) -> dict:
        code = self.proc.wait()
        self.proc = None
        return {"outcome": "crash", "message": f"worker exited with {code}" + (f" (signal {-code})" if code < 0 else "")}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case: Case, path: Path, file_size: int, warmup: Path) -> dict:
        if self.proc is None:
            self.start(warmup)
        res = self.ask({"path": str(path), "crosscheck": case.crosscheck, "selftest": case.selftest})
        outcome = res["outcome"]
        if outcome in ACCEPTED:
            if res["maxrss"] - self.baseline_rss > RSS_BOUND:
                res.update(outcome="memory", message=f"peak RSS grew by {(res['maxrss'] - self.baseline_rss) >> 20} MiB")
            elif res["mlx_peak"] > (64 << 20) + 8 * file_size:
                res.update(outcome="memory", message=f"MLX peak {res['mlx_peak'] >> 20} MiB for a {file_size >> 10} KiB file")
            elif case.must_reject and outcome == "loaded":
                res.update(outcome="not-rejected", message="loaded although it must be rejected")
            elif case.match and outcome == "rejected" and case.match not in res["message"]:
                res.update(outcome="vague-message", message=f"{res['message']!r} does not mention {case.match!r}")
            elif res.get("crosscheck"):
                res.update(outcome="disagree", message=res["crosscheck"])
        return res


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)  # (family, outcome) -> n
    failures: list[tuple[str, str, dict]] = field(default_factory=list)
    max_seconds: float = 0.0
    max_rss_growth: int = 0
    max_mlx_peak: int = 0
    cases: int = 0

    def add(self, base: str, case: Case, res: dict, baseline_rss: int) -> None:
        self.cases += 1
        self.counts[(case.family, res["outcome"])] += 1
        self.max_seconds = max(self.max_seconds, res.get("seconds", 0.0))
        if "maxrss" in res:
            self.max_rss_growth = max(self.max_rss_growth, res["maxrss"] - baseline_rss)
            self.max_mlx_peak = max(self.max_mlx_peak, res["mlx_peak"])
        if res["outcome"] not in ACCEPTED:
            self.failures.append((base, f"{case.family}: {case.label}", res))

    def table(self) -> list[tuple[str, str]]:
        families = sorted({f for f, _ in self.counts})
        rows = []
        for fam in families:
            parts = [f"{o} {n}" for (f, o), n in sorted(self.counts.items()) if f == fam]
            rows.append((fam, ", ".join(parts)))
        rows.append(("all", f"{self.cases} cases, {len(self.failures)} failures"))
        return rows


def run_cases(cases: list[tuple[Path, Case]], timeout: float = 20.0, deadline: float | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Run (base file, case) pairs through one worker; stop early at ``deadline`` (a time.monotonic() value).

    The worker warms up on the largest base file, so its peak RSS afterwards is the
    baseline every case is held to.
    """
    report = Report()
    warmup = max({b for b, _ in cases}, key=lambda b: b.stat().st_size)
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None  # case files in memory: one per case
    with tempfile.TemporaryDirectory(prefix="rwkv-mlx-fuzz-", dir=scratch) as tmp:
        worker = Worker(timeout, Path(tmp) / "worker.log")
        try:
            for base, case in cases:
                if deadline is not None and time.monotonic() > deadline:
                    break
                data = case.make()
                path = Path(tmp) / f"case-{report.cases}.gguf"
                path.write_bytes(data)
                res = worker.run(case, path, len(data), warmup)
                report.add(base.name, case, res, worker.baseline_rss)
                path.unlink()
                if progress:
                    progress(report.cases, len(cases), f"{base.name} {case.family}")
        finally:
            worker.stop()
    return report


def default_bases(workdir: Path) -> list[Path]:
    """The tiny synthetic models (F32, Q4_K_M: mixed types) plus every oracle file present."""
    bases = [write_tiny_model(workdir / f"tiny-{ft}.gguf", ft) for ft in ("F32", "Q4_K_M")]
    if ORACLE_MODELS.is_dir():
        bases += sorted(ORACLE_MODELS.glob("*.gguf"))
    return bases


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--worker"]:
        worker_main()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    ap.add_argument("--base", type=Path, action="append", help="base GGUF file(s); default: tiny models + oracle files")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--flips", type=int, default=400, help="bit flips per region per base file")
    ap.add_argument("--elements", type=int, default=256, help="cuts inside metadata arrays per base file")
    ap.add_argument("--ci", action="store_true", help="run the test suite's seeded pass (ci_plan) instead")
    args = ap.parse_args(argv)

    from rwkv_mlx.cli.common import print_table
    from rwkv_mlx.progress import Progress

    seed = args.seed if args.seed is not None else 0 if args.ci else int(time.time())
    rng = random.Random(seed)
    deadline = time.monotonic() + args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="rwkv-mlx-fuzz-bases-") as tmp:
        if args.ci:
            cases = ci_plan(Path(tmp), seed=seed)
            bases = sorted({b for b, _ in cases})
        else:
            bases = args.base or default_bases(Path(tmp))
            cases = [(b, c) for b in bases for c in base_cases(
                GGUFEditor(b), rng, truncations=None, elements=args.elements, flips=args.flips, absurd=None)]
            rng.shuffle(cases)  # a time-bounded run samples every family and base file evenly
        bar = Progress("fuzz", len(cases), " cases")
        start = time.perf_counter()
        report = run_cases(cases, args.timeout, deadline, progress=lambda d, t, n: bar.update(d, n))
        bar.close(f"{report.cases} of {len(cases)} planned cases")
    elapsed = time.perf_counter() - start
    print(f"seed {seed}, {len(bases)} base files, {elapsed:.0f} s, slowest case {report.max_seconds:.2f} s, "
          f"peak RSS growth {report.max_rss_growth / 2**20:.1f} MiB, MLX peak {report.max_mlx_peak / 2**20:.1f} MiB")
    print_table(report.table(), header=("family", "outcomes"))
    for base, label, res in report.failures[:50]:
        print(f"FAIL {base}: {label}: {res['outcome']}: {res.get('error', '')} {res.get('message', '')} {res.get('where', '')}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
