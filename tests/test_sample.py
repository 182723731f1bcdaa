"""Tests for rwkv_mlx.text.sample against independent numpy re-implementations of
spec rwkv7.md section 7.1 (the rwkv pip ``sample_logits`` / ``generate``)."""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx.errors import InvalidArgumentError, RwkvMlxError
from rwkv_mlx.text.sample import (
    RepetitionPenalty,
    Sampler,
    SamplingParams,
    TokenBan,
    filtered_logprobs,
    filtered_probs,
    keep_mask,
    make_logits_processors,
    make_sampler,
    token_logprob,
    whitespace_digit_weights,
)

NOPEN = dict(presence_penalty=0.0, frequency_penalty=0.0)


# --------------------------------------------------------------------------
# numpy references (written from the spec text, not from the module)
# --------------------------------------------------------------------------


def np_softmax32(x):
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max())
    return (e / e.sum()).astype(np.float32)


def np_filtered(logits_row, T, top_p, top_k, min_p):
    """Spec 7.1 steps 2-5 for one row; returns (probs float64, ambiguous)."""
    if T == 0:
        T, top_p = 1.0, 0.0
    probs = np_softmax32(logits_row)
    V = probs.size
    order = np.argsort(-probs, kind="stable")  # descending, ties -> lower id
    sp = probs[order]
    keep = np.ones(V, dtype=bool)
    ambiguous = False
    if top_p < 1.0:
        csum = np.cumsum(sp)  # float32, sequential like the reference

        def cutoff_at(tp):
            hits = np.nonzero(csum >= np.float32(tp))[0]
            return sp[hits[0]] if hits.size else sp[-1]

        cutoff = cutoff_at(top_p)
        keep &= probs >= cutoff
        # a cumulative sum within float32 noise of top_p could go either way
        # (other summation order / exp rounding): flag it if the cutoff moves
        if top_p > 0:
            ambiguous |= cutoff_at(top_p - 1e-5) != cutoff_at(top_p + 1e-5)
    if 0 < top_k < V:
        k = np.zeros(V, dtype=bool)
        k[order[:top_k]] = True
        keep &= k
        # a near tie (not an exact one) at the k-th place is ambiguous
        gap = abs(float(sp[top_k - 1]) - float(sp[top_k]))
        ambiguous |= 0 < gap < 1e-5 * float(sp[top_k - 1])
    if min_p > 0:
        thr = min_p * probs.max()
        keep &= probs >= thr
        d = np.abs(probs - thr)
        ambiguous |= bool(((d > 0) & (d < 1e-6 * thr)).any())
    q = np.where(keep, probs.astype(np.float64) ** (1.0 / T), 0.0)
    return q / q.sum(), ambiguous


class NpPenalty:
    """The reference's dict bookkeeping (utils.py ``generate``)."""

    def __init__(self, presence, frequency, decay, weight=None):
        self.p, self.f, self.d = presence, frequency, decay
        self.w = weight
        self.occ = {}

    def apply(self, logits):
        out = np.array(logits, dtype=np.float64)
        for n, c in self.occ.items():
            out[n] -= self.p + c * self.f
        return out

    def accept(self, t):
        for n in self.occ:
            self.occ[n] *= self.d
        www = 1.0 if self.w is None else float(self.w[t])
        self.occ[t] = self.occ.get(t, 0.0) + www


# --------------------------------------------------------------------------
# (a) greedy
# --------------------------------------------------------------------------


def test_greedy_picks_argmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1000)).astype(np.float32) * 3
    want = np.argmax(x, axis=-1)
    for params in (SamplingParams.greedy(), SamplingParams(temperature=0.0, **NOPEN),
                   SamplingParams(top_p=0.0, temperature=1.3, **NOPEN)):
        assert params.is_greedy
        got = make_sampler(params)(mx.array(x))
        np.testing.assert_array_equal(np.array(got), want)
        s = Sampler(params, 1000, 64)
        got = s(mx.array(x))
        assert got.shape == (64,) and got.dtype in (mx.uint32, mx.int32)
        np.testing.assert_array_equal(np.array(got), want)
    # other dtypes are cast to float32 first
    got = make_sampler(SamplingParams.greedy())(mx.array(x).astype(mx.bfloat16))
    assert got.shape == (64,)


# --------------------------------------------------------------------------
# (b) filtered distribution vs numpy steps 2-5
# --------------------------------------------------------------------------


