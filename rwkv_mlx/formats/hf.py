"""Hugging Face formats: safetensors files, and RWKV-7 checkpoint directories.

safetensors (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the
raw little-endian tensor bytes.  ``read_safetensors`` checks every offset and
size against the file before mapping it; ``write_safetensors`` streams arrays
to disk (Python's own file writes, so a full disk raises ``OSError(ENOSPC)``
rather than MLX's errno-less ``RuntimeError``).

An RWKV-7 directory holds ``config.json`` and ``*.safetensors`` (or
``pytorch_model*.bin``, read like a ``.pth``) in one of two layouts, both read
by llama.cpp's converter (spec 3.3):

* RWKV-org ``Rwkv7ForCausalLM``: ``model.layers.N.attention.{x_r, ..., w1, ...,
  key, ..., ln_x}``, ``feed_forward.{x_k, key, value}``, ``ln1``/``ln2``,
  ``model.pre_ln`` or ``model.layers.0.pre_norm``, ``model.ln_out``,
  ``head``/``lm_head``; LoRA matrices in BlinkDL's orientation (``x @ w1``);
* fla-hub ``RWKV7ForCausalLM`` (also mlx-lm's ``rwkv7`` names): ``attn``, ``ffn``,
  ``attn_norm``/``ffn_norm``, ``r_proj``/``k_proj``/``v_proj``/``o_proj``,
  ``g_norm``, ``model.norm``, and LoRAs as ``nn.Linear`` pairs
  ``{w,a,v,g}_lora.lora.{0,2}.weight`` (+ ``lora.2.bias`` = w0/a0/v0), stored
  transposed relative to BlinkDL.

``read_hf_dir`` renames and reorients both into BlinkDL's ``.pth`` names
(``blocks.N.att.w1`` as (C, rank), ...), so one mapping (convert.py) takes
every non-GGUF source to the model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from ..errors import ModelFileError, UnsupportedModelError
from .pth import STORED_DTYPES, StoredTensor, read_pth
from .vocab import WORLD_VOCAB_FILE_NAME

MAX_HEADER_BYTES = 100 << 20

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "U32": "uint32"}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
HF_ARCHITECTURES = ("Rwkv7ForCausalLM", "RWKV7ForCausalLM")


# --------------------------------------------------------------------------------------
# safetensors files


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; tensor data stay on disk until read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(path, "too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise ModelFileError(path, f"safetensors header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise ModelFileError(path, "no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(path, "safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    mapped: list[np.ndarray] = []

    def region(start: int, stop: int) -> np.ndarray:
        if not mapped:
            mapped.append(np.memmap(path, dtype=np.uint8, mode="r"))
        return mapped[0][data_start + start : data_start + stop]

    tensors = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(path, f"tensor {name}: unsupported or malformed entry {str(entry)[:80]}") from None
        need = int(np.prod(shape, dtype=np.int64)) * STORED_DTYPES[dtype].itemsize
        if min(shape, default=0) < 0 or not 0 <= start <= stop <= data_size or stop - start != need:
            raise ModelFileError(path, f"tensor {name}: data_offsets {[start, stop]} do not fit shape {list(shape)} "
                                       f"of {entry['dtype']} in {data_size} bytes of data")
        tensors[name] = StoredTensor(
            dtype, shape, lambda a=start, b=stop, d=dtype, s=shape: region(a, b).view(STORED_DTYPES[d]).reshape(s))
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _stored_bits(array) -> tuple[str, memoryview]:
    """(safetensors dtype name, a buffer of the bytes) for an MLX or numpy array."""
    if isinstance(array, mx.array):
        name = str(array.dtype).rsplit(".", 1)[-1]  # mx.float16 -> "float16"
        if name == "bfloat16":
            array = array.view(mx.uint16)
        data = np.asarray(array)
    else:
        data = np.asarray(array)
        name = data.dtype.name
    if name not in _DTYPE_NAMES:
        raise ValueError(f"safetensors writer: dtype {name} is not supported")
    return _DTYPE_NAMES[name], memoryview(np.ascontiguousarray(data)).cast("B")


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> int:
    """Write ``arrays`` (MLX or numpy) as one safetensors file that ``mx.load`` reads; returns its size.

    The file is flushed and fsynced, so a full disk surfaces here as ``OSError``.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "mlx"})}
    buffers = []
    offset = 0
    for name, array in arrays.items():
        dtype, buf = _stored_bits(array)
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + buf.nbytes]}
        buffers.append(buf)
        offset += buf.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for buf in buffers:
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(text) + offset


# --------------------------------------------------------------------------------------
# RWKV-7 directories


