"""Bytes one decoded token reads, counted from the decode kernels' launch plans, beside the GGUF's bytes.

Decode on a GPU is bound by memory bandwidth, so the bytes a token reads bound its speed.
``plan_bytes`` builds the decode launch plans of a model for a backend ('cuda' or 'metal';
on a machine without it, through ``forced_backend`` inside a recording launch hook, as the
Metal proof does), decodes one token at batch 1, and sums the inputs every launch is handed:

* each distinct input array once per launch (``array.nbytes``); a launch that reads an array
  twice (the matvec's unused slots repeat the last matrix) reads it once;
* placeholders (``dialect.placeholder``: stand-ins for absent inputs, which no kernel reads)
  are counted apart, not in the total;
* inputs are attributed to the model's parameters by their memory (a kernel is handed a
  ``uint8`` view of a weight, which shares the weight's buffer), so each matrix's bytes are
  known by name; inputs that are no parameter are the state, activations and small tables.

What runs outside the kernels is counted from the model: the embedding (one row: a lookup
reads one row, not the table; a row of GGUF blocks is then expanded by a dequant launch, whose
input, the gathered copy, counts among the tables) and ``ln0``; a block or head whose plan the kernels cannot take
runs the pure-MLX path, which reads every parameter of it once (listed in ``pure_modules``; on a
GPU its time mix still goes through the fused WKV kernel, whose launch is counted like the others).

``gguf_bytes`` reads a file's tensor table (each tensor's stored size), with the embedding
counted as one row, for the like-for-like ratio; ``compare`` puts both side by side, matrices
(the blocks' six big matrices) by GGUF block type and the whole token.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..arch import MATRIX_MODULES, module_to_gguf_name
from ..formats.gguf_file import GGUFFile, open_gguf
from ..kernels import forced_backend, head_plan
from ..kernels.dialect import PLACEHOLDER_ELEMENTS, launch_hook

# Kernel inputs that are no parameter: what they are (the names are the .kern files' inputs)
STATE_INPUTS = {"prev", "state_in"}  # token shift, WKV state
ACTIVATION_INPUTS = {"x", "residual", "proj", "v_first"}
_LORA = {"w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"}


def _address(a: mx.array) -> tuple[int, int]:
    """(buffer address, bytes) of an evaluated array: a view shares its source's buffer."""
    raw = a.view(mx.uint8) if a.ndim else a.reshape(1).view(mx.uint8)
    mx.eval(raw)
    return int(np.asarray(raw).ctypes.data), int(a.nbytes)


def _part(param: str) -> str:
    """What a parameter of the model is, for the breakdown."""
    parts = param.split(".")
    if parts[0] == "head":
        return "head"
    if parts[0] == "blocks":
        module = ".".join(parts[2:4])
        if module in MATRIX_MODULES:
            return "matrices"
        if parts[2] == "att" and parts[3] in _LORA:
            return "lora"
    return "vectors"


def matrix_module(param: str) -> str | None:
    """``blocks.3.att.key`` for ``blocks.3.att.key.scales``; None for anything but the blocks' matrices."""
    parts = param.split(".")
    if parts[0] == "blocks" and ".".join(parts[2:4]) in MATRIX_MODULES:
        return ".".join(parts[:4])
    return None


@dataclass
class PlanBytes:
    """What one decoded token (batch 1) reads on ``backend``, by part, in bytes."""

    backend: str
    parts: dict[str, int]  # matrices, lora, vectors, head, state, activations, tables, embedding, pure
    modules: dict[str, int]  # bytes of each block matrix (``blocks.N.att.key``) as the kernels read it
    launches: int
    placeholders: int  # inputs that stand for absent ones: handed to a kernel, never read
    placeholder_bytes: int
    pure_modules: list[str] = field(default_factory=list)  # blocks/head the kernels did not take

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def plan_bytes(model, backend: str) -> PlanBytes:
    """Count one decoded token's reads from the launch plans ``backend`` builds for ``model``.

    The launches are recorded, not run (the hook answers zeros), so this works on any machine.
    The plans it builds are dropped afterwards (``runtime.invalidate``): they were never tried
    on a real device, and the next real decode must build and try its own.
    """
    params = dict(tree_flatten(model.parameters()))
    owner = {_address(a): name for name, a in params.items()}
    parts: dict[str, int] = defaultdict(int)
    modules: dict[str, int] = defaultdict(int)
    count = {"launches": 0, "placeholders": 0, "placeholder_bytes": 0}
    read: set[str] = set()  # parameters some launch was handed

    def hook(launch):
        count["launches"] += 1
        seen = set()
        for name, a in zip(launch.kernel.rendered.inputs, launch.inputs):
            key = _address(a)
            if key in seen or id(a) in seen:
                continue
            seen.update((key, id(a)))
            param = owner.get(key)
            if param is not None:
                read.add(param)
                parts[_part(param)] += a.nbytes
                if matrix_module(param):
                    modules[matrix_module(param)] += a.nbytes
            elif a.ndim == 1 and a.size == PLACEHOLDER_ELEMENTS:  # dialect.placeholder(); no real input has 8
                count["placeholders"] += 1
                count["placeholder_bytes"] += a.nbytes
            elif name in STATE_INPUTS:
                parts["state"] += a.nbytes
            elif name in ACTIVATION_INPUTS:
                parts["activations"] += a.nbytes
            else:  # segment tables, eps, LoRA info, concatenated biases, float32 copies of mixes
                parts["tables"] += a.nbytes
        return [mx.zeros(s, dtype=d) for s, d in zip(launch.output_shapes, launch.output_dtypes)]

    runtime = model.runtime
    try:
        with forced_backend(backend), launch_hook(hook):
            token = mx.zeros((1, 1), dtype=mx.uint32)
            model(token, model.initial_state(1), logits="last")
            pure = [f"blocks.{i}" for i in range(len(model.blocks)) if not runtime.block_plan(i, 1).ok]
            if not head_plan(model.ln_out, model.head, 1, backend).ok:
                pure.append("head")
    finally:
        runtime.invalidate()

    taken = [f"blocks.{i}.{m}" for i in range(len(model.blocks)) if f"blocks.{i}" not in pure for m in MATRIX_MODULES]
    if any(m not in modules for m in taken) or ("head" not in pure and not parts.get("head")):
        # a backend whose arrays numpy cannot see in place (no shared buffer): no figure beats a wrong one
        raise RuntimeError("bytes read: the launches' inputs could not be matched to the model's weights")
    for prefix in pure:  # the pure-MLX path reads each of these parameters once (its WKV launch counted above)
        for name, a in params.items():
            if name.startswith(prefix + ".") and name not in read:
                parts["pure"] += a.nbytes
                if matrix_module(name):
                    modules[matrix_module(name)] += a.nbytes
    # outside the kernels: the embedding lookup (one row of each of its arrays) and ln0
    for name, a in params.items():
        if name.startswith("emb."):
            parts["embedding"] += a.nbytes // a.shape[0]
        elif name.startswith("ln0."):
            parts["vectors"] += a.nbytes
    return PlanBytes(backend, dict(parts), dict(modules), count["launches"], count["placeholders"],
                     count["placeholder_bytes"], pure)


