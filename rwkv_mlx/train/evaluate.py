"""How well a model predicts a text: perplexity, and divergence from a reference model.

The text is read the way an RNN reads it: split into ``streams`` contiguous
rows (a batch), each row fed in pieces of ``seq_len`` tokens with the state
carried from piece to piece, so every token is predicted from all the text
before it in its row.  With ``streams=1`` this is the exact perplexity of the
whole text; more streams trade the first few tokens' context of each row
(at most ``streams - 1`` positions are also left out at the end) for speed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InvalidArgumentError
from ..model.state import State


@dataclass
class Perplexity:
    tokens: int
    nll: float  # mean negative log-likelihood, nats per token

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def stream_pieces(tokens: np.ndarray, streams: int, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) pieces, int32 [streams, <= seq_len], covering the text row by row."""
    tokens = np.asarray(tokens, dtype=np.int32)
    n = len(tokens) - 1  # positions that have a next token
    if n < 1:
        raise InvalidArgumentError(f"the text has {len(tokens)} token(s): at least 2 are needed to score a prediction")
    streams = max(1, min(int(streams), n))
    m = n // streams
    rows = np.arange(streams)[:, None] * m
    inputs = tokens[rows + np.arange(m)[None, :]]
    targets = tokens[rows + 1 + np.arange(m)[None, :]]
    for start in range(0, m, seq_len):
        yield inputs[:, start:start + seq_len], targets[:, start:start + seq_len]


def count_pieces(tokens, streams: int, seq_len: int) -> int:
    n = len(tokens) - 1
    m = n // max(1, min(int(streams), n))
    return -(-m // seq_len)


def log_probs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def token_nll(logp: mx.array, targets: mx.array) -> mx.array:
    return -mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _broadcast(state: State | None, streams: int) -> State | None:
    if state is None or state.batch_size == streams:
        return state
    return state.map(lambda a: mx.broadcast_to(a, (streams, *a.shape[1:])))


@contextlib.contextmanager
def chunked_wkv(model, enabled: bool = True):
    """Run ``model`` on the chunked WKV path (the one training uses) inside the block.

    The chunked form is one of the model's training-mode paths; RWKV-7 has no
    dropout, so training mode changes nothing but which WKV code runs.  On a
    GPU without a fused kernel it is far faster than the token loop.
    """
    was = model.training
    model.train(enabled or was)
    try:
        yield model
    finally:
        model.train(was)


def iter_log_probs(model, tokens, seq_len: int = 512, streams: int = 1, initial_state: State | None = None,
                   ) -> Iterator[tuple[mx.array, mx.array]]:
    """(log-probabilities [streams, T, V] float32, targets [streams, T]) for each piece, state carried."""
    state = None
    for x, y in stream_pieces(tokens, streams, seq_len):
        if state is None:
            state = _broadcast(initial_state, x.shape[0])
        logits, state = model(mx.array(x), state)
        mx.eval(state.arrays())
        yield log_probs(logits), mx.array(y)


def perplexity(model, tokens, seq_len: int = 512, streams: int = 1, initial_state: State | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Mean negative log-likelihood of every predictable token of ``tokens``."""
    total, count = 0.0, 0
    n_pieces = count_pieces(tokens, streams, seq_len)
    for i, (logp, y) in enumerate(iter_log_probs(model, tokens, seq_len, streams, initial_state)):
        total += token_nll(logp, y).sum().item()
        count += y.size
        if progress:
            progress(i + 1, n_pieces)
    return Perplexity(count, total / count)


@dataclass
class Divergence:
    """A model against a reference on the same tokens."""

    tokens: int
    nll: float  # the model's, nats per token
    ref_nll: float
    kl: float  # mean KL(reference || model), nats per token
    top1: float  # fraction of positions where both put the same token first

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def ref_ppl(self) -> float:
        return math.exp(self.ref_nll)


def compare(reference, models: Sequence, tokens, seq_len: int = 512, streams: int = 1,
            progress: Callable[[int, int], None] | None = None) -> list[Divergence]:
    """Perplexity of each model and its mean KL divergence from ``reference``, in one pass over the text."""
    ref_pieces = iter_log_probs(reference, tokens, seq_len, streams)
    others = [iter_log_probs(m, tokens, seq_len, streams) for m in models]
    sums = np.zeros((len(models), 4))  # nll, ref nll, kl, top1
    count = 0
    n_pieces = count_pieces(tokens, streams, seq_len)
    for i, (ref_logp, y) in enumerate(ref_pieces):
        ref_nll = token_nll(ref_logp, y).sum()
        ref_p = mx.exp(ref_logp)
        ref_top = mx.argmax(ref_logp, axis=-1)
        for j, pieces in enumerate(others):
            logp, _ = next(pieces)
            kl = (ref_p * (ref_logp - logp)).sum(axis=-1)
            row = mx.stack([token_nll(logp, y).sum(), ref_nll, kl.sum(),
                            (mx.argmax(logp, axis=-1) == ref_top).sum().astype(mx.float32)])
            sums[j] += np.array(row)
        count += y.size
        if progress:
            progress(i + 1, n_pieces)
    return [Divergence(count, s[0] / count, s[1] / count, s[2] / count, s[3] / count) for s in sums]
