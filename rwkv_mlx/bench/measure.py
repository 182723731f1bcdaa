"""Measuring: one timed run (prefill, then greedy decode through ``stream_generate``), the spread of
runs, the graph primitives one decoded token runs, and where it was measured (device, versions, commit).
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import platform
import re
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx

from .. import settings
from ..backend import active_backend, device_name
from ..text.generate import stream_generate
from ..text.sample import Sampler, SamplingParams, token_logprob
from ..version import __version__


# Primitives that only re-describe memory (strides, shapes): on Metal and CUDA
# they launch no kernel when their input is contiguous, which is the usual case.
VIEW_PRIMITIVES = frozenset({
    "Reshape", "Squeeze", "ExpandDims", "Flatten", "Unflatten", "Transpose", "Broadcast", "BroadcastAxes",
    "Slice", "AsStrided", "StopGradient", "Depends",
})


@dataclass
class PrimitiveCount:
    """What one decode step puts in MLX's graph (after any mx.compile fusion)."""

    primitives: int  # every node of the step's graph
    kernels: int  # nodes that are not views: an estimate of kernel launches (dispatches)
    n_layer: int
    by_name: dict[str, int]

    @classmethod
    def of(cls, names: Counter, n_layer: int) -> "PrimitiveCount":
        kernels = sum(c for name, c in names.items() if name not in VIEW_PRIMITIVES)
        return cls(sum(names.values()), kernels, n_layer, dict(names.most_common()))

    @property
    def kernels_per_layer(self) -> float:
        return self.kernels / self.n_layer

    @property
    def primitives_per_layer(self) -> float:
        return self.primitives / self.n_layer

    def summary(self) -> str:
        return (f"{self.kernels} kernels est. ({self.kernels_per_layer:.1f} / layer); "
                f"{self.primitives} graph primitives")


_DOT_NODE = re.compile(r'\{ (\S+) \[label ="([^"]*)", shape=rectangle\]; \}')


def count_primitives(outputs: Sequence[mx.array]) -> Counter:
    """Primitive name -> count in the (unevaluated) graph that computes ``outputs``.

    Reads ``mx.export_to_dot``: operations are its rectangle nodes, one per
    primitive (a multi-output primitive is one node).  Arrays already evaluated
    are leaves, so evaluate the inputs first to count only the step.  Outputs
    of an ``mx.compile``d function carry the compiled graph, where each fused
    elementwise chain is one ``Compiled...`` primitive: the count is what runs.
    """
    buffer = io.StringIO()
    mx.export_to_dot(buffer, *outputs)
    nodes = dict(_DOT_NODE.findall(buffer.getvalue()))
    return Counter(nodes.values())


def decode_step_primitives(model, token: int = 0, state=None) -> PrimitiveCount:
    """Primitives of one greedy decode step as ``stream_generate`` builds it.

    The step is ``model.step`` (the decode loop's call: one compiled graph of
    fused kernels on GPUs) -> sampler -> token and its log-probability, plus the
    new state and sampler state: everything the decode loop evaluates per token.
    """
    sampler = Sampler(SamplingParams.greedy(), model.args.vocab_size)
    state = state if state is not None else model.initial_state()
    tok = mx.array([token], dtype=mx.uint32)
    mx.eval(tok, *state.arrays(), *sampler.state)
    logits, new_state = model.step(tok, state)
    nxt = sampler(logits)
    outputs = [nxt, token_logprob(logits, nxt), *new_state.arrays(), *sampler.state]
    return PrimitiveCount.of(count_primitives(outputs), model.args.n_layer)


def greedy_steps(model, token: mx.array, state, n_tokens: int,
                 timings: dict | None = None) -> tuple[list[list[int]], float]:
    """``n_tokens`` greedy decode steps from ``token`` [B] and ``state``, queued without waiting for the device.

    Returns each row's tokens and the seconds the steps took (the probes' decode loop). ``timings``, if
    given, gets ``host``: the seconds the host took to queue every step. No step waits for a token, but
    queueing blocks while the GPU is behind (kernel_log step 22: close to the whole in every process while
    CUPTI counted the GPU busy for as long), so only a host time well below the whole says something: that
    the GPU sets the pace. It also gets ``cpu``: the CPU seconds the process used meanwhile (every thread);
    of two processes of one tree, one that takes more wall time for as much CPU time waited for a CPU. And
    ``steps``: each step's (replay, queue) seconds, ``model.step`` (the graph built on the CPU: nothing there
    waits for the GPU) and the argmax and ``mx.async_eval`` after it (where the blocking is).
    """
    out, steps = [], []
    cpu = time.process_time()
    tic = prev = time.perf_counter()
    for _ in range(n_tokens):
        logits, state = model.step(token, state)
        mid = time.perf_counter()
        token = mx.argmax(logits, axis=-1)
        mx.async_eval(token, *state.arrays())
        out.append(token)
        now = time.perf_counter()
        steps.append((mid - prev, now - mid))
        prev = now
    if timings is not None:
        timings["host"], timings["steps"] = prev - tic, steps
    mx.eval(out)
    seconds = time.perf_counter() - tic
    if timings is not None:
        timings["cpu"] = time.process_time() - cpu
    return [[int(t[b].item()) for t in out] for b in range(token.shape[0])], seconds