@dataclass
class GGUFBytes:
    """A GGUF file's tensor bytes, as one token would read them."""

    tensors: int  # every tensor's stored bytes
    per_token: int  # the same, with the embedding counted as one row
    types: dict[str, str]  # GGUF tensor name -> block type name
    sizes: dict[str, int]  # GGUF tensor name -> stored bytes


def gguf_bytes(path_or_file: str | os.PathLike | GGUFFile) -> GGUFBytes:
    gguf = path_or_file if isinstance(path_or_file, GGUFFile) else open_gguf(path_or_file)
    sizes = {name: t.n_bytes for name, t in gguf.tensors.items()}
    types = {name: t.type_name for name, t in gguf.tensors.items()}
    total = sum(sizes.values())
    emb = gguf.tensors.get("token_embd.weight")
    per_token = total - (emb.n_bytes - emb.n_bytes // emb.shape[0] if emb is not None else 0)
    return GGUFBytes(total, per_token, types, sizes)


@dataclass
class TokenBytes:
    """Plan bytes beside the file's: matrices by block type, and the whole token."""

    plan: PlanBytes
    gguf: GGUFBytes
    matrices: dict[str, tuple[int, int]]  # block type -> (plan bytes, GGUF bytes) of the blocks' matrices

    @property
    def ratio(self) -> float:
        return self.plan.total / self.gguf.per_token

    def matrix_ratio(self, type_name: str | None = None) -> float:
        rows = [v for t, v in self.matrices.items() if type_name in (None, t)]
        return sum(p for p, _ in rows) / sum(g for _, g in rows)

    def to_json(self) -> dict:
        return {
            "backend": self.plan.backend, "gb_read_per_token": round(self.plan.total / 1e9, 6),
            "gguf_gb_per_token": round(self.gguf.per_token / 1e9, 6), "ratio": round(self.ratio, 4),
            "parts": self.plan.parts, "launches": self.plan.launches, "placeholders": self.plan.placeholders,
            "pure_modules": self.plan.pure_modules,
            "matrices": {t: {"plan": p, "gguf": g, "ratio": round(p / g, 4)} for t, (p, g) in self.matrices.items()},
        }

    def summary(self) -> str:
        by_type = ", ".join(f"{t} {p / g:.2f}x" for t, (p, g) in sorted(self.matrices.items()))
        return (f"{self.plan.total / 1e9:.3f} GB ({self.ratio:.2f}x the GGUF's {self.gguf.per_token / 1e9:.3f}; "
                f"matrices {by_type}; {self.plan.backend} plans)")


def compare(plan: PlanBytes, gguf: GGUFBytes) -> TokenBytes:
    matrices: dict[str, list[int]] = {}
    for module, n in plan.modules.items():
        name = module_to_gguf_name(module + ".weight")  # the tensor the layer was converted from
        row = matrices.setdefault(gguf.types[name], [0, 0])
        row[0] += n
        row[1] += gguf.sizes[name]
    return TokenBytes(plan, gguf, {t: (p, g) for t, (p, g) in matrices.items()})


def token_bytes(model, path: str | os.PathLike, backend: str) -> TokenBytes:
    """``compare(plan_bytes(model, backend), gguf_bytes(path))`` for a model loaded from the GGUF at ``path``."""
    return compare(plan_bytes(model, backend), gguf_bytes(path))
