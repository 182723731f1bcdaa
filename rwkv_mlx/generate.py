"""Prompt in, text out: chunked prefill, a pipelined decode loop, stop strings, statistics.

The decode loop builds the graph for token n+1 (lazily, with ``mx.async_eval``)
before it waits for token n, so the host prepares the next step while the
device computes the current one -- the same pipelining mlx-lm uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .errors import InvalidArgumentError
from .sample import Sampler, SamplingParams, token_logprob, whitespace_digit_weights
from .state import State
from .tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 512  # tokens per evaluated piece: bounds memory for any prompt length


@dataclass
class GenerationResponse:
    """One streamed piece of output, with running statistics."""

    text: str
    token: int | None
    logprob: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (stop string), "eot" (end of text), "length"
    state: State | None = field(default=None, repr=False)  # the state after the last token, on the final piece


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def prefill(model, tokens: Sequence[int], state: State | None = None, *, chunk_size: int = DEFAULT_PREFILL_CHUNK,
            progress: Callable[[int, int], None] | None = None) -> tuple[mx.array, State]:
    """Run the prompt through the model in evaluated chunks; return (last logits [B, V], state).

    Memory stays flat in the prompt length: each chunk is evaluated before the
    next is built, and only the last position's logits are ever computed.
    """
    if not tokens:
        raise InvalidArgumentError("prompt is empty: give at least one token (id 0 marks a document start)")
    tokens = list(tokens)
    logits = None
    for start in range(0, len(tokens), chunk_size):
        piece = mx.array([tokens[start : start + chunk_size]], dtype=mx.uint32)
        last = start + chunk_size >= len(tokens)
        logits, state = model(piece, state, logits="last" if last else "none")
        mx.eval(state.arrays() if logits is None else [logits, *state.arrays()])
        if progress:
            progress(min(start + chunk_size, len(tokens)), len(tokens))
    return logits[:, -1], state


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

    ``prompt`` is text or token ids; ``state`` continues from a cached prompt.
    The final piece has ``finish_reason`` set and, with ``return_state``, the
    state after every generated token (ready to continue the conversation).
    """
    if max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be >= 1, got {max_tokens}")
    sampling = (sampling or SamplingParams()).validate(model.args.vocab_size)
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, (str, bytes)) else list(prompt)
    weights = None
    if sampling.has_penalty:
        weights = mx.array(whitespace_digit_weights(tokenizer.token_bytes, model.args.vocab_size))
    sampler = Sampler(sampling, model.args.vocab_size, count_weight=weights)

    mx.reset_peak_memory()
    tic = time.perf_counter()
    logits, state = prefill(model, prompt_ids, state, chunk_size=prefill_chunk, progress=prefill_progress)

    def sample(logits):
        token = sampler(logits)
        return token, token_logprob(logits, token)

    def step(token, state):
        logits, state = model(token[:, None], state, logits="last")
        return (*sample(logits[:, -1]), state)

    token, logprob = sample(logits)
    mx.async_eval(token, logprob, *sampler.state)
    prompt_time = time.perf_counter() - tic
    prompt_tps = len(prompt_ids) / prompt_time
    decoder = tokenizer.stream_decoder()
    matcher = StopMatcher(stop)
    tic = time.perf_counter()
    n = 0
    while True:
        # Build token n+1 before waiting for token n: the device never idles on the host.
        nxt = step(token, state) if n + 1 < max_tokens else None
        if nxt is not None:
            mx.async_eval(nxt[0], nxt[1], *nxt[2].arrays(), *sampler.state)
        tok = int(token.item())
        n += 1
        finish = None
        if stop_at_end_of_text and tok == tokenizer.end_of_text_id:
            finish, text = "eot", ""
        else:
            text, hit = matcher.feed(decoder.add(tok))
            if hit:
                finish = "stop"
        if finish is None and n >= max_tokens:
            finish = "length"
            text += matcher.feed(decoder.flush())[0] + matcher.flush()
        elapsed = time.perf_counter() - tic
        response = GenerationResponse(
            text=text, token=tok, logprob=float(logprob.item()), prompt_tokens=len(prompt_ids),
            prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=n / elapsed if elapsed > 0 else 0.0, peak_memory_gb=peak_memory_gb(),
            finish_reason=finish,
        )
        if finish is not None:
            if return_state:
                if nxt is not None:
                    response.state = nxt[2]
                else:
                    _, response.state = model(token[:, None], state, logits="none")
                    mx.eval(response.state.arrays())
            yield response
            return
        yield response
        token, logprob, state = nxt


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], *, verbose: bool = False,
             **kwargs) -> str:
    """The generated text (without the prompt).  Keyword arguments as ``stream_generate``;
    sampling knobs (temperature=..., top_p=..., seed=...) may be given directly."""
    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingParams.__dataclass_fields__}
    if knobs:
        kwargs["sampling"] = (kwargs.get("sampling") or SamplingParams()).replace(**knobs)
    pieces = []
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose:
        print()
    return "".join(pieces)