def host_alone(model, token: mx.array, state, n_steps: int, warm: int = 0) -> dict[str, float]:
    """The host's own work a decode step, in seconds: ``replay`` (``model.step``), ``queue`` (the argmax and
    ``mx.async_eval``) and ``cpu`` (the process's CPU time), each step queued after the one before it has
    finished, so that queueing never waits for the device (in ``greedy_steps``' loop it blocks while the GPU is
    behind, which hides this). ``warm``: steps run first and not counted (the step compiled and warmed)."""
    replay = queue = cpu = 0.0
    for i in range(warm + n_steps):
        mx.eval(token, *state.arrays())
        cpu0, tic = time.process_time(), time.perf_counter()
        logits, state = model.step(token, state)
        mid = time.perf_counter()
        token = mx.argmax(logits, axis=-1)
        mx.async_eval(token, *state.arrays())
        if i >= warm:
            replay, queue = replay + mid - tic, queue + time.perf_counter() - mid
            cpu += time.process_time() - cpu0
    mx.eval(token)
    return {"replay": replay / n_steps, "queue": queue / n_steps, "cpu": cpu / n_steps}


# How far row 0 of a batched decode may be from the same prompt decoded alone, under teacher forcing: the
# logits' distance over their norm at any step. The matrix units round activations and weights to float16;
# the GPU test of 16 rows bounds the same ratio against the pure path by 0.5% (tests/test_kernels_gpu.py).
ROW0_LOGIT_TOLERANCE = 5e-3


def row0_logits(model, token: mx.array, state, n_tokens: int, forced: Sequence[int] | None = None):
    """Row 0's logits (float32 numpy [n_tokens, V]) at ``n_tokens`` greedy steps from ``token`` [B] and
    ``state``: after each step, as ``greedy_steps`` gives its tokens. ``forced``: the tokens row 0 is fed
    after each step instead of its own argmax (teacher forcing), the other rows keep theirs."""
    import numpy as np

    out = []
    for i in range(n_tokens):
        logits, state = model.step(token, state)
        token = mx.argmax(logits, axis=-1)
        if forced is not None:
            token = mx.concatenate([mx.array([forced[i]], dtype=token.dtype), token[1:]])
        mx.eval(token, logits, *state.arrays())
        out.append(np.array(logits[0], dtype=np.float32))
    return np.stack(out)


def row0_agreement(alone_tokens: Sequence[int], batched_tokens: Sequence[int], alone_logits, forced_logits,
                   tolerance: float = ROW0_LOGIT_TOLERANCE) -> tuple[bool, str]:
    """Whether a batched decode's row 0 decodes its prompt as the prompt decoded alone, and what to say.

    Equal tokens agree. Where they differ, ``forced_logits`` (row 0 of the batch fed the alone tokens, as
    ``row0_logits(..., forced=...)``) must stay within ``tolerance`` of ``alone_logits`` at every step
    (first rows: the prompt's last logits): then the first differing token was a near-tie that rounding
    flipped (a flip needs the alone margin below twice the logits' distance), and the speed counts.
    """
    import numpy as np

    n = len(alone_tokens)
    same = sum(a == b for a, b in zip(alone_tokens, batched_tokens))
    if same == n and len(batched_tokens) == n:
        return True, f"{same}/{n}"
    a, f = np.asarray(alone_logits, dtype=np.float64), np.asarray(forced_logits, dtype=np.float64)
    dev = float(max(np.linalg.norm(f[i] - a[i]) / max(np.linalg.norm(a[i]), 1e-30) for i in range(len(a))))
    first = next(i for i, (x, y) in enumerate(zip(alone_tokens, batched_tokens)) if x != y)
    if dev <= tolerance:
        return True, f"{same}/{n}; near-tie at token {first + 1}, teacher-forced logits within {dev:.1e}"
    return False, f"{same}/{n}; teacher-forced logits {dev:.1e} from alone's (over {tolerance:.0e})"


@dataclass
class RunTiming:
    prefill_tps: float
    generation_tps: float
    prefill_peak_bytes: int
    decode_peak_bytes: int
    tokens: list[int]


def timed_run(model, tokenizer, prompt: Sequence[int], gen_tokens: int) -> RunTiming:
    """One prefill + greedy decode through ``stream_generate``; speeds are its own."""
    tokens, prefill_peak, last = [], None, None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens, sampling=SamplingParams.greedy(),
                                stop_at_end_of_text=False):
        if prefill_peak is None:  # stream_generate reset the peak before prefill; start the decode phase
            prefill_peak = mx.get_peak_memory()
            mx.reset_peak_memory()
        tokens.append(last.token)
    return RunTiming(last.prompt_tps, last.generation_tps, prefill_peak, mx.get_peak_memory(), tokens)


@dataclass
class Spread:
    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: Iterable[float]) -> "Spread":
        values = [float(v) for v in values]
        return cls(statistics.median(values), min(values), max(values), values)


def local_now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()


def environment() -> dict:
    """Where a figure was measured: device, backend, versions, commit, OS, and the tuning settings the
    environment sets ($RWKV_MLX_GPU_BLOCKS=affine, ...)."""
    info = {}
    try:  # what the device is; not its serial numbers or momentary free memory
        info = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in mx.device_info().items()
                if k not in ("uuid", "pci_bus_id", "free_memory")}
    except Exception:  # older MLX or an unavailable backend: the name below still says enough
        pass
    commit, dirty = git_commit()
    return {
        "device": device_name(), "backend": active_backend(), "device_info": info,
        "mlx": mx.__version__, "rwkv_mlx": __version__, "commit": commit, "commit_dirty": dirty,
        "os": platform.platform(), "python": platform.python_version(),
        "settings": settings.in_effect(),
    }


def git_commit() -> tuple[str | None, bool | None]:
    """(short commit of this package's checkout, whether tracked files differ).

    ``$RWKV_MLX_COMMIT`` wins when set: a copy of the tree on another machine may carry a
    stale ``.git`` that names the wrong commit.
    """
    if os.environ.get("RWKV_MLX_COMMIT"):
        return os.environ["RWKV_MLX_COMMIT"], None
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("RWKV_MLX_COMMIT") or None, None
