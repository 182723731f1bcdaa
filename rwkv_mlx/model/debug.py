"""Where do NaN or inf values first appear?  (``rwkv-mlx generate --check-finite``)

Non-finite logits say nothing about their origin: once one module produces a NaN,
every later module, and every later token through the state, inherits it.
``find_first_nonfinite`` runs the model's own forward pass with probes around the
embedding, each block's time-mix and channel-mix, and the head, and names the
earliest output that holds a NaN or inf: the earliest token first (a later token's
NaN in an early layer can come from an earlier token through that layer's state),
then forward order within that token.  The head is computed for the last token of
each chunk only, as in a prefill (nothing reads its other outputs), so a replay
costs about what reading the tokens did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .state import State

CHUNK = 256  # tokens per probed forward pass: bounds the memory of the kept outputs


class _Probe(nn.Module):
    """Stands in for one child module during a probed pass and reports its first output."""

    def __init__(self, inner: nn.Module, report: Callable[[mx.array], None]):
        super().__init__()
        self.inner = inner
        self.report = report

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.report(out[0] if isinstance(out, tuple) else out)
        return out


def _probe_points(model) -> list[tuple[nn.Module, str, str]]:
    """(parent module, child attribute, label) in forward order."""
    points = [(model, "ln0", "embedding")]
    for i, block in enumerate(model.blocks):
        points += [(block, "att", f"layer {i} time-mix"), (block, "ffn", f"layer {i} channel-mix")]
    return points + [(model, "head", "head")]


def find_first_nonfinite(model, tokens: Sequence[int] | mx.array, state: State | None = None,
                         chunk_size: int = CHUNK) -> str | None:
    """Label of the first module output holding NaN or inf, e.g. ``"layer 3 time-mix at token 17"``; None if all finite.

    ``tokens`` are ids (a list, or an int array [T] or [1, T]) fed from ``state``
    (default: the zero state).  The model is left as it was.
    """
    tokens = mx.array(tokens).reshape(-1)
    points = _probe_points(model)
    seen: list[mx.array] = []

    def report(out: mx.array) -> None:
        bad = mx.logical_not(mx.isfinite(out))
        seen.append(bad.reshape(bad.shape[0], bad.shape[1], -1).any(axis=(0, 2)))  # [T or 1]: any non-finite per token

    originals = [getattr(parent, name) for parent, name, _ in points]
    try:
        for parent, name, _ in points:
            setattr(parent, name, _Probe(getattr(parent, name), report))
        for start in range(0, tokens.size, chunk_size):
            seen.clear()
            piece = tokens[start : start + chunk_size]
            _, state = model(piece[None], state, logits="last")
            head = mx.concatenate([mx.zeros(piece.size - 1, dtype=mx.bool_), seen[-1]])  # at the chunk's last token
            bad = np.array(mx.stack([*seen[:-1], head]))  # [probe point, token]
            if bad.any():
                t = int(bad.any(axis=0).argmax())
                return f"{points[int(bad[:, t].argmax())][2]} at token {start + t}"
    finally:
        for (parent, name, _), original in zip(points, originals):
            setattr(parent, name, original)
    return None
