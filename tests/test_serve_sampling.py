"""The server's batched sampling equals each row's own batch-1 Sampler, draw for draw."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from rwkv_mlx import Sampler, SamplingParams
from rwkv_mlx.serve.batch_sampling import sample_rows

V = 512
WEIGHTS = np.ones(V, dtype=np.float32)
WEIGHTS[:20] = 0  # some tokens count 0 towards the frequency penalty, as spaces and digits do

PARAMS = [
    SamplingParams.greedy(seed=0),  # a seed only so that both key streams start alike
    SamplingParams(seed=1),  # reference defaults: top-p 0.85, penalties
    SamplingParams.chat(seed=2),  # bans token 0
    SamplingParams(temperature=0.7, top_p=1.0, top_k=40, seed=3, presence_penalty=0, frequency_penalty=0),
    SamplingParams(temperature=1.3, top_p=0.95, min_p=0.05, seed=4, penalty_decay=0.9),
    SamplingParams(temperature=0.0, seed=5),  # greedy with penalties
    SamplingParams(temperature=2.0, top_p=1.0, seed=6, presence_penalty=-0.3, frequency_penalty=1.0),
]


def test_rows_sampled_together_equal_each_sampler_alone():
    alone = [Sampler(p, V, count_weight=WEIGHTS) for p in PARAMS]
    together = [Sampler(p, V, count_weight=WEIGHTS) for p in PARAMS]
    rng = np.random.default_rng(0)
    for step in range(12):
        logits = mx.array(rng.normal(0, 3, (len(PARAMS), V)).astype(np.float32))
        want = mx.concatenate([s(logits[i : i + 1]) for i, s in enumerate(alone)])
        got = sample_rows(logits, together)
        mx.eval(want, got, *[a for s in alone + together for a in s.state])
        assert got.tolist() == want.tolist(), f"step {step}"
        for a, b in zip(alone, together):
            assert all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state))
    assert len(set(want.tolist())) > 1  # the rows really differ
