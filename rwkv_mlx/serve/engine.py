"""Continuous batching on one thread that owns MLX.

MLX streams belong to the thread that made them, so one engine thread loads the
model and does every MLX call; the HTTP side only submits :class:`Job` s and
receives their :class:`Event` s through a callback.

Each loop iteration of the engine

1. admits waiting jobs while fewer than ``max_batch`` rows are in flight;
2. drops rows whose client went away or whose time ran out (their slot is free
   at once);
3. reads at most ``prefill_chunk`` prompt tokens, oldest request first (cut at
   the message boundaries that the state cache checkpoints), so a long prompt
   never stalls the rows that are decoding and a burst of short ones starts at once;
   later prompts whose next chunk is as long as the oldest's are read in the same
   call, as rows of one batch;
4. runs one decode step for every decoding row together.

The decoding rows live in *slots* of one batched :class:`~rwkv_mlx.model.state.State`
whose batch size is a bucket (1, 2, 4, ... up to ``max_batch``), the free slots
padded with idle rows: a GPU compiles its decode graph once per batch size
(``Model.step``, the decode runtime), so a handful of sizes are reused.
Rows of a batch are independent (every operation of a decode step is per row),
so neither padding nor neighbours change a row's numbers; tests check this.
The step itself is pluggable (``step_fn``) so the GPU decode path can change
without touching the scheduler.

Every row has its own sampler (``rwkv_mlx.text.sample.Sampler`` with batch 1: its
parameters, penalties, seed and key stream are exactly those of
``rwkv_mlx.generate`` for that request alone), stop strings, token limit and
log-probability options; a decode step samples all rows together
(:func:`.batch_sampling.sample_rows`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import RwkvMlxError
from ..model.state import State
from ..text.generate import DEFAULT_PREFILL_CHUNK, TokenText, prefill, sampler_for, start_state
from ..text.sample import log_softmax, token_logprob
from .batch_sampling import sample_rows
from .errors import APIError, bad_request, internal, no_state, no_states_dir, queue_full, state_exists, timed_out
from .metrics import Metrics
from .protocol import Spec
from .state_cache import StateCache

log = logging.getLogger("rwkv_mlx.serve")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: ``(model, tokens [B] uint32, state with batch B) -> (logits [B, V] float32, next state)``.
StepFn = Callable[[object, mx.array, State], tuple[mx.array, State]]


def model_step(model, tokens: mx.array, state: State) -> tuple[mx.array, State]:
    """The default decode step: ``Model.step`` (a compiled graph per batch size on GPUs)."""
    return model.step(tokens, state)


def buckets_for(max_batch: int, sizes=DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The batch sizes the engine runs at: the standard sizes below ``max_batch``, then ``max_batch``."""
    return tuple(b for b in sizes if b < max_batch) + (max_batch,)


@dataclass
class Event:
    kind: str  # "piece", "done" or "error"
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: APIError | None = None


class Job:
    """A request in the engine. ``deliver`` is called from the engine thread; ``cancel`` from anywhere."""

    _ids = itertools.count()

    def __init__(self, spec: Spec, deliver: Callable[[Event], None], timeout: float | None = None):
        self.spec = spec
        self.deliver = deliver
        self.id = next(self._ids)
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout if timeout else None
        self.timeout = timeout
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    job: Job
    origin: str = ""
    state: State | None = None  # batch 1, while reading the prompt
    pos: int = 0  # prompt tokens read
    cached: int = 0
    sampler: object = None
    text: TokenText | None = None
    token: int | None = None  # sampled, not yet read by the model
    generated: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    slot: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


