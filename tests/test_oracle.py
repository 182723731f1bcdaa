"""rwkv-mlx against real llama.cpp and exact float64 math, on every oracle GGUF file.

Tolerances are the oracle README's: with an exact GGUF -> MLX mapping and
float32 compute (the CPU path), logits must be within 1e-3 max abs / 1e-4 rms
of ref64 and pick the same top-1 token everywhere; F32 files within 1e-4 of
llama.cpp's batch and one-token-at-a-time logits; quantized files within
0.8 / 0.06 of llama.cpp's batch logits (llama.cpp quantizes activations).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from conftest import ORACLE, oracle_logits, oracle_models, oracle_tokens
from reference_rwkv7 import ReferenceRWKV7

import rwkv_mlx
from rwkv_mlx.model.weights import LoadOptions

MODELS = oracle_models() or ["<oracle missing>"]


@functools.lru_cache(maxsize=2)
def load_cpu(name: str):
    if name.startswith("<"):
        pytest.skip(f"oracle fixtures not found at {ORACLE}")
    path = ORACLE / "models" / f"{name}.gguf"
    model, tokenizer = rwkv_mlx.load(path, LoadOptions.for_backend("cpu"))
    return model, tokenizer


def logits_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))[0]


def assert_exact(ours: np.ndarray, ref: np.ndarray, what: str):
    diff = ours - ref
    max_abs, rms = float(np.abs(diff).max()), float(np.sqrt((diff**2).mean()))
    assert max_abs < 1e-3 and rms < 1e-4, f"{what}: max abs {max_abs:.3g}, rms {rms:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all(), f"{what}: top-1 differs"


@pytest.mark.parametrize("name", MODELS)
def test_batch_matches_ref64_and_llama(name):
    model, _ = load_cpu(name)
    tokens = oracle_tokens(name)
    ours = logits_np(model(mx.array([tokens]))[0])
    assert_exact(ours, oracle_logits(name, "ref64"), f"{name} batch vs ref64")
    llama = oracle_logits(name, "batch")
    if name.endswith("-f32"):
        for kind in ("batch", "seq"):
            assert np.abs(ours - oracle_logits(name, kind)).max() < 1e-4, f"{name} vs llama.cpp {kind}"
    else:
        diff = ours - llama
        assert np.abs(diff).max() < 0.8 and np.sqrt((diff**2).mean()) < 0.06
        assert (ours.argmax(-1) == llama.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", MODELS)
def test_one_token_at_a_time_and_split_prefill(name):
    model, _ = load_cpu(name)
    tokens = oracle_tokens(name)
    ref = oracle_logits(name, "ref64")
    state, rows = None, []
    for t in tokens:
        logits, state = model(mx.array([[t]]), state)
        rows.append(logits_np(logits)[0])
    assert_exact(np.stack(rows), ref, f"{name} one token at a time")

    split = len(tokens) // 3
    first, state = model(mx.array([tokens[:split]]))
    rest, _ = model(mx.array([tokens[split:]]), state)
    assert_exact(np.concatenate([logits_np(first), logits_np(rest)]), ref, f"{name} split prefill")


@pytest.mark.parametrize("name", [m for m in MODELS if m.startswith("<") or m.endswith(("f32", "Q4_K_M", "Q8_0"))])
def test_compiled_prompt_blocks_match_ref64(name, monkeypatch):
    """The prompt path with each block one compiled graph (the GPUs' default for prefill's chunks)."""
    monkeypatch.setenv("RWKV_MLX_COMPILED_PROMPT", "1")
    model, _ = load_cpu(name)
    logits, _ = model(mx.array([oracle_tokens(name)]), compiled_blocks=True)
    assert model.runtime._chunks, "no block was compiled: the test would prove nothing"
    assert_exact(logits_np(logits), oracle_logits(name, "ref64"), f"{name} compiled prompt blocks")


@functools.lru_cache(maxsize=1)
def reference_for(name: str) -> ReferenceRWKV7:
    return ReferenceRWKV7(ORACLE / "models" / f"{name}.gguf")


@pytest.mark.parametrize("name", [m for m in MODELS if m.startswith("<") or m.endswith(("f32", "Q4_K_M", "Q6_K", "Q2_K", "IQ4_XS"))])
def test_greedy_32_steps_matches_float64_reference(name):
    """Greedy continuation: every step where float64 math has a clear winner, we pick it.

    The float64 reference is checked against ref64 on the oracle tokens first, so it
    stands in for ref64 on the tokens the model generates itself.
    """
    model, _ = load_cpu(name)
    ref_model = reference_for(name)
    tokens = oracle_tokens(name)
    ref_logits, ref_state = ref_model.run(tokens)
    assert np.abs(ref_logits - oracle_logits(name, "ref64")).max() < 1e-4

    logits, state = model(mx.array([tokens]), logits="last")
    checked = 0
    for _ in range(32):
        ours = logits_np(logits)[-1]
        expect = ref_logits[-1]
        top2 = np.sort(expect)[-2:]
        token = int(ours.argmax())
        if top2[1] - top2[0] > 1e-3:
            assert token == int(expect.argmax()), f"{name}: step {checked} picked {token}, float64 picks {expect.argmax()}"
            checked += 1
        logits, state = model(mx.array([[token]]), state)
        step_logits, ref_state = ref_model.step(token, ref_state)
        ref_logits = step_logits[None]
    assert checked >= 28, f"only {checked} of 32 steps had a clear float64 winner"
