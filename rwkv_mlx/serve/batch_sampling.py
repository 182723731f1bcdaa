"""One decode step's sampling for every row of the batch at once, each row with its own parameters.

Each row keeps its :class:`rwkv_mlx.text.sample.Sampler` (batch 1): its parameters,
seed, key stream and penalty state, exactly as ``rwkv_mlx.generate`` would
have them for that request alone. Calling those samplers one by one costs a
sort of the vocabulary and a dozen launches per row per step, which is most of
a step at 64 rows. Here the expensive part -- bans, penalties, softmax, sort,
top-p/top-k/min-p, temperature -- runs once over all rows with the parameters
as per-row vectors; only the draw (``mx.random.categorical`` with the row's
key, the one step whose randomness must stay the row's own) and the key split
are per row. Every operation is row-wise, so each row gets the numbers its own
Sampler would compute (the tests compare with ``rwkv_mlx.generate``), and the
sampler objects are updated as if they had run: key advanced, penalty counts
moved on.

The formulas are those of ``rwkv_mlx.text.sample`` (spec 7.1), written for [n, V]
with per-row parameters; ``keep_mask`` there is the one-parameter-set form.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..text.sample import Sampler
from ..text.sample import LogitBias, RepetitionPenalty, TokenBan
from ..text.sample import _effective as effective_temperature_top_p  # the reference's T = 0 rule, in one place

_NEG_INF = float("-inf")


def _column(values, dtype=mx.float32) -> mx.array:
    return mx.array(np.asarray(values, dtype=np.float32 if dtype == mx.float32 else np.int32))[:, None]


def _effective(params) -> tuple[float, float]:
    """(temperature, top_p) as the sampler uses them (temperature 0 means greedy: top_p 0)."""
    return effective_temperature_top_p(params.temperature, params.top_p)


def _each(samplers: list[Sampler], match) -> list:
    """Each row's first processor that ``match`` accepts, or None."""
    return [next((p for p in s.processors if match(p)), None) for s in samplers]


def _processed(logits: mx.array, samplers: list[Sampler]) -> mx.array:
    """Logit biases, bans, the decayed presence/frequency penalty, then output constraints (rows without them
    pass unchanged), in make_logits_processors' order so that each row rounds as its own Sampler does."""
    x = logits.astype(mx.float32)
    biases = _each(samplers, lambda p: isinstance(p, LogitBias))
    if any(biases):
        zero = mx.zeros((x.shape[-1],), dtype=mx.float32)
        x = x + mx.stack([b.bias if b is not None else zero for b in biases])
    bans = _each(samplers, lambda p: isinstance(p, TokenBan))
    if any(bans):
        V = x.shape[-1]
        mask = mx.stack([b.mask if b is not None else mx.zeros((V,), dtype=mx.bool_) for b in bans])
        x = mx.where(mask, _NEG_INF, x)
    penalties = [s.penalty for s in samplers]
    if any(p is not None for p in penalties):
        zero = mx.zeros((1, x.shape[-1]), dtype=mx.float32)
        occ = mx.concatenate([p.state[0] if p is not None else zero for p in penalties])
        seen = mx.concatenate([p.state[1] if p is not None else zero for p in penalties])
        presence = _column([p.presence if p is not None else 0.0 for p in penalties])
        frequency = _column([p.frequency if p is not None else 0.0 for p in penalties])
        x = x - (presence * seen + frequency * occ)
    # output constraints last, as in Sampler (make_logits_processors appends them): each row's grammar
    # mask (all allowed for free rows), applied to the whole batch at once by the constraint's own rule
    constraints = _each(samplers, lambda p: p.needs_tokens)
    rule = next((p for p in constraints if p is not None), None)
    if rule is not None:
        V = x.shape[-1]
        allowed = mx.concatenate([p.state[0] if p else mx.ones((1, V), dtype=mx.bool_) for p in constraints])
        only = mx.concatenate([p.state[1] if p else mx.zeros((1, 1), dtype=mx.bool_) for p in constraints])
        x = rule.apply((allowed, only), x)
    return x