def _logit_batches():
    rng = np.random.default_rng(1)
    normal = (rng.normal(size=(12, 200)) * 2.5).astype(np.float32)
    # few distinct values -> many exact ties, also at the top-p / top-k cutoff
    ties = (rng.integers(0, 6, size=(12, 32)) * 0.5).astype(np.float32)
    peaked = normal.copy()
    peaked[:, 7] += 12.0  # one dominant token
    flat = np.zeros((2, 16), dtype=np.float32)  # everything tied
    return [normal, ties, peaked, flat]


@pytest.mark.parametrize("batch_idx", range(4))
def test_filtered_probs_match_numpy_reference(batch_idx):
    x = _logit_batches()[batch_idx]
    temps = (0.0, 0.5, 1.0, 1.7)
    top_ps = (0.0, 0.3, 0.5, 0.85, 1.0)
    top_ks = (0, 1, 5)
    min_ps = (0.0, 0.05, 1.0)
    checked = skipped = 0
    for T, tp, tk, mp in itertools.product(temps, top_ps, top_ks, min_ps):
        params = SamplingParams(temperature=T, top_p=tp, top_k=tk, min_p=mp, **NOPEN)
        got = np.array(filtered_probs(mx.array(x), params))
        got_lp = np.array(filtered_logprobs(mx.array(x), params))
        for r in range(x.shape[0]):
            want, amb = np_filtered(x[r], T, tp, tk, mp)
            if amb:
                skipped += 1
                continue
            checked += 1
            np.testing.assert_array_equal(got[r] > 0, want > 0, err_msg=f"{params} row {r}")
            np.testing.assert_allclose(got[r], want, rtol=2e-4, atol=1e-6, err_msg=f"{params} row {r}")
            assert np.all(np.isneginf(got_lp[r][want == 0]))
    assert skipped <= 0.02 * (checked + skipped), (checked, skipped)


def test_top_p_ties_at_cutoff_are_kept():
    # probs .25 .25 .25 .125 .125 ; top_p 0.3 crosses inside the .25 block
    x = np.log(np.array([[0.25, 0.125, 0.25, 0.125, 0.25]], dtype=np.float32))
    p = np.array(filtered_probs(mx.array(x), top_p=0.3))
    np.testing.assert_allclose(p[0], [1 / 3, 0, 1 / 3, 0, 1 / 3], rtol=1e-6)
    # top_p = 0 keeps every exactly tied maximum (reference semantics)
    p = np.array(filtered_probs(mx.array(x), top_p=0.0))
    np.testing.assert_allclose(p[0], [1 / 3, 0, 1 / 3, 0, 1 / 3], rtol=1e-6)
    # top-k keeps exactly k; among tied tokens the lower ids win
    p = np.array(filtered_probs(mx.array(x), top_k=2))
    np.testing.assert_allclose(p[0], [0.5, 0, 0.5, 0, 0], rtol=1e-6)


def test_top_p_cumsum_reaching_exactly_top_p_stops_there():
    # cumsum 0.5 >= top_p 0.5 at index 0 (">=", not ">"): only the first token
    probs = mx.array([[0.25, 0.5, 0.25], [0.125, 0.125, 0.75]])
    got = np.array(keep_mask(probs, top_p=0.5))
    np.testing.assert_array_equal(got, [[False, True, False], [False, False, True]])
    got = np.array(keep_mask(probs, top_p=0.75 + 1e-3))
    np.testing.assert_array_equal(got, [[True, True, True], [True, True, True]])
    assert keep_mask(probs) is None


def test_temperature_after_filtering_and_tiny_temperature():
    x = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    # top_p 0.7: cumsum .5 .8 -> cutoff .3 -> {.5,.3}; T=0.5 squares them
    p = np.array(filtered_probs(mx.array(x), temperature=0.5, top_p=0.7))
    np.testing.assert_allclose(p[0], [0.25 / 0.34, 0.09 / 0.34, 0], rtol=1e-5)
    # T so small that probs**(1/T) underflows in float32: still a distribution
    p = np.array(filtered_probs(mx.array(x), temperature=1e-3))
    np.testing.assert_allclose(p[0], [1, 0, 0], atol=1e-6)
    tok = make_sampler(SamplingParams(temperature=1e-3, top_p=1.0, **NOPEN))(mx.array(x))
    assert int(np.array(tok)[0]) == 0


def test_top_p_one_keeps_everything():
    # the reference's float32 argmax-of-all-False quirk is not copied
    x = np.random.default_rng(3).normal(size=(4, 300)).astype(np.float32)
    p = np.array(filtered_probs(mx.array(x), top_p=1.0))
    np.testing.assert_allclose(p, np.array([np_softmax32(r) for r in x]), rtol=1e-4, atol=1e-7)
    assert (p > 0).all()


