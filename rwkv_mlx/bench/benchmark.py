"""The benchmark the project is judged by: load, prefill, greedy decode, and a quality gate.

One benchmark run loads a model (timed), builds a fixed prompt of exactly N
tokens from a bundled public-domain passage, then -- ``runs`` times, after an
untimed warm-up -- prefills it and decodes G tokens greedily through
``stream_generate`` (the pipelined loop users get).  It reports the median and
the min-max spread of prefill and generation tok/s, peak memory per phase, and
the number of graph primitives one decoded token runs.

The pieces: ``measure.py`` (timing, primitives, environment), ``quality.py``
(the quality gate and its cached reference tokens), ``record.py`` (the
markdown and JSON-lines logs under results/); this module runs them in order.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..errors import InvalidArgumentError
from ..kernels import kernel_backend
from ..loader import load
from ..model.weights import LoadOptions
from .bytes_read import token_bytes
from .measure import decode_step_primitives, environment, timed_run
from .quality import (QUALITY_TOKENS, QualityGateError, ReferenceCache, consistency_reason, path_gaps, quality_verdict,
                      tie_note)
from .record import BenchmarkResult, rejected_record


PROMPT_FILE = Path(__file__).resolve().parents[1] / "data" / "benchmark_prompt.txt"
PROMPT_TOKENS = 512  # the default prompt and generation lengths of every benchmark entry
GEN_TOKENS = 128
PREFILL_LENGTHS = (PROMPT_TOKENS, 4096)  # the prompt lengths prefill is judged at beside llama.cpp (issue 18)


def benchmark_prompt(tokenizer, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids: the bundled passage in this model's tokenizer, repeated as needed."""
    if n_tokens < 1:
        raise InvalidArgumentError(f"--prompt-tokens must be >= 1, got {n_tokens}")
    ids = tokenizer.encode(PROMPT_FILE.read_text(encoding="utf-8"))
    repeats = -(-n_tokens // len(ids))
    return (ids * repeats)[:n_tokens]


def check_counts(prompt_tokens: int, gen_tokens: int, runs: int, warmup: int) -> None:
    if prompt_tokens < 1:
        raise InvalidArgumentError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    if gen_tokens < QUALITY_TOKENS:
        raise InvalidArgumentError(f"--gen-tokens must be >= {QUALITY_TOKENS}: the quality gate checks the first "
                                   f"{QUALITY_TOKENS} greedy tokens, got {gen_tokens}")
    if runs < 1:
        raise InvalidArgumentError(f"--runs must be >= 1, got {runs}")
    if warmup < 0:
        raise InvalidArgumentError(f"--warmup must be >= 0, got {warmup}")


def gpu_bytes_read(model, path: Path) -> dict | None:
    """What one decoded token reads by this GPU backend's launch plans, beside the GGUF's bytes (bytes_read.py).

    None on the CPU backend (no kernel runs, and the model is loaded in the CPU's dense float32 form,
    not the GPU's) and for files that are not GGUF (no stored bytes to compare with).
    """
    backend = kernel_backend()
    if backend is None or path.suffix.lower() != ".gguf":
        return None
    try:
        return token_bytes(model, path, backend).to_json()
    except RuntimeError as e:  # the inputs could not be matched to the weights: no figure
        logging.getLogger("rwkv_mlx").warning("rwkv-mlx: %s; 'GB read / token' is left out", e)
        return None


def run_benchmark(
    path: str | os.PathLike,
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    gen_tokens: int = GEN_TOKENS,
    runs: int = 3,
    warmup: int = 1,
    options: LoadOptions | None = None,
    loader: Callable[[Path], tuple] | None = None,
    cache: ReferenceCache | None = None,
    on_run: Callable[[int, int], None] | None = None,
) -> BenchmarkResult:
    """Benchmark one model file; raises QualityGateError (with ``.rejected``) when the gate fails.

    ``loader(path) -> (model, tokenizer, LoadInfo)`` replaces the default load
    (the CLI passes one with a progress bar); it is what "load time" times.
    ``on_run(done, total)`` reports progress without any figure.
    """
    check_counts(prompt_tokens, gen_tokens, runs, warmup)
    path = Path(path)
    loader = loader or (lambda p: load(p, options, return_info=True))
    env = environment()

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    model, tokenizer, info = loader(path)
    load_seconds = time.perf_counter() - tic
    load_peak = mx.get_peak_memory()

    prompt = benchmark_prompt(tokenizer, prompt_tokens)
    timings = []
    for i in range(warmup + runs):
        timing = timed_run(model, tokenizer, prompt, gen_tokens)
        if i >= warmup:
            timings.append(timing)
        if on_run:
            on_run(i + 1, warmup + runs)
    dispatch = decode_step_primitives(model, token=prompt[-1])
    bytes_read = gpu_bytes_read(model, path)
    fingerprint, args = model.fingerprint, model.args.to_dict()
    del model
    gc.collect()
    mx.clear_cache()

    cache = cache or ReferenceCache()
    reference = cache.reference(path, fingerprint, prompt, {"model": path.name})
    result = BenchmarkResult(
        model_path=str(path), model_name=path.name, fingerprint=fingerprint, args=args,
        tensor_types=dict(info.tensor_types), load_seconds=load_seconds, load_peak_bytes=load_peak,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, warmup=warmup, runs=timings, dispatch=dispatch,
        tokens=list(timings[0].tokens[:QUALITY_TOKENS]), reference=reference, env=env, bytes_read=bytes_read,
    )
    runs_tokens = [t.tokens for t in timings]
    gaps = None
    if result.tokens != reference.tokens and consistency_reason(runs_tokens) is None:
        gaps = path_gaps(path, prompt, result.tokens)  # consistent tokens off the reference's path: check each one
    reason = quality_verdict(runs_tokens, reference, gaps)
    if reason is not None:
        raise QualityGateError(reason, rejected_record(result, reason))
    result.quality_note = tie_note(result.tokens, reference, gaps)
    return result
