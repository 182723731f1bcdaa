"""The benchmark the project is judged by: load, prefill, greedy decode, and a quality gate.

One benchmark run loads a model (timed), builds a fixed prompt of exactly N
tokens from a bundled public-domain passage, then -- ``runs`` times, after an
untimed warm-up -- prefills it and decodes G tokens greedily through
``stream_generate`` (the pipelined loop users get).  It reports the median and
the min-max spread of prefill and generation tok/s, peak memory per phase, and
the number of graph primitives one decoded token runs.

The quality gate makes a fast-but-wrong entry impossible: the first 16 greedy
tokens of every timed run must agree with each other, must not be degenerate
(at most 2 distinct ids), and must equal the *reference* tokens for that file:
the pure-MLX float32 path (kernels disabled) on the same prompt from a zero
state, computed once per model file and cached by the file's fingerprint.
Otherwise :class:`QualityGateError` is raised and no speed is reported.

Results are appended to ``results/BENCHMARKS.md`` (one markdown entry per run,
grouped under its title) and ``results/benchmarks.jsonl`` (every figure and
the environment), both written atomically.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import mlx.core as mx

from .. import __version__
from ..backend import active_backend, device_name
from ..errors import InvalidArgumentError, ModelFileError, RwkvMlxError
from ..text.generate import prefill, stream_generate
from ..kernels import kernels_disabled
from ..loader.gguf import load
from ..text.sample import Sampler, SamplingParams, greedy_sampler, token_logprob
from ..model.weights import LoadOptions

QUALITY_TOKENS = 16  # greedy tokens the gate compares (and the entry lists)
PROMPT_FILE = Path(__file__).resolve().parents[1] / "data" / "benchmark_prompt.txt"
MARKDOWN_NAME = "BENCHMARKS.md"
JSONL_NAME = "benchmarks.jsonl"
CACHE_NAME = "reference_tokens.json"
REFERENCE_OPTIONS = LoadOptions(float_dtype="float32", ggml_native=False)
# A token the reference ranks within this many logits of its best counts as its choice: float32
# paths that sum in another order differ by about 1e-5..1e-4 on a 2.9B model, a broken one by whole units.
NEAR_TIE = 1e-3
MARKDOWN_HEADER = (
    "# rwkv-mlx benchmark log\n\n"
    "Written by `rwkv-mlx benchmark` (see docs/benchmarks.md): one entry per run, grouped by title, newest last.\n"
    "Every entry names the device it was measured on (the `GPU` row; `CPU (...)` means MLX's CPU backend).\n"
    "Every figure and the environment of each entry are in benchmarks.jsonl.\n"
)

# Primitives that only re-describe memory (strides, shapes): on Metal and CUDA
# they launch no kernel when their input is contiguous, which is the usual case.
VIEW_PRIMITIVES = frozenset({
    "Reshape", "Squeeze", "ExpandDims", "Flatten", "Unflatten", "Transpose", "Broadcast", "BroadcastAxes",
    "Slice", "AsStrided", "StopGradient", "Depends",
})


class QualityGateError(RwkvMlxError):
    """The benchmarked path produced tokens that cannot be trusted: no speed is reported."""

    exit_code = 5

    def __init__(self, reason: str, rejected: dict | None = None):
        self.reason = reason
        self.rejected = rejected  # the JSON record of the rejected run (no speeds)
        super().__init__(f"quality gate: {reason}; no speed recorded")


# ---------------------------------------------------------------------------------------
# the prompt and the quality tokens


def benchmark_prompt(tokenizer, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids: the bundled passage in this model's tokenizer, repeated as needed."""
    if n_tokens < 1:
        raise InvalidArgumentError(f"--prompt-tokens must be >= 1, got {n_tokens}")
    ids = tokenizer.encode(PROMPT_FILE.read_text(encoding="utf-8"))
    repeats = -(-n_tokens // len(ids))
    return (ids * repeats)[:n_tokens]


def quality_hash(tokens: Sequence[int]) -> str:
    """First 16 hex digits of sha256 over the comma-joined ids (no spaces)."""
    return hashlib.sha256(",".join(str(int(t)) for t in tokens).encode()).hexdigest()[:16]


def degenerate_reason(tokens: Sequence[int]) -> str | None:
    """Why these greedy tokens look like a broken model (None when they do not)."""
    distinct = len(set(tokens))
    if distinct == 1:
        return f"degenerate tokens: one token ({tokens[0]}) repeated {len(tokens)} times"
    if distinct <= 2:
        return f"degenerate tokens: only {distinct} distinct ids in {len(tokens)} ({list(tokens)})"
    return None


def prompt_digest(prompt: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, prompt)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# the reference tokens and their cache


def cache_dir() -> Path:
    """rwkv-mlx's cache folder: $RWKV_MLX_CACHE, else ~/.cache/rwkv-mlx."""
    env = os.environ.get("RWKV_MLX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rwkv-mlx"


@dataclass
class Reference:
    """The pure-MLX float32 greedy tokens for one (file, prompt), with their top-2 logit gaps."""

    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each step: a tiny gap explains a flip
    source: str  # "cached" or "computed"
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "margins": self.margins, "source": self.source, **self.info}


def reference_walk(path: str | os.PathLike, prompt: Sequence[int], n: int = QUALITY_TOKENS,
                   forced: Sequence[int] | None = None) -> tuple[list[int], list[float], list[float]]:
    """Walk ``n`` tokens on the pure-MLX float32 path (kernels off) from a zero state.

    Greedy, or along ``forced`` tokens (another engine's choices). Returns the tokens and, at
    each step, the reference's top-1 minus top-2 logit and its top-1 minus the chosen token's.
    Deliberately the plainest loop -- one evaluated model call per token, no pipelining -- so
    it shares nothing with the timed path but the model math.
    """
    with kernels_disabled():
        model, _ = load(path, REFERENCE_OPTIONS)
        logits, state = prefill(model, prompt)
        tokens, margins, gaps = [], [], []
        for i in range(n):
            token = greedy_sampler(logits) if forced is None else mx.array([forced[i]])
            top2 = mx.sort(logits[0])[-2:]
            mx.eval(token, top2)
            tokens.append(int(token.item()))
            margins.append(round(float(top2[1] - top2[0]), 6))
            gaps.append(float(top2[1] - logits[0, tokens[-1]]))
            if i + 1 < n:
                logits, state = model(token[:, None], state, logits="last")
                logits = logits[:, -1]
    del model, state, logits
    gc.collect()
    mx.clear_cache()
    return tokens, margins, gaps


def compute_reference(path: str | os.PathLike, prompt: Sequence[int], n: int = QUALITY_TOKENS) -> Reference:
    """Greedy tokens of the pure-MLX float32 path from a zero state (see ``reference_walk``)."""
    tokens, margins, _ = reference_walk(path, prompt, n)
    info = dict(device=device_name(), backend=active_backend(), mlx=mx.__version__, rwkv_mlx=__version__,
                date=_now().isoformat(timespec="seconds"))
    return Reference(tokens, margins, "computed", info)


def path_gaps(path: str | os.PathLike, prompt: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """How far below the reference's best logit each of ``tokens`` lies, given the same prefix."""
    return reference_walk(path, prompt, len(tokens), forced=tokens)[2]


class ReferenceCache:
    """Reference tokens keyed by model fingerprint and prompt, in one JSON file (written atomically)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_NAME

    @staticmethod
    def key(fingerprint: str, prompt: Sequence[int], n: int = QUALITY_TOKENS) -> str:
        return f"{fingerprint}:{len(prompt)}:{prompt_digest(prompt)}:{n}"

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(self.path, f"reference-token cache unreadable ({e}); delete it to rebuild") from None
        return data.get("entries", {}) if isinstance(data, dict) else {}

    def get(self, key: str) -> Reference | None:
        entry = self._read().get(key)
        if entry is None:
            return None
        return Reference(list(entry["tokens"]), list(entry.get("margins", [])), "cached", entry.get("info", {}))

    def put(self, key: str, ref: Reference) -> None:
        entries = self._read()
        entries[key] = {"tokens": ref.tokens, "margins": ref.margins, "info": ref.info}
        atomic_write_text(self.path, json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True) + "\n")

    def reference(self, path, fingerprint: str, prompt: Sequence[int], info: dict | None = None) -> Reference:
        """The cached reference, computing and storing it the first time."""
        key = self.key(fingerprint, prompt)
        ref = self.get(key)
        if ref is None:
            ref = compute_reference(path, prompt)
            ref.info.update(info or {})
            self.put(key, ref)
        return ref


# ---------------------------------------------------------------------------------------
# graph primitives per decoded token


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


# ---------------------------------------------------------------------------------------
# timing


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


@dataclass
class BenchmarkResult:
    model_path: str
    model_name: str
    fingerprint: str
    args: dict
    tensor_types: dict
    load_seconds: float
    load_peak_bytes: int
    prompt_tokens: int
    gen_tokens: int
    warmup: int
    runs: list[RunTiming]
    dispatch: PrimitiveCount
    tokens: list[int]  # the first QUALITY_TOKENS greedy tokens (equal in every run)
    reference: Reference
    env: dict
    quality_note: str | None = None  # how the tokens passed the gate when they left the reference's path

    @property
    def prefill(self) -> Spread:
        return Spread.of(r.prefill_tps for r in self.runs)

    @property
    def generation(self) -> Spread:
        return Spread.of(r.generation_tps for r in self.runs)

    @property
    def prefill_peak_bytes(self) -> int:
        return max(r.prefill_peak_bytes for r in self.runs)

    @property
    def decode_peak_bytes(self) -> int:
        return max(r.decode_peak_bytes for r in self.runs)

    @property
    def quality_hash(self) -> str:
        return quality_hash(self.tokens)

    def table_rows(self) -> list[tuple[str, str]]:
        """(metric, value) rows of the log entry, in the order of the log's format."""
        pre, gen = self.prefill, self.generation
        return [
            ("Model", self.model_name),
            ("Version", "V7"),
            ("Layers", str(self.args["n_layer"])),
            ("Embedding", str(self.args["n_embd"])),
            ("GPU", self.env["device"]),
            ("**Load Time**", f"**{self.load_seconds * 1000:.2f} ms**"),
            ("**Prefill**", f"**{pre.median:.2f} tok/s**"),
            ("**Generation**", f"**{gen.median:.2f} tok/s**"),
            ("Prefill Spread", f"{pre.min:.2f}-{pre.max:.2f} tok/s ({self.prompt_tokens} prompt tokens)"),
            ("Generation Spread", f"{gen.min:.2f}-{gen.max:.2f} tok/s ({self.gen_tokens} tokens)"),
            ("Peak Memory", f"{_mb(self.load_peak_bytes)} load, {_mb(self.prefill_peak_bytes)} prefill, "
                            f"{_mb(self.decode_peak_bytes)} decode"),
            ("Dispatches / Token", self.dispatch.summary()),
            ("Backend", f"{self.env['backend']} (MLX {self.env['mlx']})"),
            ("Runs", f"{len(self.runs)} timed + {self.warmup} warm-up; median, min-max"),
            ("Commit", (self.env.get("commit") or "unknown") + (" (modified)" if self.env.get("commit_dirty") else "")),
            ("Quality Hash", f"`{self.quality_hash}`"),
            *((("Quality Check", self.quality_note),) if self.quality_note else ()),
        ]

    def to_json(self) -> dict:
        pre, gen = self.prefill, self.generation
        return {
            "engine": "rwkv-mlx",
            "model": self.model_name, "model_path": self.model_path, "fingerprint": self.fingerprint,
            "args": self.args, "tensor_types": self.tensor_types,
            "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens,
            "runs": len(self.runs), "warmup": self.warmup,
            "load_ms": round(self.load_seconds * 1000, 3),
            "prefill_tps": round(pre.median, 3), "prefill_tps_min": round(pre.min, 3),
            "prefill_tps_max": round(pre.max, 3), "prefill_tps_runs": [round(v, 3) for v in pre.values],
            "generation_tps": round(gen.median, 3), "generation_tps_min": round(gen.min, 3),
            "generation_tps_max": round(gen.max, 3), "generation_tps_runs": [round(v, 3) for v in gen.values],
            "peak_memory_bytes": {"load": self.load_peak_bytes, "prefill": self.prefill_peak_bytes,
                                  "decode": self.decode_peak_bytes},
            "dispatches_per_token": self.dispatch.kernels,
            "dispatches_per_layer": round(self.dispatch.kernels_per_layer, 2),
            "primitives_per_token": self.dispatch.primitives,
            "primitives_by_name": self.dispatch.by_name,
            "quality_tokens": self.tokens, "quality_hash": self.quality_hash, "quality_note": self.quality_note,
            "reference": self.reference.to_json(),
            **self.env,
        }


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()


def environment() -> dict:
    """Where a figure was measured: device, backend, versions, commit, OS."""
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


# ---------------------------------------------------------------------------------------
# the benchmark


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


def consistency_reason(runs: Sequence[Sequence[int]]) -> str | None:
    """Why the runs' first tokens cannot be right whatever the reference (None when they can)."""
    first = list(runs[0][:QUALITY_TOKENS])
    reason = degenerate_reason(first)
    if reason:
        return reason
    for i, other in enumerate(runs[1:], start=2):
        if list(other[:QUALITY_TOKENS]) != first:
            return f"run {i} produced other tokens than run 1 ({list(other[:QUALITY_TOKENS])} vs {first})"
    return None


def first_difference(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """The first position where ``tokens`` leave ``reference`` (the shorter length if one is a prefix)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def quality_verdict(runs: Sequence[Sequence[int]], reference: Reference,
                    gaps: Sequence[float] | None = None) -> str | None:
    """Why the runs' first tokens fail the gate (None when they pass).

    ``gaps``: for tokens that leave the reference's path, the reference's verdict on each of
    them along their own path (``path_gaps``); the tokens pass when every one is within
    NEAR_TIE of the reference's choice there (a near tie flipped, not a wrong token).
    """
    first = list(runs[0][:QUALITY_TOKENS])
    reason = consistency_reason(runs)
    if reason or first == reference.tokens:
        return reason
    at = first_difference(first, reference.tokens)
    gap = f"; the reference's top-2 logit gap there is {reference.margins[at]:.4g}" if at < len(reference.margins) else ""
    differ = f"greedy tokens differ from the float32 reference from position {at}"
    both = f"(got {first}, reference {reference.tokens})"
    if gaps is None:
        return f"{differ} {both}{gap}"
    worst = max(range(len(gaps)), key=lambda i: gaps[i])
    if gaps[worst] <= NEAR_TIE:
        return None
    return (f"{differ}{gap}; along their own path token {worst} ({first[worst]}) is {gaps[worst]:.4g} logits "
            f"below the reference's choice {both}")


def tie_note(tokens: Sequence[int], reference: Reference, gaps: Sequence[float] | None) -> str | None:
    """What the entry says when its tokens passed the gate through a near tie."""
    if gaps is None or list(tokens) == reference.tokens:
        return None
    at = first_difference(tokens, reference.tokens)
    return (f"near tie at token {at} (reference top-2 gap {reference.margins[at]:.2g}); every token within "
            f"{max(gaps):.2g} logits of the reference's choice along its own path")


def run_benchmark(
    path: str | os.PathLike,
    *,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
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
        tokens=list(timings[0].tokens[:QUALITY_TOKENS]), reference=reference, env=env,
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


def rejected_record(result: BenchmarkResult, reason: str) -> dict:
    """The JSON line of a rejected run: what was compared, and no speed at all."""
    return {
        "engine": "rwkv-mlx", "rejected": reason,
        "model": result.model_name, "model_path": result.model_path, "fingerprint": result.fingerprint,
        "args": result.args, "prompt_tokens": result.prompt_tokens, "gen_tokens": result.gen_tokens,
        "runs_tokens": [t.tokens[:QUALITY_TOKENS] for t in result.runs],
        "quality_tokens": result.tokens, "quality_hash": result.quality_hash,
        "reference": result.reference.to_json(),
        **result.env,
    }


# ---------------------------------------------------------------------------------------
# the log: results/BENCHMARKS.md and results/benchmarks.jsonl


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def markdown_entry(result: BenchmarkResult, change: str, when: _dt.datetime) -> str:
    lines = [f"### {when.strftime('%Y-%m-%d %H:%M:%S')} - {_one_line(change)}",
             "| Metric | Value |", "|--------|-------|"]
    lines += [f"| {k} | {v} |" for k, v in result.table_rows()]
    lines.append(f"<details><summary>Quality tokens (first {QUALITY_TOKENS})</summary> {result.tokens} </details>")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def insert_entry(document: str, title: str, entry: str) -> str:
    """``document`` with ``entry`` appended at the end of section ``## title`` (created at the end if missing)."""
    heading = f"## {_one_line(title)}"
    lines = document.splitlines()
    if heading not in lines:
        body = document.rstrip("\n")
        return f"{body}\n\n{heading}\n\n{entry}"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "\n".join(lines[:end]).rstrip("\n")
    after = "\n".join(lines[end:])
    return f"{before}\n\n{entry}" + (f"\n{after}\n" if after else "")


def record(result: BenchmarkResult, title: str, change: str, results_dir: str | os.PathLike = "results",
           command: str | None = None, when: _dt.datetime | None = None) -> tuple[Path, Path]:
    """Append the entry to BENCHMARKS.md (under ``title``) and its JSON line to benchmarks.jsonl."""
    when = when or _now()
    results_dir = Path(results_dir)
    md = results_dir / MARKDOWN_NAME
    document = md.read_text(encoding="utf-8") if md.is_file() else MARKDOWN_HEADER
    jsonl = append_jsonl(results_dir, log_line(title, change, command, when, result.to_json()))
    atomic_write_text(md, insert_entry(document, title, markdown_entry(result, change, when)))
    return md, jsonl


def append_jsonl(results_dir: str | os.PathLike, line: dict) -> Path:
    path = Path(results_dir) / JSONL_NAME
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    atomic_write_text(path, existing + json.dumps(line, sort_keys=False) + "\n")
    return path


def record_rejected(rejected: dict, title: str, change: str, results_dir: str | os.PathLike = "results",
                    command: str | None = None) -> Path:
    """A rejected run leaves a JSON line (reason, tokens, no speeds) and nothing in the markdown log."""
    return append_jsonl(results_dir, log_line(title, change, command, _now(), rejected))


def log_line(title: str, change: str, command: str | None, when: _dt.datetime, figures: dict) -> dict:
    """One JSON line of the log: what it is about, when, how it was run, then the figures."""
    return {"title": _one_line(title), "change": _one_line(change), "date": when.isoformat(timespec="seconds"),
            "command": command, **figures}


def load_entries(results_dir: str | os.PathLike = "results", title: str | None = None,
                 include_rejected: bool = False) -> list[dict]:
    """The JSON lines of the log, oldest first (optionally one title's, without rejected runs)."""
    path = Path(results_dir) / JSONL_NAME
    if not path.is_file():
        return []
    entries = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            raise ModelFileError(path, f"line {n} is not JSON") from None
        if (title is None or entry.get("title") == title) and (include_rejected or "rejected" not in entry):
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------
# the comparison view


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns (any number of them)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "| " + " | ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]) + "\n"


def _ratio(value, first) -> str:
    return f"{value / first:.2f}x" if value and first else "-"


def compare_table(entries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Entries side by side; each figure with its ratio to the first entry."""
    header = ["#", "date", "change", "engine", "model", "device", "prefill tok/s", "generation tok/s", "load ms",
              "peak MB", "dispatches/token", "hash"]
    first = entries[0]
    rows = []
    for i, e in enumerate(entries, start=1):
        peak = max(e.get("peak_memory_bytes", {}).values() or [0])
        first_peak = max(first.get("peak_memory_bytes", {}).values() or [0])
        cells = [str(i), e.get("date", "")[:19].replace("T", " "), e.get("change", ""), e.get("engine", "rwkv-mlx"),
                 e.get("model", ""), e.get("device", "")]
        for key, value, base, fmt in (
            ("prefill", e.get("prefill_tps"), first.get("prefill_tps"), "{:.2f}"),
            ("generation", e.get("generation_tps"), first.get("generation_tps"), "{:.2f}"),
            ("load", e.get("load_ms"), first.get("load_ms"), "{:.1f}"),
            ("peak", peak / 1e6, first_peak / 1e6, "{:.1f}"),
            ("dispatches", e.get("dispatches_per_token"), first.get("dispatches_per_token"), "{}"),
        ):
            cells.append("-" if value is None else f"{fmt.format(value)} ({_ratio(value, base)})")
        cells.append(e.get("quality_hash", ""))
        rows.append(cells)
    return header, rows


if __name__ == "__main__":  # python -m rwkv_mlx.bench.benchmark ...: the CLI command, where no console script is installed
    from ..cli import run

    sys.exit(run(["benchmark", *sys.argv[1:]]))
