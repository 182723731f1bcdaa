"""Low-rank adapters on the model's matrices, and merging them back into plain weights.

``LoRALinear`` wraps any matrix layer (dense, affine-quantized or GGUF blocks:
the base stays frozen in whatever form it was loaded, so a quantized model can
be adapted without dequantizing it) and adds ``scale * (x A^T) B^T`` with A
(rank, in) and B (out, rank).  B starts at zero, so the adapted model starts
as the base.  ``merge_lora`` folds each adapter into a dense float32 weight
``W + scale * B A``; the result exports to GGUF like any model.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import mlx.core as mx
import mlx.nn as nn

from ..errors import InvalidArgumentError
from ..loader.export import dense_weight, module_at
from ..layers import Linear, WeightFormat
from ..arch import MATRIX_MODULES

DEFAULT_TARGETS = MATRIX_MODULES  # att.receptance/key/value/output, ffn.key/value
ALL_TARGETS = (*MATRIX_MODULES, "head")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, key: mx.array | None = None):
        super().__init__()
        out_dims, in_dims = base.weight.shape[0], _in_dims(base)
        self.base = base
        self.out_dims = out_dims
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims), key=key)
        self.lora_b = mx.zeros((out_dims, rank))

    def __call__(self, x: mx.array) -> mx.array:
        delta = (x.astype(mx.float32) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (self.scale * delta).astype(x.dtype)

    def rows(self, ids: mx.array) -> mx.array:
        """Rows of the adapted weight ``W + scale B A``, float32."""
        return self.base.rows(ids) + self.scale * (self.lora_b[ids] @ self.lora_a)

    def merged_weight(self) -> mx.array:
        return dense_weight(self)


def _in_dims(layer) -> int:
    """The input width of a matrix layer in any storage form."""
    if hasattr(layer, "in_dims"):  # GGUF blocks: rows are bytes, not weights
        return layer.in_dims
    if hasattr(layer, "bits"):  # affine: uint32 words holding 32 / bits codes each
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]


def parse_targets(text: str | None) -> tuple[str, ...]:
    """``"att.key,ffn.value"`` -> the module suffixes to adapt (default: every block matrix)."""
    if not text:
        return DEFAULT_TARGETS
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        raise InvalidArgumentError(f"--lora-targets: {', '.join(bad) or '(empty)'} not among {', '.join(ALL_TARGETS)}")
    return targets


def target_paths(model, targets) -> list[str]:
    paths = ["head"] if "head" in targets else []
    for i in range(model.args.n_layer):
        paths += [f"blocks.{i}.{t}" for t in targets if t != "head"]
    return paths


def _set_module(model, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module_at(model, parent_path) if parent_path else model
    setattr(parent, name, module)


def apply_lora(model, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS, seed: int = 0) -> list[str]:
    """Freeze ``model`` and put a trainable adapter on each target matrix; returns their paths."""
    if rank < 1:
        raise InvalidArgumentError(f"--lora-rank must be at least 1, got {rank}")
    model.freeze()
    paths = target_paths(model, targets)
    keys = mx.random.split(mx.random.key(seed), len(paths))
    for path, key in zip(paths, keys):
        _set_module(model, path, LoRALinear(module_at(model, path), rank, alpha, key=key))
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    model.runtime.invalidate()  # the adapted layers replace the ones the plans were built from
    return paths


def lora_parameters(model) -> dict[str, mx.array]:
    """Flat {path: array} of every adapter matrix (what an adapter checkpoint holds)."""
    from mlx.utils import tree_flatten

    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def merge_lora(model) -> int:
    """Replace every adapted layer by a dense float32 layer of ``W + scale B A``; returns how many."""
    formats = dict(model.formats)
    merged = 0
    for path in list(formats):
        layer = module_at(model, path)
        if not isinstance(layer, LoRALinear):
            continue
        weight = layer.merged_weight()
        dense = Linear(weight.shape[1], weight.shape[0], WeightFormat("dense", "float32"))
        dense.weight = weight
        _set_module(model, path, dense)
        formats[path] = WeightFormat("dense", "float32")
        merged += 1
    model.formats = MappingProxyType(formats)
    mx.eval(model.parameters())
    model.runtime.invalidate()  # the merged weights replace the ones the plans were built from
    return merged
