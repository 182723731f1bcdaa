"""What a load cost (``LoadInfo``) and the fast content hash that names a model's weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoadInfo:
    """What loading cost, for the CLI and the benchmark."""

    path: Path
    seconds: float
    file_bytes: int
    weight_bytes: int
    tensor_types: dict[str, int]


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
