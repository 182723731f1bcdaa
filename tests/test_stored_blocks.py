"""Which form each block type takes per backend (issue 18): a GPU load in the stored form keeps every
block type the decode kernels read as stored as the file's own bytes; the CPU, the affine GPU form and
the mlx-lm export use MLX's affine codes; converted directories keep the blocks and map them at load
as a GGUF's. No weight is held in both forms."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader

from conftest import ORACLE, oracle_models, oracle_tokens

import rwkv_mlx
from rwkv_mlx.arch import module_to_gguf_name
from rwkv_mlx.errors import InvalidArgumentError
from rwkv_mlx.kernels import dialect, forced_backend, head_plan, kernels_disabled
from rwkv_mlx.kernels.decode import BlockPlan
from rwkv_mlx.kernels.matvec import STORED_BLOCK_TYPES
from rwkv_mlx.layers import AffineLinear, GGMLLinear
from rwkv_mlx.loader.convert import convert
from rwkv_mlx.model.weights import LoadOptions

# files whose matrices are of block types that used to become affine on GPUs
FILES = ["fixa-Q8_0", "fixa-Q4_0", "fixa-Q4_1", "fixa-Q5_0", "fixa-Q5_1", "fixa-IQ4_NL", "fixa-Q4_K_M",
         "fixa-Q5_K_M", "fixa-IQ4_XS", "fixb-Q4_K_M", "fixb-Q5_K_M"]


def matrices(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, (GGMLLinear, AffineLinear))}


def file_tensors(name: str) -> dict:
    return {t.name: t for t in GGUFReader(ORACLE / "models" / f"{name}.gguf").tensors}


@pytest.mark.parametrize("name", FILES)
def test_gpu_load_keeps_the_files_blocks(name, require_oracle):
    if name not in oracle_models():
        pytest.skip(f"{name} is not in the oracle set")
    tensors = file_tensors(name)
    model = rwkv_mlx.load(ORACLE / "models" / f"{name}.gguf", LoadOptions.for_backend("metal"))[0]
    gpu = matrices(model)
    stored = 0
    for path, layer in gpu.items():
        t = tensors[module_to_gguf_name(f"{path}.weight")]
        assert int(t.tensor_type) in STORED_BLOCK_TYPES, (path, t.tensor_type)
        assert isinstance(layer, GGMLLinear) and layer.ggml_type == int(t.tensor_type), path
        assert np.array_equal(np.array(layer.weight).reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), path
        assert not hasattr(layer, "scales")  # one form only
        stored += 1
    assert stored >= 13
    # and decode plans them all for the kernels (none falls back to dequantizing per token); the
    # launches go to a hook that returns zeros, the numbers are checked under the Metal emulation
    def zeros(launch):
        return [mx.zeros(s, dtype=d) for s, d in zip(launch.output_shapes, launch.output_dtypes)]

    with dialect.launch_hook(zeros), forced_backend("metal"):
        assert all(BlockPlan(block, 1, "metal").ok for block in model.blocks)
        assert head_plan(model.ln_out, model.head, 1, "metal").ok
    cpu = matrices(rwkv_mlx.load(ORACLE / "models" / f"{name}.gguf", LoadOptions.for_backend("cpu"))[0])
    assert any(isinstance(m, AffineLinear) for m in cpu.values())
    assert not any(isinstance(m, GGMLLinear) for m in cpu.values())  # Q6_K heads become float32 on the CPU


def test_converted_directory_round_trips_the_blocks(tmp_path, require_oracle):
    """A directory converted from a file that mixes Q5_K, Q5_1 and Q8_0 holds the file's blocks: with
    a GPU's options it loads them as stored, with the CPU's as affine, and on the pure path each
    computes what the GGUF loaded with the same options computes."""
    src = ORACLE / "models" / "fixb-Q5_K_M.gguf"
    convert(src, tmp_path / "out")
    tokens = mx.array([oracle_tokens("fixb-Q5_K_M")])
    for backend, form in (("metal", GGMLLinear), ("cpu", AffineLinear)):
        options = LoadOptions.for_backend(backend)
        from_dir, from_gguf = (rwkv_mlx.load(p, options)[0] for p in (tmp_path / "out", src))
        assert all(isinstance(m, form) for m in matrices(from_dir).values()), backend
        with kernels_disabled():
            a, b = (np.array(m(tokens)[0]) for m in (from_dir, from_gguf))
        assert np.array_equal(a, b), backend


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_gpu_blocks_setting_gives_the_affine_form(monkeypatch, tmp_path, require_oracle, backend):
    """$RWKV_MLX_GPU_BLOCKS (for timing the two forms side by side) picks the GPU form on either GPU
    backend, for a GGUF and for a directory converted from it: 'affine' maps the block types with an
    exact affine image to affine and keeps Q6_K blocks, 'stored' keeps them all; the logits agree."""
    path = ORACLE / "models" / "fixb-Q4_K_M.gguf"
    convert(path, tmp_path / "dir")
    tokens = mx.array([oracle_tokens("fixb-Q4_K_M")])
    logits = []
    for form in ("stored", "affine"):
        monkeypatch.setenv("RWKV_MLX_GPU_BLOCKS", form)
        for source in (path, tmp_path / "dir"):
            model = rwkv_mlx.load(source, LoadOptions.for_backend(backend))[0]
            kinds = {type(m).__name__ for m in matrices(model).values()}
            if form == "stored":
                assert kinds == {"GGMLLinear"}, source
            else:
                assert "AffineLinear" in kinds, source
                assert all(m.ggml_type == 14 for m in matrices(model).values() if isinstance(m, GGMLLinear))  # Q6_K
            with kernels_disabled():
                logits.append(np.array(model(tokens)[0]))
    assert max(np.abs(a - logits[0]).max() for a in logits) < 1e-4


def test_gpu_blocks_setting_is_checked(monkeypatch):
    monkeypatch.setenv("RWKV_MLX_GPU_BLOCKS", "blocks")
    with pytest.raises(InvalidArgumentError, match=r"\$RWKV_MLX_GPU_BLOCKS='blocks': expected one of stored, affine"):
        LoadOptions.for_backend("metal")