class Engine:
    """The scheduler. ``start()`` loads the model on the engine thread; ``submit(job)`` queues a request."""

    def __init__(self, loader: Callable[[], tuple[object, object]], *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cache_bytes: int = 1 << 30,
                 cache_dir: str | Path | None = None, cache_disk_bytes: int | None = None,
                 states_dir: str | Path | None = None, step_fn: StepFn = model_step,
                 metrics: Metrics | None = None, setup: Callable[[], None] | None = None, warmup: bool = False):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise RwkvMlxError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.loader, self.setup, self.warmup = loader, setup, warmup
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.buckets = buckets_for(max_batch)
        self.cache_bytes, self.cache_dir, self.cache_disk_bytes = cache_bytes, cache_dir, cache_disk_bytes
        self.states_dir = Path(states_dir) if states_dir is not None else None
        self.step_fn = step_fn
        self.metrics = metrics or Metrics()
        self.model = self.tokenizer = self.cache = None
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._reading: list[_Row] = []  # rows still reading their prompt, oldest first
        self._slots: list[_Row | None] = []
        self._batch: State | None = None
        self._inflight: _Step | None = None  # the decode step launched last, not yet read
        self._initial_states: dict[tuple, tuple[str, State]] = {}
        self._stopping = False
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="rwkv-serve-engine", daemon=True)

    # -- life cycle (any thread) -------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._stopped.wait(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises the 429 APIError when ``max_queue`` jobs already wait."""
        with self._cv:
            if len(self._pending) >= self.max_queue and self._in_flight() >= self.max_batch:
                self.metrics.inc("rejected_total", help="requests refused because the queue was full")
                raise queue_full(len(self._pending))
            self._pending.append(job)
            self.metrics.set("queue_depth", len(self._pending), "requests waiting for a slot")
            self._cv.notify()

    def _in_flight(self) -> int:
        return len(self._reading) + sum(r is not None for r in self._slots)

    @property
    def active_rows(self) -> int:
        return self._in_flight()

    # -- the engine thread ---------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self.setup is not None:
                self.setup()
            self.model, self.tokenizer = self.loader()
            self.cache = StateCache(self.model, max_bytes=self.cache_bytes, directory=self.cache_dir,
                                    max_disk_bytes=self.cache_disk_bytes)
            if self.warmup:
                self._warm_up()
        except BaseException as e:  # reported by start() on the caller's thread
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._cv:
                if self._stopping:
                    break
                if not self._pending and not self._reading and not any(self._slots) and self._inflight is None:
                    self._cv.wait(timeout=0.5)
                    continue
                self._admit()
            try:
                self._drop_gone()
                if self._reading:
                    self._read_prompts()
                if any(self._slots) or self._inflight is not None:
                    self._decode_step()
            except Exception:  # a bug must not kill the server: fail what was in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(internal())
            self._publish_gauges()
        closing = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        self._fail_all(closing)
        with self._cv:
            while self._pending:
                self._pending.popleft().deliver(Event("error", error=closing))
        self.model = self.cache = self._initial_states = None
        self._stopped.set()
        # The thread stays parked instead of ending: with MLX 0.32.4 (CPU), a process whose MLX-using
        # thread has exited aborted at interpreter exit ("terminate called without an active
        # exception") in 3 of 8 runs here; a parked daemon thread never did.
        threading.Event().wait()

    def _warm_up(self) -> None:
        """One decode step at every bucket size, before the first request.

        A GPU builds a batch size's launch plans and compiles its kernels at the first step of that
        size (on CUDA, NVRTC compiles each kernel for its row count). Met while serving, the compile
        stalls every row at once: on an H100, 64 clients got 144.8 tok/s in total and their first token
        after 12.4 s at the median without it, 1,209.7 tok/s and 1.3 s with it (results/serve_bench.md).
        """
        for b in self.buckets:
            tic = time.perf_counter()
            logits, state = self.step_fn(self.model, mx.zeros((b,), dtype=mx.uint32), self.model.initial_state(b))
            mx.eval(logits, *state.arrays())
            log.info("decode step ready for %d rows (%.1f s)", b, time.perf_counter() - tic)

    def _admit(self) -> None:
        while self._pending and self._in_flight() < self.max_batch:
            job = self._pending.popleft()
            if job.cancelled:
                continue
            self._reading.append(_Row(job))
        self.metrics.set("queue_depth", len(self._pending), "requests waiting for a slot")

    def _publish_gauges(self) -> None:
        self.metrics.set("active_rows", self._in_flight(), "requests reading their prompt or generating")
        self.metrics.set("batch_size", len(self._slots), "rows of the running decode batch, padding included")
        if self.cache is not None:
            stats = self.cache.stats()
            self.metrics.set("cache_memory_bytes", stats["memory_bytes"], "bytes of states cached in memory")
            self.metrics.set("cache_disk_bytes", stats["disk_bytes"], "bytes of states cached on disk")

    def _drop_gone(self) -> None:
        now = time.monotonic()
        for row in [*self._reading, *(r for r in self._slots if r is not None)]:
            job = row.job
            if job.cancelled:
                self.metrics.inc("cancelled_total", help="requests whose client went away")
                self._remove(row)
            elif job.deadline is not None and now > job.deadline:
                self.metrics.inc("timeouts_total", help="requests stopped by the per-request timeout")
                self._remove(row)
                job.deliver(Event("error", error=timed_out(job.timeout)))
        with self._cv:
            for job in [j for j in self._pending if j.deadline is not None and now > j.deadline]:
                self._pending.remove(job)
                self.metrics.inc("timeouts_total", help="requests stopped by the per-request timeout")
                job.deliver(Event("error", error=timed_out(job.timeout)))

    def _remove(self, row: _Row) -> None:
        if row in self._reading:
            self._reading.remove(row)
        if row.slot is not None:
            self._slots[row.slot] = None
            row.slot = None
            self._maybe_shrink()

    def _fail_all(self, error: APIError) -> None:
        for row in [*self._reading, *(r for r in self._slots if r is not None)]:
            row.job.deliver(Event("error", error=error))
        self._reading, self._slots, self._batch, self._inflight = [], [], None, None

    # -- prompts ----------------------------------------------------------------------------------

    def _start_row(self, row: _Row) -> None:
        spec = row.job.spec
        start = None
        if spec.initial_state is not None:
            row.origin, start = self._initial_state(spec.initial_state)
        row.sampler = sampler_for(self.model, self.tokenizer, spec.sampling, 1)
        row.sampler.observe_prompt(spec.prompt_ids)
        row.text = TokenText(self.tokenizer, spec.stop, spec.max_tokens, spec.stop_at_end_of_text)
        n, cached = self.cache.lookup(row.origin, spec.prompt_ids, len(spec.prompt_ids) - 1)
        row.pos, row.cached, row.state = n, n, cached if cached is not None else start
        if n:
            self.metrics.inc("cache_hits_total", help="prompts continued from a cached state")
            self.metrics.inc("cached_tokens_total", n, help="prompt tokens not read thanks to the state cache")
        else:
            self.metrics.inc("cache_misses_total", help="prompts read from their start")

    def _initial_state(self, name: str) -> tuple[str, State]:
        """A named state of the states directory: a saved state or a state-tuning .pth (loaded once)."""
        path = find_state(self.states_dir, name)
        if path is None:
            raise no_state(name)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._initial_states:
            try:
                state = (State.from_state_tuning(path, self.model) if path.suffix == ".pth"
                         else State.load(path, self.model))
            except RwkvMlxError as e:
                raise bad_request(f"initial_state {name!r}: {e}", "initial_state") from None
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
            self._initial_states = {key: (f"state:{digest}", state)}  # keep the latest one only
        return self._initial_states[key]

    def _read_prompts(self) -> None:
        """Read prompt chunks, oldest request first, until ``prefill_chunk`` tokens were read this turn.

        Several short prompts fit in one turn (a burst of new requests gets its first tokens
        without waiting a decode step each); a long one is read a chunk per turn. A request's
        chunks do not depend on the load (the same cuts whatever else is running).
        """
        budget = self.prefill_chunk
        while self._reading and budget > 0:
            budget -= self._read_prompt_chunks(budget)

    def _chunk_end(self, row: _Row) -> int:
        """Where the row's next prompt chunk ends: a chunk's length, the prompt's end or a checkpoint."""
        spec = row.job.spec
        return min([row.pos + self.prefill_chunk, len(spec.prompt_ids), *(c for c in spec.checkpoints if c > row.pos)])

    def _awaits_checkpoint(self, row: _Row) -> bool:
        """Whether an older prompt still being read will checkpoint a state that this unstarted row could
        continue from (a message boundary both prompts share, from the same initial state). Started now,
        its cache lookup would miss it: a burst of chats with one system prompt would each read it."""
        spec = row.job.spec
        for older in self._reading:
            if older is row:
                return False
            theirs = older.job.spec
            if theirs.initial_state == spec.initial_state and any(
                    older.pos < c < len(spec.prompt_ids) and theirs.prompt_ids[:c] == spec.prompt_ids[:c]
                    for c in theirs.checkpoints):
                return True
        return False

    def _read_prompt_chunks(self, budget: int) -> int:
        """Read the next chunk of the oldest prompt, and in the same call those of later prompts whose next
        chunk is as long (up to ``budget`` tokens in all); returns the number of tokens read.

        One call for the rows of a burst: a GPU reads a batch of short chunks in about the time of one,
        where one call a request would keep every other client waiting for its first token.
        """
        group, length = [], 0
        for row in list(self._reading):
            if group and (len(group) + 1) * length > budget:
                break
            if row.sampler is None:
                if group and self._awaits_checkpoint(row):
                    continue
                try:
                    self._start_row(row)
                except APIError as e:
                    self._reading.remove(row)
                    row.job.deliver(Event("error", error=e))
                    if not group:
                        return 1  # a refused request still costs the turn something: no endless loop on a flood
                    continue
            n = self._chunk_end(row) - row.pos
            if not group:
                group, length = [row], n
            elif n == length:
                group.append(row)
        # As many rows as a batch size the server runs at (the rest are read next): the last position's
        # logits go through the decode head's launch plan for that many rows, which a GPU compiles once a
        # row count (NVRTC on CUDA), and the warm-up compiled these; another count would stall every row.
        group = group[:max(b for b in self.buckets if b <= len(group))]
        tokens = [r.job.spec.prompt_ids[r.pos:r.pos + length] for r in group]
        tic = time.perf_counter()
        logits, state = prefill(self.model, tokens, start_state(self.model, [r.state for r in group]),
                                chunk_size=self.prefill_chunk)
        self.metrics.observe("prefill_chunk_seconds", time.perf_counter() - tic, "time to read one prompt chunk")
        self.metrics.inc("prompt_tokens_read_total", len(group) * length, help="prompt tokens run through the model")
        for i, row in enumerate(group):
            self._chunk_read(row, row.pos + length, logits[i:i + 1], own_row(state, i) if len(group) > 1 else state)
        return len(group) * length

    def _chunk_read(self, row: _Row, end: int, logits: mx.array, state: State) -> None:
        """A row has read its prompt up to ``end``: checkpoint it there, or sample its first token at the end."""
        spec = row.job.spec
        row.pos, row.state = end, state
        if end in spec.checkpoints:
            self.cache.put(row.origin, spec.prompt_ids[:end], row.state)
        if end < len(spec.prompt_ids):
            return
        self._reading.remove(row)
        try:
            token, entries = self._sample_one(row, logits)
            if not self._accept(row, token, entries):
                self._join(row)
        except Exception:  # noqa: BLE001 - in no list now: answer it here, and keep serving the others
            log.exception("request failed on its first token")
            self._remove(row)
            row.job.deliver(Event("error", error=internal()))

    # -- sampling and output --------------------------------------------------------------------

    def _sample_one(self, row: _Row, logits: mx.array) -> tuple[int, list[dict]]:
        token = row.sampler(logits)
        lp = token_logprob(logits, token)
        mx.eval(token, lp, *row.sampler.state)
        t = token.item()
        return t, self._logprob_entries(row, logits, t, lp.item())

    def _logprob_entries(self, row: _Row, logits: mx.array, token: int, logprob: float) -> list[dict]:
        spec = row.job.spec
        if not spec.logprobs:
            return []
        entry = self._token_entry(token, logprob)
        entry["top_logprobs"] = []
        if spec.top_logprobs:
            lp = log_softmax(logits.reshape(1, -1))[0]
            top = mx.argsort(-lp)[: spec.top_logprobs]
            values = lp[top]
            entry["top_logprobs"] = [self._token_entry(t, v) for t, v in zip(top.tolist(), values.tolist())]
        return [entry]

    def _token_entry(self, token: int, logprob: float) -> dict:
        data = self.tokenizer.token_bytes(token) or b""
        return {"token": data.decode("utf-8", "replace"), "logprob": float(logprob), "bytes": list(data)}

    def _accept(self, row: _Row, token: int, entries: list[dict], fed: bool = True) -> bool:
        """Record a sampled token and send its text; True when the row is finished (and gone).

        ``fed``: the step after the one that sampled ``token`` was launched already, so the
        batch's state has read it (the pipelined order of _decode_step).
        """
        now = time.monotonic()
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - row.job.submitted,
                                 "from arrival to the first generated token")
        else:
            self.metrics.observe("inter_token_seconds", now - row.last_token_at, "between two tokens of a request")
        row.last_token_at = now
        row.generated.append(token)
        if row.sampler.needs_tokens:  # a grammar masks the row's next step by this token
            try:
                row.sampler.advance([token])
            except RwkvMlxError as e:  # the constraint cannot go on (too ambiguous, a broken distribution)
                self._remove(row)
                row.job.deliver(Event("error", error=APIError(
                    422, f"the output constraint failed while generating: {e}", code="constraint_failed")))
                return True
        text, finish = row.text.add(token)
        row.token = token
        if text or entries:
            row.pieces.append(text)
            row.job.deliver(Event("piece", text=text, logprobs=entries))
        if finish is None:
            return False
        self._finish(row, finish, fed)
        return True

    def _finish(self, row: _Row, finish: str, fed: bool = True) -> None:
        spec = row.job.spec
        # In a decode slot of a pipelined batch, the step launched after the one that sampled the
        # last token has already read it (see _decode_step); a batch with a constrained row is
        # collected before its next launch, and a row that ends on its first token has no slot.
        read_last = row.slot is not None and fed
        state = self._batch[row.slot] if row.slot is not None else row.state
        self._remove(row)
        error = None
        try:
            self._keep_final_state(row, state, read_last)
        except APIError as e:
            error = e
        except Exception:  # noqa: BLE001 - the row is out of every list: answer it, keep serving
            log.exception("could not keep the final state")
            error = internal()
        self.metrics.inc("completion_tokens_total", len(row.generated), help="tokens generated")
        self.metrics.inc("prompt_tokens_total", len(spec.prompt_ids), help="prompt tokens of finished requests")
        self.metrics.observe("request_seconds", time.monotonic() - row.job.submitted, "from arrival to the last token")
        if error is not None:
            row.job.deliver(Event("error", error=error))
            return
        row.job.deliver(Event("done", finish_reason=finish, prompt_tokens=len(spec.prompt_ids),
                              completion_tokens=len(row.generated), cached_tokens=row.cached))

    def _keep_final_state(self, row: _Row, state: State, read_last: bool) -> None:
        """Checkpoint the finished chat turn and save the state a request asked for.

        ``state`` is the state after the last generated token when ``read_last``, else before it.
        """
        spec = row.job.spec
        turn = spec.turn_key is not None
        if not (turn or spec.save_state):
            return
        close = spec.close_turn
        if close and self.tokenizer.decode(row.generated).endswith(self.tokenizer.decode(close)):
            close = []
        read = [*spec.prompt_ids, *row.generated, *close]
        key = spec.turn_key("".join(row.pieces)) if turn else None
        if key != read and not spec.save_state:
            return  # the resent conversation would tokenize differently: its state is not this one
        rest = close if read_last else [row.generated[-1], *close]
        if rest:
            final = prefill(self.model, rest, state, chunk_size=self.prefill_chunk)[1]
        else:  # kept as it is: a row of the decode batch must own its buffers (own_row)
            final = own_row(state, 0)
        mx.eval(final.arrays())
        if key == read:
            self.cache.put(row.origin, key, final)
        if spec.save_state:
            self._save_named(spec.save_state, final, row)

    def _save_named(self, name: str, state: State, row: _Row) -> None:
        if self.states_dir is None:
            raise no_states_dir()
        if find_state(self.states_dir, name) is not None:
            raise state_exists(name)
        try:
            self.states_dir.mkdir(parents=True, exist_ok=True)
            state.save(self.states_dir / f"{name}.safetensors", metadata={"saved_by": "rwkv-mlx serve"})
        except (RwkvMlxError, OSError) as e:  # a full disk fails this request, not the batch
            log.warning("save_state %s: %s", name, e)
            raise APIError(500, f"save_state {name!r}: the state could not be written", type="server_error",
                           param="save_state", code="save_failed") from None

    # -- the decode batch --------------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _resize(self, size: int, keep: list[int]) -> None:
        """Re-pack the batch to ``size`` slots holding the rows now in slots ``keep`` (in order)."""
        rows = [self._slots[i] for i in keep]
        parts = [self._batch[keep]] if keep else []
        if size > len(keep):
            parts.append(self.model.initial_state(size - len(keep)))
        self._batch = State.stack(parts)
        self._slots = rows + [None] * (size - len(rows))
        for i, row in enumerate(rows):
            row.slot = i

    def _maybe_shrink(self) -> None:
        keep = [i for i, r in enumerate(self._slots) if r is not None]
        if not keep:
            self._slots, self._batch = [], None
        elif self._bucket(len(keep)) < len(self._slots):
            self._resize(self._bucket(len(keep)), keep)

    def _join(self, row: _Row) -> None:
        free = next((i for i, r in enumerate(self._slots) if r is None), None)
        if free is None:
            n = sum(r is not None for r in self._slots)
            self._resize(self._bucket(n + 1), [i for i, r in enumerate(self._slots) if r is not None])
            free = n
        self._slots[free] = row
        row.slot = free
        arrays = [mx.concatenate([a[:free], r, a[free + 1:]]) for a, r in zip(self._batch.arrays(), row.state.arrays())]
        self._batch = State.from_arrays(arrays, self._batch.model_id)
        row.state = None

    def _decode_step(self) -> None:
        """Launch the next step, then hand out the tokens of the step launched before it.

        The next step's input is the previous step's sampled tokens, still lazy, so the
        device computes step k+1 while this thread turns step k's tokens into text and
        events (the pipelining of ``rwkv_mlx.generate``, with rows joining and leaving). A
        row that finishes at step k has been fed its last token in step k+1: that step's
        state for its slot is the state after the whole answer, and its other outputs are
        dropped. A grammar's mask for step k+1 needs step k's tokens on the host, so a batch
        holding a constrained row is collected first (no overlap; its rows' states then lack
        their last token, which _finish reads from ``fed``).
        """
        previous = self._inflight
        collect_first = previous is not None and any(r.sampler is not None and r.sampler.needs_tokens
                                                     for r in previous.rows)
        if collect_first:
            self._collect(previous, fed=False)
        self._inflight = self._launch(previous) if any(self._slots) else None
        if previous is not None and not collect_first:
            self._collect(previous)

    def _launch(self, previous: "_Step | None") -> "_Step":
        slots = self._slots
        active = [i for i, r in enumerate(slots) if r is not None]
        fresh = np.zeros(len(slots), dtype=np.uint32)  # rows that joined since: their first token
        carried_slots, carried_positions = [], []
        carried = set()
        if previous is not None:
            for k, row in enumerate(previous.rows):
                if row.slot is not None and slots[row.slot] is row:
                    carried_slots.append(row.slot)
                    carried_positions.append(k)
                    carried.add(row.slot)
        for i in active:
            if i not in carried:
                fresh[i] = slots[i].token
        tokens = mx.array(fresh)
        if carried_slots:
            picked = previous.tokens[mx.array(carried_positions, dtype=mx.int32)]
            tokens = tokens.at[mx.array(carried_slots, dtype=mx.int32)].add(picked)
        logits, self._batch = self.step_fn(self.model, tokens, self._batch)
        rows = [slots[i] for i in active]
        samplers = [r.sampler for r in rows]
        order = mx.array(active, dtype=mx.int32)
        picked_logits = logits if len(active) == len(slots) else logits[order]
        sampled = sample_rows(picked_logits, samplers)
        logprobs = token_logprob(picked_logits, sampled)
        mx.async_eval(sampled, logprobs, *self._batch.arrays(), *[a for s in samplers for a in s.state])
        return _Step(rows, sampled, logprobs, picked_logits, time.perf_counter())

    def _collect(self, step: "_Step", fed: bool = True) -> None:
        tokens, logprobs = step.tokens.tolist(), step.logprobs.tolist()
        self.metrics.observe("decode_step_seconds", time.perf_counter() - step.launched,
                             "from launching a decode step to its tokens being ready")
        self.metrics.inc("decode_steps_total", help="decode steps run")
        for k, (row, t, lp) in enumerate(zip(step.rows, tokens, logprobs)):
            if row.slot is None or self._slots[row.slot] is not row or row.job.cancelled:
                continue  # finished or dropped meanwhile
            self._accept(row, t, self._logprob_entries(row, step.logits[k], t, lp), fed)


@dataclass(eq=False)
class _Step:
    """A launched decode step: its rows (in the order of its outputs) and its lazy results."""

    rows: list[_Row]
    tokens: mx.array
    logprobs: mx.array
    logits: mx.array
    launched: float


def own_row(batch: State, i: int) -> State:
    """Row ``i`` of a batched state in buffers of its own. ``batch[i]`` is a view: kept by the state
    cache, it would keep the whole batch's buffers alive (64 rows of the 2.9B model: 1.3 GB) where the
    cache counts one row's 21 MB. A gather copies."""
    return batch[[i]]


def find_state(directory: Path | None, name: str) -> Path | None:
    if directory is None:
        return None
    for suffix in (".safetensors", ".pth"):
        path = directory / f"{name}{suffix}"
        if path.is_file():
            return path
    return None