def _filtered(x: mx.array, params: list) -> mx.array:
    """Unnormalised log of each row's filtered, tempered distribution (-inf = removed)."""
    V = x.shape[-1]
    temps, top_ps = zip(*(_effective(p) for p in params))
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    min_p = [p.min_p for p in params]
    probs = mx.softmax(x, axis=-1)
    keep = None
    if any(tp < 1.0 for tp in top_ps) or any(top_k):
        sorted_desc = -mx.sort(-probs, axis=-1)
    if any(tp < 1.0 for tp in top_ps):
        tp = _column(top_ps)
        csum = mx.cumsum(sorted_desc, axis=-1)
        pos = mx.arange(V, dtype=mx.int32)
        first = mx.min(mx.where(csum >= tp, pos, V - 1), axis=-1, keepdims=True)
        cutoff = mx.take_along_axis(sorted_desc, first, axis=-1)
        keep = mx.logical_or(probs >= cutoff, tp >= 1.0)
    if any(top_k):
        k = _column(top_k, mx.int32)
        kth = mx.take_along_axis(sorted_desc, mx.maximum(k - 1, 0), axis=-1)
        above = probs > kth
        n_above = above.astype(mx.int32).sum(axis=-1, keepdims=True)
        tied = probs == kth
        tie_rank = mx.cumsum(tied.astype(mx.int32), axis=-1)
        k_keep = mx.logical_or(above, mx.logical_and(tied, tie_rank <= k - n_above))
        k_keep = mx.logical_or(k_keep, k == 0)
        keep = k_keep if keep is None else mx.logical_and(keep, k_keep)
    if any(m > 0 for m in min_p):
        m = _column(min_p)
        m_keep = mx.logical_or(probs >= mx.max(probs, axis=-1, keepdims=True) * m, m == 0)
        keep = m_keep if keep is None else mx.logical_and(keep, m_keep)
    s = x - mx.max(x, axis=-1, keepdims=True)
    if any(t != 1.0 for t in temps):
        s = s * _column([1.0 / t for t in temps])
    if keep is not None:
        s = mx.where(keep, s, _NEG_INF)
    return s


def sample_rows(logits: mx.array, samplers: list[Sampler]) -> mx.array:
    """Tokens [n] uint32 for ``logits`` [n, V], row i drawn by ``samplers[i]`` (batch-1 samplers; lazy).

    Advances every sampler's key and penalty state as ``samplers[i](logits[i:i+1])`` would.
    """
    x = _processed(logits, samplers)
    greedy = [i for i, s in enumerate(samplers) if _effective(s.params)[1] == 0]
    drawn = [i for i, s in enumerate(samplers) if _effective(s.params)[1] != 0]
    picks: dict[int, mx.array] = {}
    if greedy:
        index = mx.array(greedy, dtype=mx.int32)
        tokens = mx.argmax(x[index], axis=-1).astype(mx.uint32)
        picks.update({i: tokens[k : k + 1] for k, i in enumerate(greedy)})
    if drawn:
        index = mx.array(drawn, dtype=mx.int32)
        s = _filtered(x[index], [samplers[i].params for i in drawn])
        for k, i in enumerate(drawn):
            keys = mx.random.split(samplers[i].key)
            samplers[i].key = keys[0]
            picks[i] = mx.random.categorical(s[k : k + 1], axis=-1, key=keys[1]).astype(mx.uint32)
    for i in greedy:  # the key stream moves on even for greedy rows, as in Sampler
        samplers[i].key = mx.random.split(samplers[i].key)[0]
    tokens = mx.concatenate([picks[i] for i in range(len(samplers))])
    _update_penalties(tokens, samplers)
    return tokens


def _update_penalties(tokens: mx.array, samplers: list[Sampler]) -> None:
    rows = [(i, s.penalty) for i, s in enumerate(samplers) if s.penalty is not None]
    if not rows:
        return
    index = mx.array([i for i, _ in rows], dtype=mx.int32)
    penalties: list[RepetitionPenalty] = [p for _, p in rows]
    occ = mx.concatenate([p.state[0] for p in penalties])
    seen = mx.concatenate([p.state[1] for p in penalties])
    t = tokens[index]
    V = occ.shape[-1]
    onehot = mx.arange(V, dtype=mx.uint32)[None, :] == t.reshape(-1, 1)
    weights = mx.stack([p.count_weight for p in penalties])
    w = mx.take_along_axis(weights, t.astype(mx.int32).reshape(-1, 1), axis=-1)
    occ = occ * _column([p.decay for p in penalties]) + mx.where(onehot, w, 0.0)
    seen = mx.where(onehot, 1.0, seen)
    for k, p in enumerate(penalties):
        p.state = (occ[k : k + 1], seen[k : k + 1])
