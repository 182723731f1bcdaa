"""Prompt in, text out: chunked prefill, a pipelined decode loop, stop strings, statistics.

The decode loop builds the graph for token n+1 (lazily, with ``mx.async_eval``)
before it waits for token n, so the host prepares the next step while the
device computes the current one -- the same pipelining mlx-lm uses
(``$RWKV_MLX_DECODE_AHEAD`` queues more steps than one).

RWKV's whole memory of a prompt is its fixed-size :class:`State`, so a prompt
read once (:func:`cache_prompt`) can be continued any number of times
(``generate(..., state=...)``), and prompts of different lengths batch
naturally (:func:`batch_generate`): each is read alone, then the per-row
states are stacked and decoded together, one model call per step.
"""

from __future__ import annotations

import collections
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..backend import active_backend
from ..errors import InvalidArgumentError
from ..settings import env_int
from .sample import Sampler, SamplingParams, token_logprob, whitespace_digit_weights
from ..model.state import State
from .tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 512  # tokens per evaluated piece: bounds memory for any prompt length
# Decode steps the loop queues ahead of the token it reads. One keeps the device busy while the host's work
# for a step (building its launches, reading a token, its text) takes less than the device's; with CUDA's
# 161 launches a 2.9B step the two are close (kernel_log step 14: the step loop 190-259 tok/s between
# processes, stream_generate 185-200), and a second queued step might absorb the host's jitter. One process
# on an H100 with 2 gave no gain (187.8 tok/s streamed, beside 200.9 and 220.4 with 1; kernel_log step 21), so 1.
DECODE_AHEAD = 1


def decode_ahead() -> int:
    return env_int("RWKV_MLX_DECODE_AHEAD", DECODE_AHEAD, minimum=1)


@dataclass
class GenerationResponse:
    """One streamed piece of output, with running statistics."""

    text: str
    token: int | None
    logprob: float  # log-probability of ``token`` under the model's unmodified softmax
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (stop string), "eot" (end of text), "length"
    state: State | None = field(default=None, repr=False)  # the state after the last token, on the final piece
    seed: int | None = None  # the sampling seed actually used (pass it back to reproduce the run)
    row: int = 0  # which prompt of a batch this piece belongs to


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def prefill(model, tokens: Sequence[int] | Sequence[Sequence[int]], state: State | None = None, *,
            chunk_size: int = DEFAULT_PREFILL_CHUNK,
            progress: Callable[[int, int], None] | None = None) -> tuple[mx.array, State]:
    """Run the prompt through the model in evaluated chunks; return (last logits [B, V], state).

    ``tokens`` is one prompt, or a batch of prompts of one length read as rows of one batch
    (``state``, if given, has as many rows). Memory stays flat in the prompt length: each chunk
    is evaluated before the next is built, and only the last position's logits are ever computed.
    """
    if isinstance(tokens, (mx.array, np.ndarray)):
        tokens = tokens.tolist()
    tokens = list(tokens)
    rows = [list(r) for r in tokens] if tokens and not isinstance(tokens[0], (int, np.integer)) else [tokens]
    if len({len(r) for r in rows}) > 1:
        raise InvalidArgumentError("prompts read together must have the same number of tokens")
    if not rows[0]:
        raise InvalidArgumentError("prompt is empty: give at least one token (id 0 marks a document start)")
    if state is not None:
        state.check_fits(model)
        if state.batch_size != len(rows):
            raise InvalidArgumentError(f"{len(rows)} prompts but a state of {state.batch_size} rows")
    logits = None
    on_gpu = active_backend() != "cpu"  # see Model.__call__: bounds the memory queued on the device
    length = len(rows[0])
    for start in range(0, length, chunk_size):
        piece = mx.array([r[start : start + chunk_size] for r in rows], dtype=mx.uint32)
        last = start + chunk_size >= length
        logits, state = model(piece, state, logits="last" if last else "none", eval_each_block=on_gpu,
                              compiled_blocks=piece.shape[1] == chunk_size)  # one shape: traced once
        mx.eval(state.arrays() if logits is None else [logits, *state.arrays()])
        if progress:
            progress(min(start + chunk_size, length), length)
    return logits[:, -1], state.owned_by(model)


