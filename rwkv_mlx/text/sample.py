"""Token sampling with the RWKV reference semantics, as lazy MLX ops.

The reference is ``rwkv`` pip ``PIPELINE.sample_logits`` / ``PIPELINE.generate``
(ChatRWKV ``rwkv_pip_package/src/rwkv/utils.py``) and the chat demo
``API_DEMO_CHAT.py``; see spec ``rwkv7.md`` section 7.1.  One decode step is

1. logit processors: ``logit_bias`` added (OpenAI's, not in the reference); banned tokens -> ``-inf``; repetition penalty
   ``logit[n] -= presence * seen[n] + frequency * occ[n]`` for tokens generated so
   far (prompt tokens are not counted unless asked);
2. ``probs = softmax(logits)`` in float32 (temperature NOT applied yet);
3. top-p: sort descending, ``cutoff`` = the probability at the first sorted index
   whose cumulative sum is ``>= top_p``; keep every token with ``prob >= cutoff``
   (ties at the cutoff kept);
4. top-k (``> 0``): keep the k most probable tokens; min-p (``> 0``, not in the
   reference): keep tokens with ``prob >= min_p * max(prob)``.  All filters look at
   the same step-2 probabilities and are intersected;
5. temperature: ``probs ** (1 / T)`` over the kept tokens, renormalised, sampled.

Everything here is pure MLX (no ``.item()``, no numpy, no Python branching on
array values), so a whole step -- processors, filtering, sampling with an explicit
PRNG key, and the penalty-state update -- is one lazily built graph that
:class:`Sampler` compiles with :func:`mx.compile`.  Python branches only on the
(static) sampling parameters and shapes.

The idiom follows ``mlx_lm.sample_utils``: :func:`make_sampler` returns a small
``(logits) -> tokens`` function and :func:`make_logits_processors` a list of
logits processors.  Unlike mlx-lm, our processors are ``(logits) -> logits``:
the repetition penalty keeps its occurrence counts on device and is told about
each sampled token through ``accept(tokens)`` instead of re-reading the token
history.

Defaults (:class:`SamplingParams`) are the ``rwkv`` pip ``PIPELINE_ARGS``
defaults for generic completion: T 1.0, top-p 0.85, top-k 0, presence 0.2,
frequency 0.2, decay 0.996.  :meth:`SamplingParams.chat` gives the
``API_DEMO_CHAT.py`` values (T 1.0, top-p 0.3, presence 0.5, frequency 0.5,
decay 0.996, end-of-text token 0 banned).

Decisions where the reference is silent, odd or not reproducible (see the
docstrings for details):

* temperature 0 means "top_p = 0, T = 1" exactly as the reference; top_p 0
  keeps only the most probable token(s).  :func:`make_sampler` implements both
  as ``argmax`` (lowest id on an exact tie; the reference would draw among
  exactly tied maxima); :func:`filtered_probs` still reports the reference
  distribution, ties included.
* top-p: if no cumulative sum reaches ``top_p`` (possible in float32 when
  ``top_p`` is 1 or within rounding of it) every token is kept.  The reference's
  ``np.argmax`` of an all-False mask would give index 0, i.e. silently turn
  ``top_p = 1.0`` into greedy decoding; we do not copy that quirk.
  ``top_p >= 1`` skips the filter altogether.
* top-k keeps exactly k tokens; on a tie at the k-th probability the lowest token
  ids win (the reference's order among ties is whatever its unstable argsort
  gives).
* temperature is applied in the log domain, ``(log p - max log p) / T`` over the
  kept tokens, which is the same distribution as ``p ** (1/T)`` renormalised but
  cannot underflow to an all-zero vector at small T (the reference then fails).
* presence is charged to every token that was generated, even one whose count
  weight is 0 (space/tab/digit tokens, see :func:`whitespace_digit_weights`):
  the reference tests membership of its ``occurrence`` dict, not ``occ > 0``.
  We therefore keep a separate ``seen`` mask next to ``occ``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InvalidArgumentError
from .logits import LogitsProcessor, _f32

__all__ = [
    "SamplingParams",
    "LogitsProcessor",
    "SampleFn",
    "LogitBias",
    "RepetitionPenalty",
    "TokenBan",
    "Sampler",
    "make_logits_processors",
    "make_sampler",
    "filtered_logprobs",
    "filtered_probs",
    "keep_mask",
    "log_softmax",
    "token_logprob",
    "whitespace_digit_weights",
    "CHAT_END_OF_TEXT",
]

#: OpenAI's range for a logit_bias entry
MAX_LOGIT_BIAS = 100

#: Token id 0 is end-of-document in the RWKV World vocabulary; chat bans it.
CHAT_END_OF_TEXT = 0

#: ``(logits [B, V]) -> tokens [B] uint32``; the optional ``key`` makes it
#: reproducible (without one the global ``mx.random`` state is used, as mlx-lm).
SampleFn = Callable[..., mx.array]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs (defaults: ``rwkv`` pip ``PIPELINE_ARGS``).

    temperature: ``>= 0``; 0 means greedy.  Applied *after* filtering, as
        ``probs ** (1/T)`` (unlike llama.cpp / HF, which divide logits first).
    top_p: in ``[0, 1]``; 0 means greedy, 1 means off.
    top_k: ``>= 0``; 0 means off.
    min_p: in ``[0, 1]``; 0 means off.  Keeps tokens whose probability is
        ``>= min_p * max probability`` (same probabilities as top-p/top-k).
    presence_penalty, frequency_penalty: subtracted from the logit of every
        token generated so far: ``presence + frequency * occ[n]``.  Any finite
        value (negative values encourage repetition).
    penalty_decay: in ``[0, 1]``; after each sampled token all counts are
        multiplied by it, then the new token's count is incremented.
    penalty_ignore_prompt: True (the reference) = prompt tokens are not counted.
    banned_tokens: token ids whose logit is set to ``-inf`` at every step.
    logit_bias: ``{token id: bias}`` (or ``(id, bias)`` pairs), each bias in
        ``[-100, 100]`` added to that token's logit at every step before the
        bans and penalties (OpenAI's ``logit_bias``; -100 all but bans a token,
        ``banned_tokens`` bans it exactly).
    seed: ``None`` (a fresh random seed) or an integer in ``[0, 2**64)``; the
        same seed, params and logits reproduce a run exactly.
    json_schema: a JSON schema (dict, bool or JSON text): the output is a JSON
        document it accepts (:mod:`rwkv_mlx.text.grammar`).  ``{}`` = any JSON value.
    grammar: GBNF text (llama.cpp's syntax): the output matches its ``root`` rule.
        At most one of the two; the mask applies after bans and penalties.
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    penalty_ignore_prompt: bool = True
    banned_tokens: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    json_schema: dict | bool | str | None = field(default=None, hash=False)
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.logit_bias, Mapping):  # the OpenAI form; kept as pairs so params stay hashable
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))

    # -- presets -----------------------------------------------------------

    @classmethod
    def chat(cls, **overrides) -> "SamplingParams":
        """``API_DEMO_CHAT.py`` values: T 1.0, top-p 0.3, presence 0.5,
        frequency 0.5, decay 0.996, end-of-text (token 0) banned."""
        base = dict(
            temperature=1.0,
            top_p=0.3,
            top_k=0,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            penalty_decay=0.996,
            banned_tokens=(CHAT_END_OF_TEXT,),
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def greedy(cls, **overrides) -> "SamplingParams":
        """Argmax decoding with no penalties (reproducible, seed irrelevant)."""
        base = dict(
            temperature=0.0,
            top_p=0.0,
            top_k=0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    # -- derived -----------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_p 0)."""
        return self.temperature == 0 or self.top_p == 0

    @property
    def is_constrained(self) -> bool:
        """True when a JSON schema or grammar constrains the output."""
        return self.json_schema is not None or self.grammar is not None

    @property
    def has_penalty(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    # -- validation ----------------------------------------------------------

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise :class:`InvalidArgumentError` for any out-of-range value.

        Returns ``self`` so it can be chained.  With ``vocab_size`` the banned
        token ids are range-checked too.
        """
        _check_real("temperature", self.temperature, lo=0.0, rng="a finite number >= 0 (0 = greedy)")
        _check_real("top_p", self.top_p, lo=0.0, hi=1.0, rng="in [0, 1] (0 = greedy, 1 = off)")
        _check_int("top_k", self.top_k, lo=0, rng="an integer >= 0 (0 = off)")
        _check_real("min_p", self.min_p, lo=0.0, hi=1.0, rng="in [0, 1] (0 = off)")
        _check_real("presence_penalty", self.presence_penalty, rng="a finite number")
        _check_real("frequency_penalty", self.frequency_penalty, rng="a finite number")
        _check_real("penalty_decay", self.penalty_decay, lo=0.0, hi=1.0, rng="in [0, 1]")
        if not isinstance(self.penalty_ignore_prompt, (bool, np.bool_)):
            raise InvalidArgumentError(
                f"penalty_ignore_prompt must be True or False, got {self.penalty_ignore_prompt!r}"
            )
        if isinstance(self.banned_tokens, (str, bytes)) or not isinstance(
            self.banned_tokens, Iterable
        ):
            raise InvalidArgumentError(
                f"banned_tokens must be a sequence of token ids, got {self.banned_tokens!r}"
            )
        hi = None if vocab_size is None else vocab_size - 1
        rng = "an integer >= 0" if hi is None else f"an integer in [0, {hi}]"
        for t in self.banned_tokens:
            _check_int("banned_tokens", t, lo=0, hi=hi, rng=rng, what="entry ")
        if isinstance(self.logit_bias, (str, bytes)) or not isinstance(self.logit_bias, Iterable):
            raise InvalidArgumentError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}")
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise InvalidArgumentError(f"logit_bias must map token ids to biases, got the entry {pair!r}")
            _check_int("logit_bias", pair[0], lo=0, hi=hi, rng=f"keyed by {rng}", what="")
            _check_real(f"logit_bias[{pair[0]}]", pair[1], lo=-MAX_LOGIT_BIAS, hi=MAX_LOGIT_BIAS,
                        rng=f"a number in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**64 - 1, rng="None or an integer in [0, 2**64)")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool, str)):
            raise InvalidArgumentError(f"json_schema must be a dict, a bool or JSON text, got {self.json_schema!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidArgumentError(f"grammar must be GBNF text (a str), got {self.grammar!r}")
        if self.json_schema is not None and self.grammar is not None:
            raise InvalidArgumentError("give json_schema or grammar, not both")
        return self


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_int(name, v, *, lo=None, hi=None, rng, what=""):
    ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        raise InvalidArgumentError(f"{name} {what}must be {rng}, got {v!r}")


def _check_real(name, v, *, lo=None, hi=None, rng):
    ok = (
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and math.isfinite(v)
        and (lo is None or v >= lo)
        and (hi is None or v <= hi)
    )
    if not ok:
        raise InvalidArgumentError(f"{name} must be {rng}, got {v!r}")


# --------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------


def log_softmax(logits: mx.array) -> mx.array:
    """``log softmax`` over the last axis, in float32."""
    x = _f32(logits)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def token_logprob(logits: mx.array, tokens: mx.array) -> mx.array:
    """Log-probability ``[B]`` float32 of ``tokens [B]`` under the *unmodified*
    softmax of ``logits [B, V]`` (no penalties, filters or temperature)."""
    lp = log_softmax(logits)
    idx = tokens.astype(mx.int32).reshape(-1, 1)
    return mx.take_along_axis(lp, idx, axis=-1).reshape(-1)


def keep_mask(
    probs: mx.array, *, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> mx.array | None:
    """Boolean ``[B, V]`` mask of the tokens that survive top-p, top-k and
    min-p on ``probs`` (spec 7.1 steps 3-4), or ``None`` when no filter is on.

    top-p: cutoff = ``sorted_desc[i]`` for the first ``i`` with
    ``cumsum(sorted_desc)[i] >= top_p`` (the last index if there is none);
    keep ``probs >= cutoff``.  top-k: the k largest, ties at the k-th value
    resolved towards lower token ids.  min-p: ``probs >= min_p * max(probs)``.
    """
    V = probs.shape[-1]
    use_top_p = top_p < 1.0
    use_top_k = 0 < top_k < V
    use_min_p = min_p > 0.0
    keep = None
    if use_top_p or use_top_k:
        sorted_desc = -mx.sort(-probs, axis=-1)
    if use_top_p:
        csum = mx.cumsum(sorted_desc, axis=-1)
        pos = mx.arange(V, dtype=mx.int32)
        first = mx.min(mx.where(csum >= top_p, pos, V - 1), axis=-1, keepdims=True)
        cutoff = mx.take_along_axis(sorted_desc, first, axis=-1)
        keep = probs >= cutoff
    if use_top_k:
        kth = sorted_desc[..., top_k - 1 : top_k]
        above = probs > kth
        n_above = above.astype(mx.int32).sum(axis=-1, keepdims=True)
        tied = probs == kth
        tie_rank = mx.cumsum(tied.astype(mx.int32), axis=-1)
        k_keep = mx.logical_or(above, mx.logical_and(tied, tie_rank <= top_k - n_above))
        keep = k_keep if keep is None else mx.logical_and(keep, k_keep)
    if use_min_p:
        pmax = mx.max(probs, axis=-1, keepdims=True)
        m_keep = probs >= pmax * min_p
        keep = m_keep if keep is None else mx.logical_and(keep, m_keep)
    return keep


def _effective(temperature: float, top_p: float) -> tuple[float, float]:
    """The reference maps temperature 0 to (T = 1, top_p = 0); a T so small
    that 1/T overflows is the same limit."""
    if temperature == 0 or math.isinf(1.0 / temperature):
        return 1.0, 0.0
    return float(temperature), float(top_p)


def _scaled_logits(
    logits: mx.array, temperature: float, top_p: float, top_k: int, min_p: float
) -> mx.array:
    """Unnormalised log of the filtered, tempered distribution (-inf = removed)."""
    x = _f32(logits)
    temperature, top_p = _effective(temperature, top_p)
    probs = mx.softmax(x, axis=-1)
    keep = keep_mask(probs, top_p=top_p, top_k=top_k, min_p=min_p)
    # log p - max log p == logits - max logits; the most probable token always
    # survives every filter, so this is also "minus the max over kept tokens".
    s = x - mx.max(x, axis=-1, keepdims=True)
    if temperature != 1.0:
        s = s * (1.0 / temperature)
    if keep is not None:
        s = mx.where(keep, s, _NEG_INF)
    return s


def _params_tuple(params: SamplingParams | None, kw: dict) -> tuple:
    if params is not None:
        if kw:
            params = replace(params, **kw)
        return params.temperature, params.top_p, params.top_k, params.min_p
    return (
        kw.get("temperature", 1.0),
        kw.get("top_p", 1.0),
        kw.get("top_k", 0),
        kw.get("min_p", 0.0),
    )


def filtered_logprobs(
    logits: mx.array, params: SamplingParams | None = None, **knobs
) -> mx.array:
    """Log of the distribution actually sampled from (spec 7.1 steps 2-5),
    ``[B, V]`` float32, ``-inf`` for removed tokens.

    ``logits`` are taken as they are (apply processors first).  Pass a
    :class:`SamplingParams` and/or the knobs ``temperature``, ``top_p``,
    ``top_k``, ``min_p`` (knob defaults without params: 1.0, 1.0, 0, 0.0).
    """
    s = _scaled_logits(logits, *_params_tuple(params, knobs))
    return s - mx.logsumexp(s, axis=-1, keepdims=True)


def filtered_probs(logits: mx.array, params: SamplingParams | None = None, **knobs) -> mx.array:
    """``exp(filtered_logprobs(...))``: the probabilities actually sampled from.

    For greedy params this is the reference distribution (all exactly tied
    maxima kept); :func:`make_sampler` itself then uses ``argmax``.
    """
    return mx.exp(filtered_logprobs(logits, params, **knobs))


# --------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------


def greedy_sampler(logits: mx.array, key: mx.array | None = None) -> mx.array:
    """Argmax over the last axis (``key`` ignored), uint32 ``[B]``."""
    return mx.argmax(_f32(logits), axis=-1).astype(mx.uint32)


def make_sampler(params: SamplingParams) -> SampleFn:
    """``sample(logits [B, V], key=None) -> tokens [B] uint32``.

    Pure MLX; ``logits`` should already be processed (bans, penalties).  With
    ``key`` the draw is a function of the key only; without, the global
    ``mx.random`` state is used (mlx-lm style).
    """
    params.validate()
    temperature, top_p = _effective(params.temperature, params.top_p)
    if top_p == 0:
        return greedy_sampler
    top_k, min_p = params.top_k, params.min_p

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        s = _scaled_logits(logits, temperature, top_p, top_k, min_p)
        return mx.random.categorical(s, axis=-1, key=key).astype(mx.uint32)

    return sample


# --------------------------------------------------------------------------
# logits processors
# --------------------------------------------------------------------------


class LogitBias(LogitsProcessor):
    """Adds a fixed bias to some tokens' logits: ``logits + bias`` with ``bias [V]`` zero elsewhere (a token
    named twice takes its last bias, as a JSON object's repeated key does)."""

    def __init__(self, pairs: Iterable[tuple[int, float]], vocab_size: int):
        b = np.zeros((vocab_size,), dtype=np.float32)
        for t, v in dict(pairs).items():
            b[int(t)] = v
        self.bias = mx.array(b)

    def apply(self, state, logits):
        return logits + self.bias


class TokenBan(LogitsProcessor):
    """Sets the logits of ``token_ids`` to ``-inf`` (reference ``token_ban``;
    the chat demo subtracts 1e10, which gives the same probability 0)."""

    def __init__(self, token_ids: Sequence[int], vocab_size: int):
        ids = sorted(set(int(t) for t in token_ids))
        for t in ids:
            if not 0 <= t < vocab_size:
                raise InvalidArgumentError(
                    f"banned_tokens entry must be an integer in [0, {vocab_size - 1}], got {t}"
                )
        self.token_ids = tuple(ids)
        m = np.zeros((vocab_size,), dtype=bool)
        m[list(ids)] = True
        self.mask = mx.array(m)

    def apply(self, state, logits):
        return mx.where(self.mask, _NEG_INF, logits)


class RepetitionPenalty(LogitsProcessor):
    """Decayed presence/frequency penalty with per-row state on device.

    State: ``occ [B, V]`` float32 (decayed, weighted counts) and ``seen [B, V]``
    float32 0/1 (token generated at least once).  Processing:
    ``logits - (presence * seen + frequency * occ)``.  After token ``t``:
    ``occ *= decay; occ[t] += count_weight[t]; seen[t] = 1`` for each row.

    ``count_weight [V]`` (default all ones) is the reference's rule that tokens
    whose text is in ``" \\t0123456789"`` add 0 to their count (they still get
    the presence part); build it with :func:`whitespace_digit_weights`.  The
    reference keeps counts as Python floats; here they are float32.
    """

    def __init__(
        self,
        presence: float,
        frequency: float,
        decay: float,
        vocab_size: int,
        batch_size: int = 1,
        count_weight: mx.array | np.ndarray | None = None,
    ):
        self.presence = float(presence)
        self.frequency = float(frequency)
        self.decay = float(decay)
        self.vocab_size = int(vocab_size)
        self.batch_size = int(batch_size)
        if count_weight is None:
            self.count_weight = mx.ones((self.vocab_size,), dtype=mx.float32)
        else:
            w = mx.array(count_weight).astype(mx.float32)
            if w.shape != (self.vocab_size,):
                raise InvalidArgumentError(
                    f"count_weight must have shape ({self.vocab_size},), got {tuple(w.shape)}"
                )
            self.count_weight = w
        self.reset()

    def reset(self, batch_size: int | None = None) -> None:
        if batch_size is not None:
            self.batch_size = int(batch_size)
        z = mx.zeros((self.batch_size, self.vocab_size), dtype=mx.float32)
        self.state = (z, z)

    @property
    def occ(self) -> mx.array:
        return self.state[0]

    @property
    def seen(self) -> mx.array:
        return self.state[1]

    def apply(self, state, logits):
        occ, seen = state
        return logits - (self.presence * seen + self.frequency * occ)

    def update(self, state, tokens):
        occ, seen = state
        onehot = mx.arange(self.vocab_size, dtype=mx.uint32)[None, :] == tokens.astype(
            mx.uint32
        ).reshape(-1, 1)
        w = self.count_weight[tokens.reshape(-1).astype(mx.int32)][:, None]
        occ = occ * self.decay + mx.where(onehot, w, 0.0)
        seen = mx.where(onehot, 1.0, seen)
        return occ, seen

    def observe(self, tokens: mx.array | Sequence[int] | Sequence[Sequence[int]]) -> None:
        """Count a prefix (e.g. the prompt) as if its tokens had been accepted
        one by one, in one vectorised update.  ``tokens``: ``[T]`` (same for
        every row) or ``[B, T]``."""
        t = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
        if t.size == 0:
            return
        if t.ndim == 1:
            t = mx.broadcast_to(t[None, :], (self.batch_size, t.shape[0]))
        if t.ndim != 2 or t.shape[0] != self.batch_size:
            raise InvalidArgumentError(
                f"tokens must have shape [T] or [{self.batch_size}, T], got {tuple(t.shape)}"
            )
        T = t.shape[1]
        t = t.astype(mx.int32)
        occ, seen = self.state
        powers = mx.power(mx.array(self.decay, dtype=mx.float32), mx.arange(T - 1, -1, -1).astype(mx.float32))
        vals = powers[None, :] * self.count_weight[t]
        rows = mx.broadcast_to(mx.arange(self.batch_size, dtype=mx.int32)[:, None], t.shape)
        occ = (occ * (self.decay**T)).at[rows, t].add(vals)
        seen = seen.at[rows, t].maximum(1.0)
        self.state = (occ, seen)


def make_logits_processors(
    params: SamplingParams,
    vocab_size: int,
    batch_size: int = 1,
    count_weight: mx.array | np.ndarray | None = None,
    tokenizer=None,
) -> list[LogitsProcessor]:
    """Processors for ``params``, in reference order: the logit bias (first, as in llama.cpp's chain), token
    bans, then the repetition penalty (omitted when both penalties are 0), then the grammar constraint of
    ``json_schema`` / ``grammar`` (which needs ``tokenizer``)."""
    params.validate(vocab_size)
    procs: list[LogitsProcessor] = []
    if params.logit_bias:
        procs.append(LogitBias(params.logit_bias, vocab_size))
    if params.banned_tokens:
        procs.append(TokenBan(params.banned_tokens, vocab_size))
    if params.has_penalty:
        procs.append(
            RepetitionPenalty(
                params.presence_penalty,
                params.frequency_penalty,
                params.penalty_decay,
                vocab_size,
                batch_size,
                count_weight,
            )
        )
    if params.is_constrained:
        if tokenizer is None:
            raise InvalidArgumentError("json_schema and grammar need the tokenizer (token bytes) to build masks")
        from .grammar.processor import constraint_for

        procs.append(constraint_for(params, tokenizer, vocab_size, batch_size))
    return procs


def whitespace_digit_weights(
    token_bytes: Callable[[int], bytes | None], vocab_size: int
) -> np.ndarray:
    """Per-token count weights ``[V]`` float32 for :class:`RepetitionPenalty`.

    0 where the token's UTF-8 text is a substring of ``" \\t0123456789"``
    (Python ``in``, exactly as the reference: so ``" "``, ``"7"``, ``"12"``,
    ``"789"``, ``" \\t0"`` get 0 but ``"  "`` or ``"21"`` get 1), 1 otherwise.
    Bytes that are not valid UTF-8 decode to U+FFFD in the reference and get 1;
    a token with no bytes (``None`` / ``b""``, e.g. id 0, which the reference
    tokenizer cannot decode) gets 1 as well.
    """
    w = np.ones((vocab_size,), dtype=np.float32)
    for i in range(vocab_size):
        b = token_bytes(i)
        if not b or len(b) > 12 or bytes(b).strip(b" \t0123456789"):  # cheap rejections first: 65k tokens
            continue
        try:
            text = bytes(b).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text in " \t0123456789":
            w[i] = 0.0
    return w


# --------------------------------------------------------------------------
# the combined sampler
# --------------------------------------------------------------------------


def _new_seed() -> int:
    return secrets.randbits(63)


class Sampler:
    """Processors + sampler + PRNG key for one generation of ``batch_size`` rows.

    ``tokens = sampler(logits)`` (same as :meth:`step`) builds, lazily, one
    graph: processors -> filter -> sample with the next split of the key ->
    penalty-state update.  Nothing is evaluated; evaluate ``tokens`` together
    with :attr:`state` (``mx.eval(tokens, *sampler.state)`` or
    ``mx.async_eval``) once per decode step so the state chain stays short.
    The pure step is compiled with :func:`mx.compile` unless ``compile=False``.

    Rows share params and the key stream but have independent penalty state.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        batch_size: int = 1,
        *,
        count_weight: mx.array | np.ndarray | None = None,
        compile: bool = True,
        tokenizer=None,
    ):
        params.validate(vocab_size)
        self.params = params
        self.vocab_size = int(vocab_size)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.processors = make_logits_processors(params, vocab_size, batch_size, count_weight, tokenizer)
        self.sample_fn = make_sampler(params)
        self.seed = params.seed if params.seed is not None else _new_seed()
        self.key = mx.random.key(self.seed)
        self._compile = compile
        self._step = mx.compile(self._pure_step) if compile else self._pure_step

    # -- pure core -------------------------------------------------------

    def _pure_step(self, logits: mx.array, key: mx.array, *flat_state: mx.array):
        x = _f32(logits)
        states = self._unflatten(flat_state)
        for p, s in zip(self.processors, states):
            x = p.apply(s, x)
        keys = mx.random.split(key)
        tokens = self.sample_fn(x, keys[1])
        new_states = [p.update(s, tokens) for p, s in zip(self.processors, states)]
        return (tokens, keys[0], *self._flatten(new_states))

    def _flatten(self, states) -> list[mx.array]:
        return [a for s in states for a in s]

    def _unflatten(self, flat) -> list[tuple[mx.array, ...]]:
        out, i = [], 0
        for p in self.processors:
            n = len(p.state)
            out.append(tuple(flat[i : i + n]))
            i += n
        return out

    # -- public ----------------------------------------------------------

    @property
    def state(self) -> list[mx.array]:
        """Arrays to evaluate along with the tokens: key, then processor state."""
        return [self.key, *self._flatten(p.state for p in self.processors)]

    @property
    def penalty(self) -> RepetitionPenalty | None:
        for p in self.processors:
            if isinstance(p, RepetitionPenalty):
                return p
        return None

    @property
    def needs_tokens(self) -> bool:
        """True when a processor (a grammar) must see each sampled token before the next step."""
        return any(p.needs_tokens for p in self.processors)

    def advance(self, tokens: Sequence[int]) -> None:
        """Tell host-side processors the tokens just sampled (a list, one per row)."""
        for p in self.processors:
            p.advance(tokens)

    def _check(self, logits: mx.array) -> None:
        if logits.ndim != 2 or logits.shape[0] != self.batch_size or logits.shape[1] != self.vocab_size:
            raise InvalidArgumentError(
                f"logits must have shape [{self.batch_size}, {self.vocab_size}], got {tuple(logits.shape)}"
            )

    def step(self, logits: mx.array) -> mx.array:
        """Sample ``tokens [B] uint32`` from ``logits [B, V]`` and update the
        penalty state and key (all lazy)."""
        self._check(logits)
        tokens, self.key, *flat = self._step(logits, self.key, *self.state[1:])
        for p, s in zip(self.processors, self._unflatten(flat)):
            p.state = s
        return tokens

    __call__ = step

    def process(self, logits: mx.array) -> mx.array:
        """Processed logits (bans, penalties) without changing any state."""
        self._check(logits)
        x = _f32(logits)
        for p in self.processors:
            x = p(x)
        return x

    def observe_prompt(self, tokens) -> None:
        """Count prompt tokens in the penalty, unless
        ``params.penalty_ignore_prompt`` (the default) says not to."""
        if not self.params.penalty_ignore_prompt and self.penalty is not None:
            self.penalty.observe(tokens)

    def reset(self, *, reseed: bool = False) -> None:
        """Clear the penalty state (the chat demo does this every user turn).
        The key stream continues unless ``reseed``, which restarts it from
        ``self.seed``."""
        for p in self.processors:
            p.reset()
        if reseed:
            self.key = mx.random.key(self.seed)