@dataclass
class HFCheckpoint:
    """An HF RWKV-7 directory, its tensors renamed to BlinkDL's ``.pth`` names and orientation."""

    path: Path
    layout: str  # "rwkv-org" | "fla"
    config: dict
    tensors: dict[str, StoredTensor]
    files: list[Path] = field(default_factory=list)
    vocab_file: Path | None = None

    @property
    def norm_eps(self) -> float:
        return float(self.config.get("layer_norm_epsilon", self.config.get("norm_eps", 1e-5)))

    @property
    def head_size(self) -> int | None:
        value = self.config.get("head_size", self.config.get("head_dim"))
        return None if value is None else int(value)


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory with config.json naming an RWKV-7 causal LM (or any model type: the reader says which)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("architectures" in config or "model_type" in config) and "format" not in config


_LORA = re.compile(r"([wavg])_lora\.lora\.([02])\.(weight|bias)")
_ATT_RENAMES = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}


def blinkdl_name(name: str) -> tuple[str, bool] | None:
    """(BlinkDL name, needs a transpose) for an HF tensor name; None for names of neither layout."""
    n = name[len("model."):] if name.startswith("model.") else name
    if n == "embeddings.weight":
        return "emb.weight", False
    if n in ("head.weight", "lm_head.weight"):
        return "head.weight", False
    m = re.fullmatch(r"(?:pre_ln|layers\.0\.pre_norm)\.(weight|bias)", n)
    if m:
        return f"blocks.0.ln0.{m.group(1)}", False
    m = re.fullmatch(r"(?:ln_out|norm)\.(weight|bias)", n)
    if m:
        return f"ln_out.{m.group(1)}", False
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", n)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    part, _, sub = rest.partition(".")
    if part in ("ln1", "attn_norm", "ln2", "ffn_norm") and sub in ("weight", "bias"):
        return f"blocks.{layer}.{'ln1' if part in ('ln1', 'attn_norm') else 'ln2'}.{sub}", False
    if part in ("feed_forward", "ffn") and sub:
        return f"blocks.{layer}.ffn.{sub}", False
    if part not in ("attention", "attn") or not sub:
        return None
    lora = _LORA.fullmatch(sub)
    if lora:
        kind, index, what = lora.groups()
        if what == "bias":
            return (f"blocks.{layer}.att.{kind}0", False) if index == "2" and kind != "g" else None
        return f"blocks.{layer}.att.{kind}{1 if index == '0' else 2}", True  # nn.Linear (out, in) -> BlinkDL (in, out)
    head, _, tail = sub.partition(".")
    return f"blocks.{layer}.att.{_ATT_RENAMES.get(head, head)}{'.' + tail if tail else ''}", False


def _transposed(t: StoredTensor) -> StoredTensor:
    if len(t.shape) != 2:
        return t
    return StoredTensor(t.dtype, t.shape[::-1], lambda: np.ascontiguousarray(t.read().T))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({path / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError):
            raise ModelFileError(index, "not a valid safetensors index") from None
    files = sorted(path.glob("*.safetensors"))
    return files or sorted(path.glob("pytorch_model*.bin"))


def read_hf_dir(path: str | os.PathLike) -> HFCheckpoint:
    """Read an HF RWKV-7 directory's config and tensor table (no tensor data)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelFileError(path, "no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(path / "config.json", f"unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(path / "config.json", "not a JSON object")
    archs = config.get("architectures") or []
    if not (set(archs) & set(HF_ARCHITECTURES) or config.get("model_type") == "rwkv7"):
        raise UnsupportedModelError(path, f"architecture {archs or config.get('model_type')!r} is not RWKV-7 "
                                          f"(expected {' or '.join(HF_ARCHITECTURES)})")
    files = _weight_files(path)
    if not files:
        raise ModelFileError(path, "no *.safetensors or pytorch_model*.bin weights")
    raw: dict[str, StoredTensor] = {}
    for f in files:
        found = read_pth(f) if f.suffix == ".bin" else read_safetensors(f)[0]
        for name, t in found.items():
            if name in raw:
                raise ModelFileError(f, f"tensor {name} appears in two weight files")
            if t.dtype not in ("float32", "float16", "bfloat16"):
                raise ModelFileError(f, f"tensor {name} is {t.dtype}; rwkv-mlx converts float32, float16 and bfloat16")
            raw[name] = t
    tensors: dict[str, StoredTensor] = {}
    unknown = []
    for name, t in raw.items():
        mapped = blinkdl_name(name)
        if mapped is None:
            unknown.append(name)
            continue
        new, transpose = mapped
        tensors[new] = _transposed(t) if transpose else t
    if unknown:
        raise UnsupportedModelError(path, f"tensors of no known RWKV-7 layout: {', '.join(sorted(unknown)[:4])}"
                                          f"{' ...' if len(unknown) > 4 else ''}")
    layout = "fla" if any("_lora.lora." in n or ".attn." in n for n in raw) else "rwkv-org"
    vocab = path / WORLD_VOCAB_FILE_NAME
    return HFCheckpoint(path, layout, config, tensors, files, vocab if vocab.is_file() else None)