# --------------------------------------------------------------------------
# (c) empirical frequencies
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=1.0, top_p=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.5, top_p=0.85, top_k=4),
        dict(temperature=1.2, top_p=1.0, min_p=0.1),
    ],
)
def test_sampled_frequencies_match_filtered_distribution(knobs):
    N, V = 20000, 8
    row = np.array([2.0, 1.5, 1.5, 0.7, 0.2, -0.3, -1.0, -2.5], dtype=np.float32)
    want, amb = np_filtered(row, knobs["temperature"], knobs["top_p"],
                            knobs.get("top_k", 0), knobs.get("min_p", 0.0))
    assert not amb
    params = SamplingParams(seed=1234, **NOPEN, **knobs)
    s = Sampler(params, V, N)
    toks = np.array(s(mx.array(np.broadcast_to(row, (N, V)))))
    freq = np.bincount(toks, minlength=V) / N
    # zero-probability tokens are never drawn; others within 5 sigma
    assert np.all(freq[want == 0] == 0)
    bound = 5 * np.sqrt(want * (1 - want) / N) + 1e-12
    assert np.all(np.abs(freq - want) <= bound), (freq, want, bound)


def test_make_sampler_with_global_random_state():
    mx.random.seed(7)
    row = mx.array([[0.0, math.log(3.0)]])
    toks = np.array(make_sampler(SamplingParams(top_p=1.0, **NOPEN))(mx.broadcast_to(row, (20000, 2))))
    assert abs(toks.mean() - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 20000)


# --------------------------------------------------------------------------
# (d) seeds
# --------------------------------------------------------------------------


def _run(params, steps=30, B=4, V=50, compile=True):
    rng = np.random.default_rng(5)
    s = Sampler(params, V, B, compile=compile)
    out = []
    for _ in range(steps):
        t = s(mx.array(rng.normal(size=(B, V)).astype(np.float32)))
        mx.eval(t, *s.state)
        out.append(np.array(t))
    return np.stack(out), s


def test_seed_reproduces_and_different_seeds_differ():
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    a, sa = _run(p)
    b, _ = _run(p)
    np.testing.assert_array_equal(a, b)
    c, _ = _run(p.replace(seed=124))
    assert (a != c).mean() > 0.3
    # compiled and uncompiled steps are the same computation
    d, _ = _run(p, compile=False)
    np.testing.assert_array_equal(a, d)
    # no seed: a random one is drawn and recorded, and it reproduces the run
    e, se = _run(p.replace(seed=None))
    f, _ = _run(p.replace(seed=se.seed))
    np.testing.assert_array_equal(e, f)
    # the key advances every step: constant logits still give varied tokens
    s = Sampler(SamplingParams(top_p=1.0, seed=9, **NOPEN), 50, 1)
    x = mx.zeros((1, 50))
    toks = [int(np.array(s(x))[0]) for _ in range(20)]
    assert len(set(toks)) > 5
    # reset(reseed=True) restarts the key stream and the penalty state
    sa.reset(reseed=True)
    rng = np.random.default_rng(5)
    t = sa(mx.array(rng.normal(size=(4, 50)).astype(np.float32)))
    np.testing.assert_array_equal(np.array(t), a[0])


# --------------------------------------------------------------------------
# (e) penalty bookkeeping
# --------------------------------------------------------------------------


def test_penalty_bookkeeping_matches_reference_dict():
    V, B, steps = 12, 3, 25
    rng = np.random.default_rng(11)
    weight = np.ones(V, dtype=np.float32)
    weight[[2, 5]] = 0.0  # "space/digit" tokens: presence only
    pen = RepetitionPenalty(0.3, 0.45, 0.9, V, B, count_weight=weight)
    refs = [NpPenalty(0.3, 0.45, 0.9, weight) for _ in range(B)]
    # rows draw from different small token sets so they differ and repeat
    seqs = [rng.choice(s, size=steps) for s in ([2, 3, 4], [0, 5, 5, 9], [1, 2, 5, 7, 11])]
    for i in range(steps):
        x = rng.normal(size=(B, V)).astype(np.float32)
        got = np.array(pen(mx.array(x)))
        for r in range(B):
            np.testing.assert_allclose(got[r], refs[r].apply(x[r]), rtol=1e-5, atol=1e-5)
        toks = np.array([seq[i] for seq in seqs])
        pen.accept(mx.array(toks, dtype=mx.uint32))
        for r in range(B):
            refs[r].accept(int(toks[r]))
    # a weight-0 token that was generated has occ 0 but still gets presence
    assert float(np.array(pen.occ)[0, 2]) == 0.0 and float(np.array(pen.seen)[0, 2]) == 1.0
    x = np.zeros((B, V), dtype=np.float32)
    assert float(np.array(pen(mx.array(x)))[0, 2]) == pytest.approx(-0.3)


