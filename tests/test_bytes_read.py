"""Bytes one decoded token reads, counted from the launch plans (rwkv_mlx/bench/bytes_read.py), held to
math stated here from the shapes and the storage forms, not from the counting code:

* a dense matrix (F32/F16/BF16 kept as stored) reads rows * cols * itemsize bytes: its GGUF bytes;
* a GGUF block type read as stored reads rows * cols / block_elems * block_bytes: its GGUF bytes, exactly;
* an affine-mapped block type reads bits/8 bytes of codes per weight plus a scale and a bias per 32
  weights, so plan / GGUF = (bits/8 + 2 * scale_itemsize/32) / (block_bytes/block_elems)
  (float32 scales: (bits/8 + 2*4/32) / (block_bytes/block_elems); Q4_K: 0.75 / 0.5625 = 1.333);
* the state a token reads: per layer the WKV state H*N*N float32 and two token-shift rows of C float32;
* the embedding: one row.

The issue's bar (<= 1.03x the GGUF's bytes) is asserted for every block type the kernels read as
stored, taken from the kernels' own table, so a type added there is held to it here without edits.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten
import pytest

from rwkv_mlx import quants
from rwkv_mlx.arch import MATRIX_MODULES, module_to_gguf_name
from rwkv_mlx.bench.bytes_read import compare, gguf_bytes, plan_bytes
from rwkv_mlx.formats.gguf_file import open_gguf
# The kernels' table of GGUF block types they read as stored (keys: gguf.GGMLQuantizationType ids).
from rwkv_mlx.kernels.layernorm_lerp import separate
from rwkv_mlx.kernels.matvec import STORED_BLOCK_TYPES
from rwkv_mlx.layers import AffineLinear, GGMLLinear, Linear, WeightFormat
from rwkv_mlx.loader import load
from rwkv_mlx.model import Model
from rwkv_mlx.model.weights import LoadOptions
from rwkv_mlx.testing.metal_proof.shapes import shaped_model
from rwkv_mlx.testing.synthetic import G1B_2_9B

from conftest import ORACLE, oracle_models

BAR = 1.03
LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def _module(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def expected_matrix_bytes(layer, rows: int, cols: int, ggml_type: int) -> tuple[int, int]:
    """(bytes the kernels read, bytes the GGUF stores) of one (rows, cols) matrix, from its form alone."""
    block = quants.BLOCK_TYPES[ggml_type]
    stored = rows * cols // block.block_elems * block.block_bytes
    if isinstance(layer, Linear):
        return rows * cols * layer.weight.dtype.size, stored
    if isinstance(layer, GGMLLinear):
        return stored, stored
    assert isinstance(layer, AffineLinear) and layer.group_size == 32
    return rows * cols * layer.bits // 8 + 2 * rows * cols // 32 * layer.scales.dtype.size, stored


def check_counts(model, plan, stored_type_of) -> dict[int, list[int]]:
    """Every block matrix, the state and the embedding row against the math; returns type -> [plan, gguf]."""
    args = model.args
    assert plan.pure_modules == []  # every block and the head went through the kernels
    # five launches a block and one for the head, one more for each LayerNorm prologue (two a block, the
    # head's) where they run as launches of their own, and one for a stored embedding's row (the dequant kernel)
    assert plan.launches == 5 * args.n_layer + 1 + (2 * args.n_layer + 1) * separate(plan.backend) + \
        isinstance(model.emb, GGMLLinear)
    by_type: dict[int, list[int]] = {}
    for i in range(args.n_layer):
        for m in MATRIX_MODULES:
            path = f"blocks.{i}.{m}"
            layer = _module(model, path)
            rows, cols = (layer.weight.shape[0], layer.in_dims) if isinstance(layer, GGMLLinear) else (
                (layer.scales.shape[0], layer.scales.shape[1] * 32) if isinstance(layer, AffineLinear)
                else layer.weight.shape)
            t = stored_type_of(path)
            want, stored = expected_matrix_bytes(layer, rows, cols, t)
            assert plan.modules[path] == want, path
            row = by_type.setdefault(t, [0, 0])
            row[0] += want
            row[1] += stored
            if isinstance(layer, AffineLinear):  # the stated ratio for affine-mapped blocks
                block = quants.BLOCK_TYPES[t]
                ratio = (layer.bits / 8 + 2 * layer.scales.dtype.size / 32) / (block.block_bytes / block.block_elems)
                assert want / stored == pytest.approx(ratio, rel=1e-12)
    head = model.head
    rows, cols = model.args.vocab_size, model.args.n_embd
    assert plan.parts["head"] == expected_matrix_bytes(head, rows, cols, stored_type_of("head"))[0]
    # each LoRA matrix once (the 8-slot launch repeats its last matrix in the unused slots: read once)
    loras = [getattr(model.blocks[i].att, n) for i in range(args.n_layer) for n in LORA
             if hasattr(model.blocks[i].att, n)]
    assert plan.parts["lora"] == sum(a.shape[0] * a.shape[1] * a.dtype.size for a in loras)
    C, N = args.n_embd, args.head_size
    assert plan.parts["state"] == args.n_layer * ((C // N) * N * N * 4 + 2 * C * 4)
    emb = model.emb
    row_bytes = sum(a.nbytes // a.shape[0] for a in (
        [emb.weight] if not isinstance(emb, AffineLinear) else [emb.weight, emb.scales, emb.biases]))
    assert plan.parts["embedding"] == row_bytes
    for t in by_type.keys() & STORED_BLOCK_TYPES:  # the bar, types read as stored
        p, g = by_type[t]
        assert p == g and p / g <= BAR, quants.BLOCK_TYPES[t].name
    return by_type


ORACLE_FILES = oracle_models()


@pytest.mark.parametrize("name", ORACLE_FILES or [pytest.param("none", marks=pytest.mark.skip(
    reason=f"oracle fixtures not found at {ORACLE} (set RWKV_MLX_ORACLE)"))])
def test_oracle_file_bytes(name, monkeypatch):
    monkeypatch.delenv("RWKV_MLX_GPU_BLOCKS", raising=False)  # each backend's default form
    path = ORACLE / "models" / f"{name}.gguf"
    tensors = open_gguf(path).tensors
    for backend in ("metal", "cuda") if name in ("fixa-Q4_K_M", "fixb-Q6_K") else ("metal",):
        model, _ = load(path, LoadOptions.for_backend(backend))  # the form that backend loads by default
        plan = plan_bytes(model, backend)
        by_type = check_counts(model, plan, lambda p: tensors[module_to_gguf_name(p + ".weight")].ggml_type)
        tb = compare(plan, gguf_bytes(path))  # the counting module's comparison agrees with the math's
        assert tb.matrices == {quants.BLOCK_TYPES[t].name: tuple(v) for t, v in by_type.items()}
    emb = tensors["token_embd.weight"]
    total = sum(t.n_bytes for t in tensors.values())
    assert tb.gguf.tensors == total
    assert tb.gguf.per_token == total - emb.n_bytes + emb.n_bytes // emb.shape[0]


def stored_model(ggml_type: int) -> Model:
    """Two blocks of the 2.9B shape, every matrix (and the head and embedding) as GGUF blocks of one type."""
    from dataclasses import replace

    args = replace(G1B_2_9B, vocab_size=512, n_layer=2)
    fmt = WeightFormat("ggml", ggml_type=ggml_type)
    formats = {"emb": fmt, "head": fmt, **{f"blocks.{i}.{m}": fmt for i in range(2) for m in MATRIX_MODULES}}
    model = Model(args, formats, lora_dtype=mx.float16)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("ggml_type", sorted(STORED_BLOCK_TYPES), ids=lambda t: quants.BLOCK_TYPES[t].name)
def test_stored_types_read_as_stored_at_the_2_9b_shape(ggml_type):
    model = stored_model(ggml_type)
    plan = plan_bytes(model, "metal")
    by_type = check_counts(model, plan, lambda p: ggml_type)
    assert set(by_type) == {ggml_type}
    block = quants.BLOCK_TYPES[ggml_type]
    assert plan.parts["head"] == 512 * 2560 // block.block_elems * block.block_bytes  # as stored


# The file types' recipes of the Metal proof (GGUF blocks as stored, Q6_K for the head and block 0's
# FFN value in Q4_K_M), at the 2.9B shape.
RECIPE_TYPES = {"Q4_K_M": (12, 14), "Q8_0": (8, 8), "F16": (1, 1)}  # (matrix type, block 0 ffn.value type)


@pytest.mark.parametrize("file_type", sorted(RECIPE_TYPES))
def test_recipes_at_the_2_9b_shape(file_type):
    model = shaped_model(G1B_2_9B, file_type, n_layer=2, vocab=512)
    matrix, ffn_value0 = RECIPE_TYPES[file_type]
    plan = plan_bytes(model, "cuda")
    check_counts(model, plan, lambda p: ffn_value0 if p in ("blocks.0.ffn.value", "head") else matrix)


def test_benchmark_records_the_gpu_plans_bytes(require_oracle, monkeypatch):
    """The benchmark's column: the GPU backend's count beside the GGUF's, '-' on the CPU and in older entries."""
    from types import SimpleNamespace

    from rwkv_mlx.bench import benchmark as bench_run
    from rwkv_mlx.bench.record import BenchmarkResult, compare_table

    path = require_oracle / "models" / "fixa-Q6_K.gguf"
    model, _ = load(path, LoadOptions.for_backend("metal"))
    assert bench_run.gpu_bytes_read(model, path) is None  # this machine's CPU backend: no kernel runs
    monkeypatch.setattr(bench_run, "kernel_backend", lambda: "metal")
    figures = bench_run.gpu_bytes_read(model, path)
    gguf = gguf_bytes(path)
    assert figures["gguf_gb_per_token"] == round(gguf.per_token / 1e9, 6)
    assert figures["matrices"]["Q6_K"]["ratio"] == 1.0 and figures["pure_modules"] == []
    assert figures["ratio"] == round(sum(figures["parts"].values()) / gguf.per_token, 4)
    cell = BenchmarkResult.bytes_read_cell(SimpleNamespace(bytes_read=figures))
    assert cell.startswith(f"{figures['gb_read_per_token']:.3f} GB (") and "Q6_K 1.00x" in cell
    assert BenchmarkResult.bytes_read_cell(SimpleNamespace(bytes_read=None)) == "-"
    old = {"prefill_tps": 1.0, "generation_tps": 1.0}
    new = {**old, "gb_read_per_token": figures["gb_read_per_token"], "gb_read_ratio": figures["ratio"]}
    header, rows = compare_table([old, new])
    column = header.index("GB read / token")
    assert rows[0][column] == "-"
    assert rows[1][column] == f"{figures['gb_read_per_token']:.3f} ({figures['ratio']:.2f}x GGUF)"


