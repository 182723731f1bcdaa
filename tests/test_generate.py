"""Generation from cached states, the state after generation, streamed statistics, and batches.

Judges: the float64 reference (greedy choices), direct model calls written out here
(the state after prompt + generated tokens), and one-at-a-time generation for batches.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import TEXT, reference, split_at_turn, tiny_model, to_np

import rwkv_mlx
from rwkv_mlx import SamplingParams, State
from rwkv_mlx import DEMO_MODEL
from rwkv_mlx.errors import InvalidArgumentError

GREEDY = SamplingParams.greedy()


def test_greedy_generation_follows_float64_reference():
    model, tokenizer = tiny_model()
    ids = tokenizer.encode(TEXT)
    tokens = [r.token for r in rwkv_mlx.stream_generate(model, tokenizer, ids, max_tokens=12, sampling=GREEDY,
                                                       stop_at_end_of_text=False)]
    ref = reference()
    logits, state = ref.run(ids)
    logits = logits[-1]
    for i, token in enumerate(tokens):
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 1e-3:
            assert token == int(logits.argmax()), f"step {i}"
        logits, state = ref.step(token, state)


def test_generate_from_cached_prompt_equals_whole_prompt():
    model, tokenizer = tiny_model()
    prefix, rest = split_at_turn(tokenizer, TEXT)
    whole = rwkv_mlx.generate(model, tokenizer, prefix + rest, max_tokens=16, sampling=GREEDY)
    cached = rwkv_mlx.cache_prompt(model, tokenizer, prefix)
    assert rwkv_mlx.generate(model, tokenizer, rest, state=cached, max_tokens=16, sampling=GREEDY) == whole
    # the cached state is a value: using it twice gives the same answer
    assert rwkv_mlx.generate(model, tokenizer, rest, state=cached, max_tokens=16, sampling=GREEDY) == whole
    seeded = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert (rwkv_mlx.generate(model, tokenizer, rest, state=cached, **seeded)
            == rwkv_mlx.generate(model, tokenizer, prefix + rest, **seeded))


def test_block_by_block_evaluation_changes_nothing():
    """GPU prefill evaluates block by block (to bound queued memory): same logits and state, bit for bit."""
    model, tokenizer = tiny_model()
    ids = mx.array([tokenizer.encode(TEXT)[:40]])
    whole, s1 = model(ids)
    stepped, s2 = model(ids, eval_each_block=True)
    assert np.array_equal(to_np(whole), to_np(stepped))
    assert all(np.array_equal(to_np(a), to_np(b)) for a, b in zip(s1.arrays(), s2.arrays()))


def test_embedding_rewritten_for_the_device_is_the_same_table(monkeypatch):
    """On CUDA the loader has a kernel rewrite the embedding (so the GPU owns its pages): same bits."""
    import rwkv_mlx.model.rwkv7 as model_module

    model, _ = rwkv_mlx.load(DEMO_MODEL)
    before = {k: (np.array(v), v.dtype, id(v)) for k, v in model.emb.parameters().items()}
    monkeypatch.setattr(model_module, "active_backend", lambda: "cuda")
    model.keep_tables_on_device()
    after = model.emb.parameters()
    assert before.keys() == after.keys() and len(before) == 3  # affine: codes, scales, offsets
    for k, (values, dtype, ident) in before.items():
        assert id(after[k]) != ident, f"{k} was not rewritten"
        assert after[k].dtype == dtype and np.array_equal(values, np.array(after[k]))


def _state_by_hand(model, ids: list[int]) -> State:
    state = None
    for t in ids:  # one token at a time: a different path from prefill's single call
        _, state = model(mx.array([[t]]), state, logits="none")
    return state


@pytest.fixture(params=[1, 3], ids=["ahead1", "ahead3"])
def ahead(request, monkeypatch):
    """The decode loop with one step queued ahead of the token it reads (the default) and with three
    ($RWKV_MLX_DECODE_AHEAD): the same tokens, log-probabilities, stops and final states."""
    from rwkv_mlx.text import generate

    monkeypatch.setattr(generate, "DECODE_AHEAD", request.param)
    return request.param


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_returned_state_includes_every_generated_token(finish, ahead):
    model, tokenizer = tiny_model()
    ids = tokenizer.encode("User: tell me a story\n\nAssistant:")
    first = list(rwkv_mlx.stream_generate(model, tokenizer, ids, max_tokens=10, sampling=GREEDY))
    if finish == "stop":  # stop inside the run: the pipelined next step already read the last token
        stop = [tokenizer.decode([first[4].token])]
        assert stop[0], "need a token with text to stop on"
    else:
        stop = []
    responses = list(rwkv_mlx.stream_generate(model, tokenizer, ids, max_tokens=10, sampling=GREEDY, stop=stop,
                                              return_state=True))
    last = responses[-1]
    assert last.finish_reason == finish
    assert len(responses) == 10 if finish == "length" else len(responses) <= 5
    assert [r.token for r in responses] == [r.token for r in first[: len(responses)]]
    assert all(r.state is None for r in responses[:-1])
    generated = [r.token for r in responses]
    want = _state_by_hand(model, ids + generated)
    for a, b in zip(last.state.arrays(), want.arrays()):
        assert np.abs(to_np(a) - to_np(b)).max() < 1e-4
    assert last.state.model_id.fingerprint == model.fingerprint


def test_stream_pieces_carry_tokens_logprobs_and_seed(ahead):
    model, tokenizer = tiny_model()
    ids = tokenizer.encode("ROMEO:")
    pieces = list(rwkv_mlx.stream_generate(model, tokenizer, ids, max_tokens=6, sampling=SamplingParams(seed=123),
                                           stop_at_end_of_text=False))
    assert [p.generation_tokens for p in pieces] == list(range(1, 7))
    assert all(p.seed == 123 and p.prompt_tokens == len(ids) for p in pieces)
    assert "".join(p.text for p in pieces) == tokenizer.decode([p.token for p in pieces])
    # log-probabilities under the raw softmax, recomputed from float64 logits
    logits, state = reference().run(ids)
    for p in pieces:
        x = logits[-1]
        logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
        assert abs(p.logprob - logp[p.token]) < 1e-3
        logits, state = reference().step(p.token, state)
        logits = logits[None]
    # a random seed is reported, and reproduces the run
    random = list(rwkv_mlx.stream_generate(model, tokenizer, ids, max_tokens=6, sampling=SamplingParams()))
    again = rwkv_mlx.generate(model, tokenizer, ids, max_tokens=6, sampling=SamplingParams(seed=random[0].seed))
    assert again == "".join(p.text for p in random)


# --------------------------------------------------------------------------------------
# batches


PROMPTS = ["a", "User: what is the weather like today?\n\nAssistant:", "ROMEO: But soft"]


def test_one_batched_step_equals_separate_steps():
    model, tokenizer = tiny_model()
    states = [rwkv_mlx.cache_prompt(model, tokenizer, p) for p in PROMPTS]
    tokens = [17, 300, 4000]
    logits, after = model(mx.array([[t] for t in tokens]), State.stack(states))
    assert logits.shape == (3, 1, model.args.vocab_size)
    for i, (t, s) in enumerate(zip(tokens, states)):
        one, one_after = model(mx.array([[t]]), s)
        assert np.abs(to_np(logits[i]) - to_np(one[0])).max() < 1e-5
        for a, b in zip(after[i].arrays(), one_after.arrays()):
            assert np.abs(to_np(a) - to_np(b)).max() < 1e-5


def test_prompts_of_one_length_read_as_one_batch_equal_each_alone():
    """prefill with a batch of equal-length prompts (the server's burst of requests): each row's last
    logits and state equal that prompt read alone, from a zero state or from its own earlier state, and
    across chunk boundaries. The first row's logits also follow the float64 reference."""
    model, tokenizer = tiny_model()
    ids = tokenizer.encode(TEXT)
    rows = [ids[i:i + 11] for i in (0, 5, 9)]
    starts = [None, rwkv_mlx.cache_prompt(model, tokenizer, "ROMEO:"), None]
    batch_state = State.stack([s if s is not None else model.initial_state(1) for s in starts])
    logits, state = rwkv_mlx.prefill(model, rows, batch_state, chunk_size=4)
    assert logits.shape == (3, model.args.vocab_size) and state.batch_size == 3
    for i, (r, s) in enumerate(zip(rows, starts)):
        one, one_state = rwkv_mlx.prefill(model, r, s, chunk_size=4)
        assert np.abs(to_np(logits[i]) - to_np(one[0])).max() < 1e-5
        for a, b in zip(state[i].arrays(), one_state.arrays()):
            assert np.abs(to_np(a) - to_np(b)).max() < 1e-5
    want, _ = reference().run(rows[0])
    assert np.abs(to_np(logits[0]) - want[-1]).max() < 1e-4


def test_prompts_read_together_must_match_in_length_and_state_rows():
    model, tokenizer = tiny_model()
    with pytest.raises(InvalidArgumentError, match="same number of tokens"):
        rwkv_mlx.prefill(model, [[1, 2, 3], [4, 5]])
    with pytest.raises(InvalidArgumentError, match="2 prompts but a state of 3 rows"):
        rwkv_mlx.prefill(model, [[1, 2], [4, 5]], model.initial_state(3))
    with pytest.raises(InvalidArgumentError, match="empty"):
        rwkv_mlx.prefill(model, [[], []])


def test_batch_equals_one_at_a_time(ahead):
    """Different prompt lengths, sampling, limits and stop strings per row: token for token."""
    model, tokenizer = tiny_model()
    samplings = [GREEDY, SamplingParams(temperature=1.0, top_p=0.9, seed=5), GREEDY.replace(presence_penalty=0.5)]
    limits = [9, 14, 5]
    free_run = rwkv_mlx.generate(model, tokenizer, PROMPTS[1], sampling=samplings[1], max_tokens=14)
    stops = [[], [free_run[3:6]], ["no such text"]]  # row 1 stops early, inside its own text

    def alone(i):
        return list(rwkv_mlx.stream_generate(model, tokenizer, PROMPTS[i], sampling=samplings[i],
                                             max_tokens=limits[i], stop=stops[i]))

    expected = [alone(i) for i in range(3)]
    assert len(expected[1]) < 14 and expected[1][-1].finish_reason == "stop"
    responses = list(rwkv_mlx.stream_batch_generate(model, tokenizer, PROMPTS, samplings=samplings,
                                                    max_tokens=limits, stop=stops))
    for i in range(3):
        rows = [r for r in responses if r.row == i]
        assert [r.token for r in rows] == [r.token for r in expected[i]]
        assert [r.text for r in rows] == [r.text for r in expected[i]]
        assert rows[-1].finish_reason == expected[i][-1].finish_reason
        assert all(r.finish_reason is None for r in rows[:-1])
        assert np.allclose([r.logprob for r in rows], [r.logprob for r in expected[i]], atol=1e-4)
    assert rwkv_mlx.batch_generate(model, tokenizer, PROMPTS, samplings=samplings, max_tokens=limits,
                                   stop=stops) == ["".join(r.text for r in e) for e in expected]


def test_prompt_groups_take_one_length_within_a_chunk_in_powers_of_two():
    from rwkv_mlx.text.generate import prompt_groups

    lengths = [3, 3, 5, 3, 3, 3, 3, 3, 3, 40, 3]
    assert prompt_groups(lengths, 16) == [[0, 1, 3, 4], [5, 6, 7, 8], [10], [2], [9]]  # 5 of 3 fit: cut to 4
    assert prompt_groups(lengths, 64) == [[0, 1, 3, 4, 5, 6, 7, 8], [10], [2], [9]]
    assert prompt_groups([600, 600], 512) == [[0], [1]]  # longer than a chunk: alone, as before
    assert sorted(i for g in prompt_groups(lengths, 7) for i in g) == list(range(len(lengths)))


def test_batch_reads_prompts_of_one_length_together(monkeypatch):
    """Equal-length prompts share prefill calls, and every row still equals its prompt generated alone
    (from the start and from a cached state), the rows back in the prompts' order."""
    from rwkv_mlx.text import generate as gen

    model, tokenizer = tiny_model()
    ids = tokenizer.encode(TEXT)
    prompts = [ids[0:6], ids[20:26], ids[3:12], ids[40:46], ids[7:13]]  # four of 6 tokens, one of 9
    cached = rwkv_mlx.cache_prompt(model, tokenizer, "ROMEO:")
    states = [None, cached, None, None, cached]
    alone = [rwkv_mlx.generate(model, tokenizer, p, sampling=GREEDY, max_tokens=6, state=st)
             for p, st in zip(prompts, states)]
    calls = []
    real = gen.prefill

    def counting(model, tokens, state=None, **kw):
        calls.append(len(tokens) if tokens and not isinstance(tokens[0], int) else 1)
        return real(model, tokens, state, **kw)

    monkeypatch.setattr(gen, "prefill", counting)
    batched = rwkv_mlx.batch_generate(model, tokenizer, prompts, states=states, samplings=GREEDY, max_tokens=6)
    assert batched == alone
    assert sorted(calls) == [1, 4]  # the four 6-token prompts in one call, the 9-token one alone


def test_batch_returns_each_rows_state(ahead):
    model, tokenizer = tiny_model()
    limits = [3, 7, 7]  # row 0 ends while the batch goes on, rows 1 and 2 at the last step
    responses = list(rwkv_mlx.stream_batch_generate(model, tokenizer, PROMPTS, samplings=GREEDY, max_tokens=limits,
                                                    return_state=True))
    for i, prompt in enumerate(PROMPTS):
        rows = [r for r in responses if r.row == i]
        assert len(rows) == limits[i] and rows[-1].state.batch_size == 1
        want = _state_by_hand(model, tokenizer.encode(prompt) + [r.token for r in rows])
        for a, b in zip(rows[-1].state.arrays(), want.arrays()):
            assert np.abs(to_np(a) - to_np(b)).max() < 1e-4


def test_batch_shares_a_sampler_for_equal_params_and_knobs_apply_to_all():
    model, tokenizer = tiny_model()
    greedy_alone = [rwkv_mlx.generate(model, tokenizer, p, sampling=GREEDY, max_tokens=6) for p in PROMPTS]
    assert rwkv_mlx.batch_generate(model, tokenizer, PROMPTS, samplings=GREEDY, max_tokens=6) == greedy_alone
    assert rwkv_mlx.batch_generate(model, tokenizer, PROMPTS, temperature=0, presence_penalty=0,
                                   frequency_penalty=0, max_tokens=6) == greedy_alone
    texts = rwkv_mlx.batch_generate(model, tokenizer, PROMPTS, max_tokens=4, stop_at_end_of_text=False)
    assert len(texts) == 3


def test_batch_from_cached_states():
    model, tokenizer = tiny_model()
    prefix, rest = split_at_turn(tokenizer, TEXT)
    cached = rwkv_mlx.cache_prompt(model, tokenizer, prefix)
    batched = rwkv_mlx.batch_generate(model, tokenizer, [rest, "ROMEO:"], states=[cached, None],
                                      samplings=GREEDY, max_tokens=8)
    assert batched == [rwkv_mlx.generate(model, tokenizer, prefix + rest, sampling=GREEDY, max_tokens=8),
                       rwkv_mlx.generate(model, tokenizer, "ROMEO:", sampling=GREEDY, max_tokens=8)]


def test_bad_batch_arguments():
    model, tokenizer = tiny_model()
    with pytest.raises(InvalidArgumentError, match="2 values for 3 prompts"):
        rwkv_mlx.batch_generate(model, tokenizer, PROMPTS, max_tokens=[1, 2])
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        rwkv_mlx.batch_generate(model, tokenizer, [])
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        rwkv_mlx.batch_generate(model, tokenizer, PROMPTS, max_tokens=0)
    with pytest.raises(InvalidArgumentError, match="empty"):
        rwkv_mlx.batch_generate(model, tokenizer, ["a", ""])


def test_cli_generate_from_a_saved_state_equals_the_whole_prompt(tmp_path, capsys):
    """`rwkv-mlx generate --state FILE`: the saved prefix plus the prompt is the whole text."""
    from conftest import tiny_model_path

    from rwkv_mlx.cli import run

    model, tokenizer = tiny_model()
    cut = TEXT.rindex("\n\n") + 2
    state_file = tmp_path / "prefix.state"
    rwkv_mlx.cache_prompt(model, tokenizer, TEXT[:cut]).save(state_file)
    common = ["generate", "-m", str(tiny_model_path()), "--greedy", "-n", "12", "--no-stats", "--device", "cpu"]

    assert run(common + ["-p", TEXT, "--no-escape"]) == 0
    whole = capsys.readouterr().out
    assert run(common + ["-p", TEXT[cut:], "--no-escape", "--state", str(state_file)]) == 0
    assert capsys.readouterr().out == whole