def test_penalised_greedy_loop_matches_reference():
    V, B, steps = 20, 3, 40
    rng = np.random.default_rng(12)
    x = rng.normal(size=(B, V)).astype(np.float32)  # fixed logits: penalties drive the walk
    params = SamplingParams.greedy(presence_penalty=0.2, frequency_penalty=0.35, penalty_decay=0.95)
    s = Sampler(params, V, B)
    refs = [NpPenalty(0.2, 0.35, 0.95) for _ in range(B)]
    for _ in range(steps):
        t = np.array(s(mx.array(x)))
        want = [int(np.argmax(refs[r].apply(x[r]))) for r in range(B)]
        np.testing.assert_array_equal(t, want)
        for r in range(B):
            refs[r].accept(want[r])
    assert len(set(map(tuple, [sorted(r.occ) for r in refs]))) > 1  # rows independent


def test_observe_prompt():
    V = 10
    prompt = [1, 3, 3, 7, 1]
    for ignore in (True, False):
        params = SamplingParams(presence_penalty=0.4, frequency_penalty=0.6, penalty_decay=0.8,
                                penalty_ignore_prompt=ignore)
        s = Sampler(params, V, 2)
        s.observe_prompt(prompt)
        ref = NpPenalty(0.4, 0.6, 0.8)
        if not ignore:
            for t in prompt:
                ref.accept(t)
        got = np.array(s.process(mx.zeros((2, V))))
        np.testing.assert_allclose(got[1], ref.apply(np.zeros(V)), rtol=1e-6, atol=1e-6)
    # per-row prompts
    pen = RepetitionPenalty(0.0, 1.0, 0.5, V, 2)
    pen.observe(mx.array([[4, 4], [5, 6]]))
    occ = np.array(pen.occ)
    assert occ[0, 4] == pytest.approx(1.5) and occ[1, 5] == pytest.approx(0.5) and occ[1, 6] == 1.0


def test_whitespace_digit_weights():
    toks = [b" ", b"7", b"12", b"21", b"  ", b"\xff", b"", None, b"a", b" \t0", b"\t", b"789"]
    w = whitespace_digit_weights(lambda i: toks[i], len(toks))
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])


# --------------------------------------------------------------------------
# (f) bans
# --------------------------------------------------------------------------


def test_bans():
    V, N = 10, 5000
    x = np.zeros((N, V), dtype=np.float32)
    x[:, 0] = 8.0
    x[:, 3] = 7.0
    x[:, 5] = 1.0
    params = SamplingParams(temperature=1.0, top_p=1.0, banned_tokens=(0, 3), seed=3, **NOPEN)
    toks = np.array(Sampler(params, V, N)(mx.array(x)))
    assert not np.isin(toks, [0, 3]).any()
    assert (toks == 5).mean() > 0.15
    g = Sampler(SamplingParams.greedy(banned_tokens=(0, 3)), V, 2)
    np.testing.assert_array_equal(np.array(g(mx.array(x[:2]))), [5, 5])
    processed = Sampler(params, V, 2).process(mx.array(x[:2]))
    p = np.array(filtered_probs(processed, params))
    assert (p[:, [0, 3]] == 0).all() and np.allclose(p.sum(-1), 1)
    # chat preset bans end-of-text (token 0)
    chat = SamplingParams.chat()
    assert chat.banned_tokens == (0,) and chat.top_p == 0.3 and chat.presence_penalty == 0.5
    procs = make_logits_processors(chat, V)
    assert any(isinstance(p, TokenBan) for p in procs)
    with pytest.raises(InvalidArgumentError, match="banned_tokens"):
        make_logits_processors(SamplingParams(banned_tokens=(10,)), V)