def test_blocks_the_kernels_cannot_take_are_counted_whole():
    """An FFN of 200 (not a multiple of the kernel's 32) keeps every block on the pure-MLX path, which
    reads each of the block's parameters once: they are counted and named, not left out."""
    from rwkv_mlx.model.rwkv7 import default_formats
    from rwkv_mlx.testing.synthetic import synthetic_args

    args = synthetic_args(n_layer=2, n_embd=128, ffn=200, ranks=(8, 8, 8, 8), vocab=64)
    model = Model(args, default_formats(args))
    mx.eval(model.parameters())
    plan = plan_bytes(model, "metal")
    # launches: the head, and each block's time mix by the fused WKV kernel (the pure path's, on a GPU)
    assert plan.pure_modules == ["blocks.0", "blocks.1"] and plan.launches == 3
    block_bytes = sum(a.nbytes for b in model.blocks for _, a in tree_flatten(b.parameters()))
    matrices = sum(a.nbytes for b in model.blocks for n, a in tree_flatten(b.parameters())
                   if n.split(".")[1] in LORA or ".".join(n.split(".")[:2]) in MATRIX_MODULES)
    assert matrices <= plan.parts["pure"] <= block_bytes  # none of them left out; vectors the WKV launch read once
    assert plan.modules["blocks.1.ffn.value"] == 128 * 200 * 4
