"""The logits-processor protocol every sampler stage follows (samplers, penalties, bans, grammars).

Its own module so that a processor defined elsewhere (text/grammar) and the
samplers that compose processors (text/sample.py) both build on it without
importing each other.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


class LogitsProcessor:
    """A ``(logits [B, V]) -> logits`` transform with optional device state.

    The state is a tuple of arrays (``state``); ``apply(state, logits)`` and
    ``update(state, tokens) -> state`` are pure so a whole decode step can be
    compiled.  ``__call__`` / ``accept`` are the stateful conveniences.
    A processor with ``needs_tokens`` (a grammar constraint) computes its state
    on the host and must be told each sampled token through ``advance``
    before the next step is sampled.
    """

    state: tuple[mx.array, ...] = ()
    needs_tokens = False

    def advance(self, tokens: Sequence[int]) -> None:
        """Host-side processors learn the tokens just sampled (one per row)."""

    def apply(self, state: tuple[mx.array, ...], logits: mx.array) -> mx.array:
        raise NotImplementedError

    def update(self, state: tuple[mx.array, ...], tokens: mx.array) -> tuple[mx.array, ...]:
        return state

    def __call__(self, logits: mx.array) -> mx.array:
        return self.apply(self.state, _f32(logits))

    def accept(self, tokens: mx.array) -> None:
        self.state = self.update(self.state, tokens)

    def reset(self) -> None:
        pass