def start_state(model, states: Sequence[State | None]) -> State | None:
    """The state a batch of prompts is read from (prefill's ``state``): None where every row starts from the
    beginning (prefill's zero state), else each row's own state stacked, the model's zero state where a row
    has none."""
    if all(s is None for s in states):
        return None
    return State.stack([model.initial_state(1) if s is None else s for s in states])


def cache_prompt(model, tokenizer: Tokenizer, text: str | Sequence[int], state: State | None = None, *,
                 chunk_size: int = DEFAULT_PREFILL_CHUNK,
                 progress: Callable[[int, int], None] | None = None) -> State:
    """Read ``text`` once and return the state after it.

    Continue from it with ``generate(model, tokenizer, more_text, state=cached)``
    as often as you like (a State is a value: it is never changed), or keep it
    with ``cached.save(path)``.  The result equals reading the whole text in one
    go whenever the token boundaries are the same (split at "\\n\\n" to be sure).
    """
    ids = tokenizer.encode(text) if isinstance(text, (str, bytes)) else list(text)
    return prefill(model, ids, state, chunk_size=chunk_size, progress=progress)[1]


class StopMatcher:
    """Finds stop strings in streamed text and holds back anything that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was completed)."""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at = min(i for i, _ in hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenText:
    """One output stream's text: ids -> characters -> stop strings -> a finish reason."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], max_tokens: int, stop_at_end_of_text: bool):
        self.end_of_text = tokenizer.end_of_text_id if stop_at_end_of_text else None
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopMatcher([stop] if isinstance(stop, str) else stop)
        self.max_tokens = max_tokens
        self.count = 0

    def add(self, token: int) -> tuple[str, str | None]:
        """(text to emit, finish reason or None) after one more generated token."""
        self.count += 1
        if token == self.end_of_text:
            return "", "eot"
        text, hit = self.matcher.feed(self.decoder.add(token))
        if hit:
            return text, "stop"
        if self.count >= self.max_tokens:
            return text + self.matcher.feed(self.decoder.flush())[0] + self.matcher.flush(), "length"
        return text, None


@functools.lru_cache(maxsize=4)
def _count_weights(tokenizer: Tokenizer, vocab_size: int) -> mx.array:
    return mx.array(whitespace_digit_weights(tokenizer.token_bytes, vocab_size))


def sampler_for(model, tokenizer: Tokenizer, sampling: SamplingParams | None, batch_size: int = 1) -> Sampler:
    """A :class:`Sampler` for this model's vocabulary, with the reference's whitespace/digit count weights."""
    sampling = (sampling or SamplingParams()).validate(model.args.vocab_size)
    weights = _count_weights(tokenizer, model.args.vocab_size) if sampling.has_penalty else None
    return Sampler(sampling, model.args.vocab_size, batch_size, count_weight=weights, tokenizer=tokenizer)


def _check_max_tokens(max_tokens) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return int(max_tokens)


def _encode(tokenizer: Tokenizer, prompt: str | bytes | Sequence[int]) -> list[int]:
    return tokenizer.encode(prompt) if isinstance(prompt, (str, bytes)) else list(prompt)


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    state: State | None = None,
    stop_at_end_of_text: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefill_progress: Callable[[int, int], None] | None = None,
    return_state: bool = False,
) -> Iterator[GenerationResponse]:
    """Yield text pieces as they are generated (never splitting a UTF-8 character or a stop string).

    ``prompt`` is text or token ids; ``state`` continues from a cached prompt
    (:func:`cache_prompt`).  The final piece has ``finish_reason`` set and,
    with ``return_state``, the state after every generated token (ready to
    continue the conversation).  Each piece carries its token id, its
    log-probability and running speeds; ``seed`` is the seed actually used.
    """
    yield from _decode(model, tokenizer, [_encode(tokenizer, prompt)], [sampling or SamplingParams()],
                       [_check_max_tokens(max_tokens)], [stop], [state], stop_at_end_of_text=stop_at_end_of_text,
                       prefill_chunk=prefill_chunk, prefill_progress=prefill_progress, return_state=return_state)


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], *, verbose: bool = False,
             **kwargs) -> str:
    """The generated text (without the prompt).  Keyword arguments as ``stream_generate``;
    sampling knobs (temperature=..., top_p=..., seed=...) may be given directly."""
    kwargs = _merge_knobs(kwargs)
    pieces = []
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose:
        print()
    return "".join(pieces)


def _merge_knobs(kwargs: dict, key: str = "sampling") -> dict:
    """Fold sampling knobs given as keyword arguments into ``kwargs[key]`` (one params or a list)."""
    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingParams.__dataclass_fields__}
    if knobs:
        base = kwargs.get(key)
        if base is None or isinstance(base, SamplingParams):
            kwargs[key] = (base or SamplingParams()).replace(**knobs)
        else:
            kwargs[key] = [(s or SamplingParams()).replace(**knobs) for s in base]
    return kwargs


# ---------------------------------------------------------------------------------------
# batches


def _per_row(value, n: int, is_single: Callable[[object], bool], name: str) -> list:
    """``value`` for every row: one value shared, or a sequence of exactly n."""
    if is_single(value):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise InvalidArgumentError(f"{name}: {len(values)} values for {n} prompts")
    return values


def _is_stop_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value)


class _RowSamplers:
    """Samples a [B, V] batch with per-row parameters.

    Rows whose parameters are equal share one batched :class:`Sampler` when
    sharing cannot change their draws (greedy, or no fixed seed); a row with a
    seed gets its own sampler so it draws exactly what it would alone.
    """

    def __init__(self, model, tokenizer: Tokenizer, samplings: list[SamplingParams], prompts: list[list[int]]):
        shared: list[tuple[SamplingParams, list[int]]] = []
        singles: list[list[int]] = []
        for i, params in enumerate(samplings):
            counts_prompt = params.has_penalty and not params.penalty_ignore_prompt
            if (params.is_greedy or params.seed is None) and not counts_prompt:
                match = next((rows for p, rows in shared if p == params), None)
                if match is None:
                    shared.append((params, [i]))
                else:
                    match.append(i)
            else:
                singles.append([i])
        self.groups = []
        for rows in [*(rows for _, rows in shared), *singles]:
            sampler = sampler_for(model, tokenizer, samplings[rows[0]], len(rows))
            if len(rows) == 1:
                sampler.observe_prompt(prompts[rows[0]])
            self.groups.append((rows, mx.array(rows, dtype=mx.int32), sampler))
        order = [i for rows, _, _ in self.groups for i in rows]
        self.inverse = None if order == list(range(len(order))) else mx.array(np.argsort(order), dtype=mx.int32)
        self.seeds = [0] * len(samplings)
        for rows, _, sampler in self.groups:
            for i in rows:
                self.seeds[i] = sampler.seed

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        if len(self.groups) == 1:
            tokens = self.groups[0][2](logits)
        else:
            tokens = mx.concatenate([sampler(logits[index]) for _, index, sampler in self.groups])
            if self.inverse is not None:
                tokens = tokens[self.inverse]
        return tokens, token_logprob(logits, tokens)

    @property
    def state(self) -> list[mx.array]:
        return [a for _, _, sampler in self.groups for a in sampler.state]

    @property
    def needs_tokens(self) -> bool:
        return any(sampler.needs_tokens for _, _, sampler in self.groups)

    def advance(self, tokens: list[int]) -> None:
        """Tell the grammar constraints the tokens just sampled (all rows)."""
        for rows, _, sampler in self.groups:
            sampler.advance([tokens[i] for i in rows])


def stream_batch_generate(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    samplings: SamplingParams | Sequence[SamplingParams] | None = None,
    max_tokens: int | Sequence[int] = 256,
    stop: Sequence[str] | Sequence[Sequence[str]] = (),
    states: Sequence[State | None] | None = None,
    stop_at_end_of_text: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    return_state: bool = False,
) -> Iterator[GenerationResponse]:
    """Generate for several prompts at once; yields pieces tagged with ``row``.

    Each prompt is read from its own cached ``states[i]`` or from the start (any
    lengths; prompts of one length as rows of one model call, ``prompt_groups``),
    then the rows are decoded together as one batch: one model call per step.
    ``samplings``, ``max_tokens`` and ``stop`` take one value for all rows or one per row.  A row that has
    finished emits nothing more; it keeps riding along in the batch until every
    row is done (its extra tokens are computed and discarded).  With
    ``return_state`` each row's final piece holds that row's state.
    """
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise InvalidArgumentError("prompts must be a non-empty list of prompts")
    B = len(prompts)
    stop = [stop] if isinstance(stop, str) else stop
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    one_params = lambda v: v is None or isinstance(v, SamplingParams)  # noqa: E731
    samplings = [s or SamplingParams() for s in _per_row(samplings, B, one_params, "samplings")]
    one_limit = lambda v: not isinstance(v, (list, tuple))  # noqa: E731
    limits = [_check_max_tokens(m) for m in _per_row(max_tokens, B, one_limit, "max_tokens")]
    stops = _per_row(stop, B, _is_stop_list, "stop")
    states = _per_row(states, B, lambda v: v is None, "states")
    for s in stops:
        if not _is_stop_list(s):
            raise InvalidArgumentError(f"stop must be a list of strings or one such list per prompt, got {s!r}")
    yield from _decode(model, tokenizer, prompt_ids, samplings, limits, stops, states,
                       stop_at_end_of_text=stop_at_end_of_text, prefill_chunk=prefill_chunk, return_state=return_state)


def prompt_groups(lengths: Sequence[int], chunk_size: int) -> list[list[int]]:
    """Which prompts are read together, as lists of their indices: prompts of one length, as many a call as
    keep it within ``chunk_size`` tokens (a single prompt's chunk: the same memory bound), cut to a power
    of two. A GPU compiles the head's launch plan once for each row count it meets, so few counts it is."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    groups = []
    for n, rows in by_length.items():
        most = max(1, chunk_size // max(n, 1))  # (an empty prompt goes on to prefill, which refuses it)
        while rows:
            take = 1 << (min(len(rows), most).bit_length() - 1)
            groups.append(rows[:take])
            rows = rows[take:]
    return groups


def _read_prompts(model, prompt_ids: list[list[int]], states: list[State | None], chunk_size: int,
                  progress: Callable[[int, int], None] | None) -> tuple[mx.array, State]:
    """Every prompt read from its own state (None: the start), in few model calls (``prompt_groups``);
    returns the last logits [B, V] and the state of B rows, in the prompts' order."""
    order, logits, parts = [], [], []
    for rows in prompt_groups([len(ids) for ids in prompt_ids], chunk_size):
        start = start_state(model, [states[i] for i in rows])
        row_logits, row_state = prefill(model, [prompt_ids[i] for i in rows], start, chunk_size=chunk_size,
                                        progress=progress)
        order += rows
        logits.append(row_logits)
        parts.append(row_state)
    if order == sorted(order):
        return mx.concatenate(logits) if len(logits) > 1 else logits[0], State.stack(parts)
    back = np.argsort(order).tolist()  # row i of the batch is the prompt at order[i]
    return mx.concatenate(logits)[mx.array(back)], State.stack(parts)[back]


def _decode(model, tokenizer: Tokenizer, prompt_ids: list[list[int]], samplings: list[SamplingParams],
            limits: list[int], stops: list[Sequence[str]], states: list[State | None], *, stop_at_end_of_text: bool,
            prefill_chunk: int, prefill_progress: Callable[[int, int], None] | None = None,
            return_state: bool = False) -> Iterator[GenerationResponse]:
    """The decode loop behind :func:`stream_generate` (one row) and :func:`stream_batch_generate`."""
    B = len(prompt_ids)
    sample = _RowSamplers(model, tokenizer, samplings, prompt_ids)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    logits, state = _read_prompts(model, prompt_ids, states, prefill_chunk, prefill_progress)

    # A grammar needs token n on the host before it can mask step n+1, so then the
    # pipelined step is only the model call; sampling waits for the host's mask.
    constrained = sample.needs_tokens

    def step(token, state):
        logits, state = model.step(token, state)
        return (logits, state) if constrained else (*sample(logits), state)

    token, logprob = sample(logits)
    mx.async_eval(token, logprob, *sample.state)
    prompt_tps = sum(map(len, prompt_ids)) / (time.perf_counter() - tic)
    outputs = [TokenText(tokenizer, stops[i], limits[i], stop_at_end_of_text) for i in range(B)]
    active = list(range(B))
    ahead = 1 if constrained else decode_ahead()
    # queue[0]: (token n, its log-prob, the state before it); each later entry the step reading the one before
    queue = collections.deque([(token, logprob, state)])
    tic = time.perf_counter()
    n = 0
    while True:
        # Build the steps after token n before waiting for it: the device never idles on the host.
        while len(queue) <= ahead and n + len(queue) < max(limits[i] for i in active):
            nxt = step(queue[-1][0], queue[-1][-1])
            mx.async_eval(*nxt[:-1], *nxt[-1].arrays(), *([] if constrained else sample.state))
            queue.append(nxt)
        token, logprob, state = queue.popleft()
        nxt = queue[0] if queue else None
        toks, lps = token.tolist(), logprob.tolist()
        if constrained and nxt is not None:
            sample.advance(toks)  # host: advance the matchers and mask the next step (the model step runs meanwhile)
            nxt = queue[0] = (*sample(nxt[0]), nxt[1])
            mx.async_eval(nxt[0], nxt[1], *sample.state)
        n += 1
        elapsed = time.perf_counter() - tic
        after = None
        for i in list(active):
            text, finish = outputs[i].add(toks[i])
            response = GenerationResponse(
                text=text, token=toks[i], logprob=lps[i], prompt_tokens=len(prompt_ids[i]), prompt_tps=prompt_tps,
                generation_tokens=n, generation_tps=n / elapsed if elapsed > 0 else 0.0,
                peak_memory_gb=peak_memory_gb(), finish_reason=finish, seed=sample.seeds[i], row=i,
            )
            if finish is not None:
                active.remove(i)
                if return_state:
                    after = _state_after(model, token, state, nxt) if after is None else after
                    response.state = after if B == 1 else after[i]
            yield response
        if not active:
            return


def _state_after(model, token: mx.array, state: State, nxt) -> State:
    """The state after ``token`` was read: already built by the pipelined next step, or built now."""
    if nxt is not None:
        return nxt[2].owned_by(model)
    _, after = model(token[:, None], state, logits="none")
    mx.eval(after.arrays())
    return after.owned_by(model)


def batch_generate(model, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]], **kwargs) -> list[str]:
    """The generated text for each prompt (in order).  Keyword arguments as
    :func:`stream_batch_generate`; sampling knobs given directly apply to every row.

        rwkv_mlx.batch_generate(model, tokenizer, ["ROMEO:", "JULIET: O"], max_tokens=32,
                                samplings=[SamplingParams.greedy(), SamplingParams(seed=1)])
    """
    kwargs = _merge_knobs(kwargs, "samplings")
    texts = [[] for _ in prompts]
    for response in stream_batch_generate(model, tokenizer, prompts, **kwargs):
        texts[response.row].append(response.text)
    return ["".join(t) for t in texts]