def test_logit_bias_is_added_before_bans_and_penalties():
    """OpenAI's logit_bias: logits + bias (numpy states it), applied before bans (a banned token stays
    banned) and before the penalty; +100 makes greedy pick the token, -100 keeps it out."""
    V = 12
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, V)).astype(np.float32)
    bias = {4: 2.5, 7: -100, 9: 50.0}
    params = SamplingParams(temperature=1.0, top_p=1.0, logit_bias=bias, banned_tokens=(9,), **NOPEN)
    assert params.logit_bias == ((4, 2.5), (7, -100), (9, 50.0))  # the mapping, kept as hashable pairs
    want = x.copy()
    for t, b in bias.items():
        want[:, t] += b
    want[:, 9] = -np.inf
    np.testing.assert_array_equal(np.array(Sampler(params, V, 2).process(mx.array(x))), want)
    pen = SamplingParams(logit_bias={4: 2.5}, presence_penalty=0.5, frequency_penalty=0.0, penalty_decay=1.0)
    assert [type(p).__name__ for p in make_logits_processors(pen, V)] == ["LogitBias", "RepetitionPenalty"]
    top = int(np.argmin(x[0]))  # the least likely token, pushed to the top
    g = Sampler(SamplingParams.greedy(logit_bias={top: 100}), V, 1)
    assert int(np.array(g(mx.array(x[:1])))[0]) == top
    first = int(np.argmax(x[0]))
    g = Sampler(SamplingParams.greedy(logit_bias={first: -100}), V, 1)
    assert int(np.array(g(mx.array(x[:1])))[0]) != first


# --------------------------------------------------------------------------
# (g) validation
# --------------------------------------------------------------------------

BAD = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"), ("top_p", -0.01), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("min_p", -0.1), ("min_p", 1.5),
    ("min_p", float("nan")), ("presence_penalty", float("nan")),
    ("frequency_penalty", float("inf")), ("penalty_decay", -0.1), ("penalty_decay", 1.1),
    ("penalty_decay", float("nan")), ("penalty_ignore_prompt", "yes"),
    ("banned_tokens", (-1,)), ("banned_tokens", (1.5,)), ("banned_tokens", 3),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {"3": 1.0}), ("logit_bias", {3: 100.5}),
    ("logit_bias", {3: float("nan")}), ("logit_bias", {3: True}), ("logit_bias", 3), ("logit_bias", (3,)),
]


@pytest.mark.parametrize("field,value", BAD)
def test_validate_rejects(field, value):
    with pytest.raises(InvalidArgumentError) as ei:
        SamplingParams(**{field: value}).validate()
    msg = str(ei.value)
    assert field in msg and "\n" not in msg
    assert isinstance(ei.value, RwkvMlxError)
    with pytest.raises(InvalidArgumentError):
        Sampler(SamplingParams(**{field: value}), 16)


def test_validate_accepts_edges():
    for p in (SamplingParams(), SamplingParams.chat(), SamplingParams.greedy(),
              SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, penalty_decay=0.0,
                             seed=0, presence_penalty=-1.0),
              SamplingParams(penalty_decay=1.0, seed=2**64 - 1, banned_tokens=(0, 15))):
        assert p.validate(16) is p
    with pytest.raises(InvalidArgumentError, match=r"banned_tokens.*\[0, 15\]"):
        SamplingParams(banned_tokens=(16,)).validate(16)
    assert SamplingParams(logit_bias={0: -100, 15: 100}).validate(16)
    with pytest.raises(InvalidArgumentError, match=r"logit_bias.*\[0, 15\]"):
        SamplingParams(logit_bias={16: 1.0}).validate(16)
    assert SamplingParams().top_p == 0.85 and SamplingParams().penalty_decay == 0.996


# --------------------------------------------------------------------------
# misc
# --------------------------------------------------------------------------


def test_token_logprob_and_shapes():
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(5, 300)) * 4).astype(np.float16)
    t = rng.integers(0, 300, size=5)
    got = np.array(token_logprob(mx.array(x), mx.array(t, dtype=mx.uint32)))
    xf = x.astype(np.float64)
    lse = np.log(np.exp(xf - xf.max(-1, keepdims=True)).sum(-1)) + xf.max(-1)
    np.testing.assert_allclose(got, xf[np.arange(5), t] - lse, rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32
    s = Sampler(SamplingParams(), 300, 5)
    with pytest.raises(InvalidArgumentError, match="shape"):
        s(mx.zeros((4, 300)))


def test_full_vocab_step_lazy_graph():
    V = 65536
    s = Sampler(SamplingParams.chat(seed=0), V, 2)
    x = mx.random.normal((2, V), key=mx.random.key(1))
    for _ in range(3):
        t = s(x)
        mx.eval(t, *s.state)
        tt = np.array(t)
        assert tt.shape == (2,) and (tt > 0).all() and (tt < V).all()
    assert float(np.array(s.penalty.seen).sum()) >= 2
