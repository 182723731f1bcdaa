"""rwkv-mlx serve, end to end on the CPU with the bundled demo model (4 layers x 256).

The references are independent of the server: ``rwkv_mlx.generate`` on the same
prompt (the library's own decode loop, one request alone at batch size 1), a cold
server, and token-level facts. Servers listen on 127.0.0.1, port 0.
"""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import mlx.core as mx  # noqa: E402

import rwkv_mlx  # noqa: E402
from rwkv_mlx import SamplingParams, State  # noqa: E402
from rwkv_mlx.text.chat import TURN_END, format_chat_prompt  # noqa: E402
from rwkv_mlx.serve.app import ServeConfig  # noqa: E402
from rwkv_mlx.serve.server import Server  # noqa: E402

DEMO = rwkv_mlx.DEMO_MODEL
NAME = "rwkv7-demo-shakespeare"
KEY = "sk-test-key"
PLAIN_GREEDY = dict(temperature=0, presence_penalty=0, frequency_penalty=0)


@pytest.fixture(scope="module")
def reference():
    return rwkv_mlx.load(DEMO)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config = ServeConfig(model=DEMO, port=0, api_key=KEY, max_batch=8, cache_dir=root / "cache", max_tokens=4096)
    with Server(config) as s:
        yield s


def client(server, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


def http(server) -> "httpx.Client":
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})


def stream_text(stream) -> tuple[str, str | None, dict | None]:
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "" if hasattr(choice, "delta") else choice.text)
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


# -- exactness ---------------------------------------------------------------------------------


def test_greedy_completion_streamed_whole_and_generate_agree(server, reference):
    model, tok = reference
    prompt = "ROMEO:\nWhat light through yonder"
    want = rwkv_mlx.generate(model, tok, prompt, max_tokens=40, sampling=SamplingParams.greedy())
    c = client(server)
    whole = c.completions.create(model=NAME, prompt=prompt, max_tokens=40, **PLAIN_GREEDY)
    parts = [ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=prompt, max_tokens=40, stream=True,
                                                                 **PLAIN_GREEDY) if ch.choices]
    assert whole.choices[0].text == "".join(parts) == want
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tok.encode(prompt)) and whole.usage.completion_tokens == 40
    # curl users leave the model out, as llama-server and mlx_lm.server allow: it is the one served
    bare = http(server).post("/v1/completions", json={"prompt": prompt, "max_tokens": 40, **PLAIN_GREEDY})
    assert bare.status_code == 200, bare.text
    assert bare.json()["choices"][0]["text"] == want and bare.json()["model"] == NAME


def test_greedy_chat_with_penalties_streamed_whole_and_generate_agree(server, reference):
    """Chat defaults (SamplingParams.chat: token 0 banned, decayed presence/frequency penalties) at
    temperature 0: the per-row sampler path, not the plain-argmax one."""
    model, tok = reference
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    want = rwkv_mlx.generate(model, tok, format_chat_prompt("Who goes there?", system="Speak as a king."),
                             max_tokens=48, sampling=SamplingParams.chat(temperature=0), stop=[TURN_END])
    c = client(server)
    whole = c.chat.completions.create(model=NAME, messages=messages, max_tokens=48, temperature=0)
    text, finish, usage = stream_text(c.chat.completions.create(
        model=NAME, messages=messages, max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert whole.choices[0].message.content == text == want
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_logit_bias_beside_a_free_row_equals_generate(server, reference):
    """OpenAI's logit_bias, through the batched sampler: the first greedy token pushed out with -100 must
    change the text, and each row must still equal rwkv_mlx.generate alone."""
    model, tok = reference
    prompt = "ROMEO:\nWhat light through yonder"
    first = next(rwkv_mlx.stream_generate(model, tok, prompt, max_tokens=1, sampling=SamplingParams.greedy())).token
    bias = {first: -100, 11: 5.0}
    want = {name: rwkv_mlx.generate(model, tok, prompt, max_tokens=24, sampling=SamplingParams.greedy(logit_bias=b))
            for name, b in (("biased", bias), ("free", {}))}
    assert want["biased"] != want["free"]
    bodies = {"biased": {"logit_bias": {str(t): b for t, b in bias.items()}}, "free": {}}

    def ask(name):
        r = http(server).post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, **PLAIN_GREEDY,
                                                       **bodies[name]})
        assert r.status_code == 200, r.text
        return name, r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(2) as pool:
        assert dict(pool.map(ask, want)) == want


def test_seeded_sampling_equals_generate_with_the_same_seed(server, reference):
    model, tok = reference
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    want = rwkv_mlx.generate(model, tok, "KING:", max_tokens=30, sampling=params)
    got = client(server).completions.create(model=NAME, prompt="KING:", max_tokens=30, temperature=1.0, top_p=0.9,
                                            seed=1234, extra_body={"top_k": 50})
    assert got.choices[0].text == want


@pytest.mark.slow
def test_eight_concurrent_requests_each_equal_their_sequential_result(server, reference):
    """Rows join and leave the batch at different steps (different prompt and output lengths, mixed
    samplers); each must equal what the same request gives alone through rwkv_mlx.generate."""
    model, tok = reference
    jobs = []
    for i in range(8):
        prompt = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed any further, hear me speak.",
                  "KING RICHARD III:\nNow is the winter", "HAMLET:", "Second Citizen:", "MENENIUS:\nWhy, masters",
                  "LADY CAPULET:\nWhat"][i]
        n = 8 + 2 * i
        if i % 3 == 0:
            params, knobs = SamplingParams.greedy(), dict(PLAIN_GREEDY)
        elif i % 3 == 1:
            params, knobs = SamplingParams(seed=i), dict(seed=i)  # reference defaults: T 1, top-p 0.85, penalties
        else:
            params, knobs = SamplingParams(temperature=0.0), dict(temperature=0)  # greedy with penalties
        jobs.append((prompt, n, params, knobs))
    want = [rwkv_mlx.generate(model, tok, p, max_tokens=n, sampling=params) for p, n, params, _ in jobs]
    c = client(server)

    def ask(job):
        prompt, n, _, knobs = job
        return c.completions.create(model=NAME, prompt=prompt, max_tokens=n, **knobs).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, jobs))
    assert got == want


def test_prompts_read_in_small_chunks_between_decode_steps_give_the_same_text(reference):
    """--prefill-chunk 7: prompts are cut into many pieces, read while other rows decode."""
    model, tok = reference
    prompts = ["First Citizen:\nBefore we proceed any further, hear me speak. You are all resolved rather to die "
               "than to famish?", "ROMEO:", "KING HENRY:\nOnce more unto the breach, dear friends, once more;"]
    want = [rwkv_mlx.generate(model, tok, p, max_tokens=12, sampling=SamplingParams.greedy()) for p in prompts]
    with Server(ServeConfig(model=DEMO, port=0, prefill_chunk=7, max_batch=4)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=12, **PLAIN_GREEDY)
                                .choices[0].text, prompts))
    assert got == want


def test_padding_rows_and_neighbours_do_not_change_a_row(reference):
    """The engine pads a batch to its bucket size with idle rows. On this CPU backend a row's
    logits and state are bitwise the same at batch 1 and inside a padded batch of 8 with other
    live rows; a backend where they differed in the last bits would still have to agree on
    greedy tokens, which the concurrency test checks."""
    model, tok = reference
    _, alone = rwkv_mlx.prefill(model, tok.encode("ROMEO:\nWhat light"))
    others = [rwkv_mlx.prefill(model, tok.encode(t))[1] for t in ("KING:", "O", "Nay, but")]
    batch = State.stack([others[0], alone, others[1], others[2], *[model.initial_state(1)] * 4])
    tokens = mx.array([5, 300, 7, 9, 0, 0, 0, 0], dtype=mx.uint32)
    l1, s1 = model.step(tokens[1:2], alone)
    l8, s8 = model.step(tokens, batch)
    assert mx.array_equal(l1[0], l8[1]).item()
    assert all(mx.array_equal(a[0], b[1]).item() for a, b in zip(s1.arrays(), s8.arrays()))


def _run_engine(reference, specs: list, monkeypatch, **options) -> tuple[list[dict], list[int]]:
    """Submit ``specs`` together to an Engine that has not started, then start it: the first loop
    iteration admits them all at once (no race with arrival times). Returns each request's outcome
    (text, done event) and the rows of every prompt read (one entry a prefill call)."""
    from rwkv_mlx.serve import engine as eng

    reads, real = [], eng.prefill

    def counting(model, tokens, state=None, **kw):
        reads.append(len(tokens) if tokens and not isinstance(tokens[0], int) else 1)
        return real(model, tokens, state, **kw)

    monkeypatch.setattr(eng, "prefill", counting)
    outcomes = [{"text": "", "done": None} for _ in specs]
    finished = threading.Semaphore(0)

    def deliver(i):
        def on(event):
            if event.kind == "piece":
                outcomes[i]["text"] += event.text
            else:
                outcomes[i]["done"] = event
                finished.release()
        return on

    engine = eng.Engine(lambda: reference, **options)
    for i, spec in enumerate(specs):
        engine.submit(eng.Job(spec, deliver(i)))
    engine.start()
    try:
        for _ in specs:
            assert finished.acquire(timeout=120)
    finally:
        engine.stop()
    return outcomes, reads


def test_a_burst_of_equal_length_prompts_is_read_in_few_calls(reference, monkeypatch):
    """Eight completions of 12 prompt tokens each, arriving together, are read as the rows of one prefill
    call, not one call each, and seven as calls of 4, 2 and 1 rows (batch sizes the server runs at, whose
    kernels its warm-up compiled); every request's text is still what rwkv_mlx.generate gives it alone.
    A prompt of another length is read in a call of its own."""
    from rwkv_mlx.serve.protocol import Spec

    model, tok = reference
    ids = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak. All: Speak, speak. First "
                     "Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. First "
                     "Citizen: First, you know Caius Marcius is chief enemy to the people.")
    prompts = [ids[3 * i:3 * i + 12] for i in range(8)] + [ids[:5]]
    specs = [Spec(kind="completion", prompt_ids=p, sampling=SamplingParams.greedy(), max_tokens=6 + i % 3, stop=[])
             for i, p in enumerate(prompts)]
    want = [rwkv_mlx.generate(model, tok, s.prompt_ids, max_tokens=s.max_tokens, sampling=SamplingParams.greedy())
            for s in specs]
    outcomes, reads = _run_engine(reference, specs, monkeypatch, max_batch=16)
    assert sorted(reads) == [1, 8]
    assert all(o["done"].kind == "done" for o in outcomes)
    assert [o["text"] for o in outcomes] == want
    outcomes, reads = _run_engine(reference, specs[1:], monkeypatch, max_batch=16)
    assert sorted(reads) == [1, 1, 2, 4]
    assert [o["text"] for o in outcomes] == want[1:]


def test_a_burst_of_chats_reads_their_shared_system_prompt_once(reference, monkeypatch):
    """Four chats with one system prompt, arriving together: the first reads it and checkpoints it; the
    others wait for that checkpoint instead of each reading the system prompt, so they report it as cached
    tokens; then all four messages (of one length) are read in one call. The answers equal a cold
    rwkv_mlx.generate. (The calls after those read each finished turn's closing tokens.)"""
    from rwkv_mlx.serve.protocol import parse_chat

    model, tok = reference
    system = "You are a player in a company of actors. Answer in the words of the play, briefly."
    users = ["Who are you?", "Where are we?", "What is this?", "Why so sad?"]
    specs = [parse_chat({"messages": [{"role": "system", "content": system}, {"role": "user", "content": u}],
                         "max_tokens": 6, **PLAIN_GREEDY}, tok, model_name=NAME, max_tokens_cap=64,
                        max_prompt_tokens=4096) for u in users]
    boundary = specs[0].checkpoints[0]
    assert all(s.checkpoints[0] == boundary and s.prompt_ids[:boundary] == specs[0].prompt_ids[:boundary]
               for s in specs)
    outcomes, reads = _run_engine(reference, specs, monkeypatch, max_batch=8)
    assert [o["done"].cached_tokens for o in outcomes] == [0, boundary, boundary, boundary]
    lengths = {len(s.prompt_ids) - boundary for s in specs}
    assert len(lengths) == 1 and reads[:2] == [1, 4]
    for spec, got in zip(specs, outcomes):
        want = rwkv_mlx.generate(model, tok, spec.prompt_ids, max_tokens=6, stop=spec.stop,
                                 sampling=spec.sampling)
        assert got["text"] == want


def test_a_row_kept_from_a_batch_does_not_keep_the_batch(reference):
    """The engine hands the state cache rows of batched states; a row must own its buffers, or a cached
    row would keep its whole batch in memory (MLX's slices are views) while the cache counts one row."""
    from rwkv_mlx.serve.engine import own_row

    model, _ = reference
    for take, keeps_batch in ((own_row, False), (lambda batch, i: batch[i], True)):
        batch = model.initial_state(64).map(lambda a: a + 1)
        mx.eval(*batch.arrays())
        row = take(batch, 3)
        mx.eval(*row.arrays())
        with_batch = mx.get_active_memory()
        del batch
        freed = with_batch - mx.get_active_memory()
        assert (freed < row.nbytes) == keeps_batch, (freed, row.nbytes)
        assert all(mx.array_equal(a, mx.ones_like(a)).item() for a in row.arrays())


@pytest.mark.parametrize("warmup", [True, False])
def test_warmup_steps_every_batch_size_before_the_first_request(reference, warmup):
    """A GPU compiles the decode step once per batch size; with warm-up the server pays that before it
    answers, at each bucket up to --max-batch, and not in the middle of its clients' streams."""
    from rwkv_mlx.serve.engine import Engine, model_step

    sizes = []

    def step(model, tokens, state):
        sizes.append(tokens.shape[0])
        return model_step(model, tokens, state)

    engine = Engine(lambda: reference, max_batch=8, step_fn=step, warmup=warmup).start()
    try:
        assert sizes == ([1, 2, 4, 8] if warmup else [])
    finally:
        engine.stop()


def test_logprobs_are_the_model_softmax(server, reference):
    model, tok = reference
    pieces = list(rwkv_mlx.stream_generate(model, tok, "HAMLET:", max_tokens=6, sampling=SamplingParams.greedy()))
    got = client(server).completions.create(model=NAME, prompt="HAMLET:", max_tokens=6, logprobs=3, **PLAIN_GREEDY)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == 6
    # same float32 log-softmax of the same logits row; only the reduction order may differ
    assert lp.token_logprobs == pytest.approx([p.logprob for p in pieces], abs=1e-5)
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy picks the most probable token
    ask = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2,
               temperature=0)
    entries = client(server).chat.completions.create(**ask).choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    streamed = [e for chunk in client(server).chat.completions.create(**ask, stream=True) for choice in chunk.choices
                if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


# -- the state cache ------------------------------------------------------------------------------


def _conversation(c, system: str, questions: list[str], max_tokens: int = 32):
    messages = [{"role": "system", "content": system}]
    results = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        results.append(r)
    return results


def test_second_turn_continues_from_the_cached_state_and_matches_a_cold_server(server, tmp_path):
    first, second = _conversation(client(server), "You are a herald.", ["What news?", "And of the king?"])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens
    assert cached < second.usage.prompt_tokens
    with Server(ServeConfig(model=DEMO, port=0, api_key=KEY)) as cold:  # no cache dir, empty memory
        messages = [{"role": "system", "content": "You are a herald."}, {"role": "user", "content": "What news?"},
                    {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And of the king?"}]
        again = client(cold).chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == second.choices[0].message.content


def test_metrics_count_requests_tokens_and_cache_hits(server):
    _conversation(client(server), "Be brief.", ["Speak.", "Again."], max_tokens=8)
    text = http(server).get("/metrics").text
    assert re.search(r'rwkv_serve_requests_total\{endpoint="chat",status="200"\} [1-9]', text)
    assert re.search(r"rwkv_serve_cache_hits_total [1-9]", text)
    assert re.search(r"rwkv_serve_completion_tokens_total [1-9]", text)
    assert 'rwkv_serve_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    for gauge in ("queue_depth", "batch_size", "active_rows"):
        assert f"# TYPE rwkv_serve_{gauge} gauge" in text


# -- a server process: restart, kill -9 -------------------------------------------------------------


class ServerProcess:
    def __init__(self, cache_dir: Path, prelude: str = ""):
        code = (f"{prelude}\nimport sys\nfrom rwkv_mlx.cli import main\n"
                f"sys.argv = ['rwkv-mlx', 'serve', '--model', {str(DEMO)!r}, '--port', '0', '--cache-dir', "
                f"{str(cache_dir)!r}, '--api-key', {KEY!r}]\nmain()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = self.wait_for(r"on (http://127\.0\.0\.1:\d+)").group(1)

    def wait_for(self, pattern: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # a server that hangs silently must fail the test, not block it: wait for a line with a limit
            if not select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        self.kill()
        raise AssertionError(f"server never printed {pattern!r}: {''.join(self.lines)[-2000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


def _proc_client(proc: ServerProcess):
    return openai.OpenAI(base_url=proc.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.slow
def test_restart_with_the_same_cache_dir_keeps_the_conversation(server, tmp_path):
    cache = tmp_path / "cache"
    proc = ServerProcess(cache)
    try:
        first = _conversation(_proc_client(proc), "You are a herald.", ["What news?"])[0]
    finally:
        proc.kill(signal.SIGTERM)
    proc = ServerProcess(cache)
    try:
        messages = [{"role": "system", "content": "You are a herald."}, {"role": "user", "content": "What news?"},
                    {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And of the king?"}]
        second = _proc_client(proc).chat.completions.create(model=NAME, messages=messages, max_tokens=32,
                                                            temperature=0)
    finally:
        proc.kill()
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens
    cold = client(server).chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0)
    assert second.choices[0].message.content == cold.choices[0].message.content


# The server process writes its first checkpoint normally, then stalls inside the second write with a
# half-written temporary file on disk (as if the disk were slow), and is killed there with SIGKILL.
STALL_SECOND_WRITE = """
import sys, time, mlx.core as mx
_save, _writes = mx.save_safetensors, []
def _stalling_save(path, arrays, metadata=None):
    _writes.append(path)
    _save(path, arrays, metadata=metadata)
    if len(_writes) == 2:
        written = path if path.endswith(".safetensors") else path + ".safetensors"
        size = __import__("os").path.getsize(written)
        with open(written, "r+b") as f:
            f.truncate(size // 2)
        print("STALLED-IN-CACHE-WRITE", file=sys.stderr, flush=True)
        time.sleep(300)
mx.save_safetensors = _stalling_save
"""


def test_kill_9_during_a_cache_write_leaves_a_cache_the_next_start_reads(tmp_path):
    cache = tmp_path / "cache"
    proc = ServerProcess(cache, prelude=STALL_SECOND_WRITE)
    messages = [{"role": "system", "content": "You are a herald."}, {"role": "user", "content": "What news?"}]
    try:
        c = openai.OpenAI(base_url=proc.url + "/v1", api_key=KEY, max_retries=0, timeout=5)
        hang = threading.Thread(target=lambda: pytest.raises(Exception, c.chat.completions.create, model=NAME,
                                                            messages=messages, max_tokens=8, temperature=0))
        hang.start()
        proc.wait_for("STALLED-IN-CACHE-WRITE")
    finally:
        proc.kill()  # SIGKILL in the middle of the write
    hang.join(timeout=30)
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert leftovers, "the stalled write should have left its temporary file"
    # a torn final file (a filesystem without atomic rename) and junk must not stop the next start either
    (cache / ("0" * 40 + ".state.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (cache / "notes.txt").write_text("not a state")
    proc = ServerProcess(cache)
    try:
        r = _proc_client(proc).chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
        assert httpx.get(proc.url + "/health").status_code == 200
    finally:
        proc.kill()
    system_tokens = len(rwkv_mlx.Tokenizer.from_vocab_file().encode("System: You are a herald.\n\n"))
    assert r.usage.prompt_tokens_details.cached_tokens == system_tokens  # the finished first write was read
    names = {p.name for p in cache.iterdir()}
    assert not any(n.startswith(".") for n in names) and "0" * 40 + ".state.safetensors" not in names


# -- extensions: named states ---------------------------------------------------------------------------


def test_save_state_then_fork_from_it_without_changing_it(server, reference):
    model, tok = reference
    c = http(server)
    base = {"model": NAME, "max_tokens": 10, **PLAIN_GREEDY}
    r = c.post("/v1/completions", json={**base, "prompt": "GLOUCESTER:\nNow is the", "save_state": "gloucester"})
    assert r.status_code == 200, r.text
    path = server.config.states_directory / "gloucester.safetensors"
    saved = path.read_bytes()
    prompt_and_answer = tok.encode("GLOUCESTER:\nNow is the")
    # the saved state is the state after the prompt and every generated token: check against the library
    answer = r.json()["choices"][0]["text"]
    want_state = rwkv_mlx.cache_prompt(model, tok, prompt_and_answer + tok.encode(answer))
    got_state = State.load(path, model)
    assert all(mx.allclose(a, b, atol=1e-5).item() for a, b in zip(got_state.arrays(), want_state.arrays()))
    forks = [c.post("/v1/completions", json={**base, "prompt": " and", "initial_state": "gloucester"}).json()
             for _ in range(2)]
    want = rwkv_mlx.generate(model, tok, " and", state=got_state, max_tokens=10, sampling=SamplingParams.greedy())
    assert forks[0]["choices"][0]["text"] == forks[1]["choices"][0]["text"] == want
    assert path.read_bytes() == saved
    again = c.post("/v1/completions", json={**base, "prompt": "x", "save_state": "gloucester"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "state_exists"
    missing = c.post("/v1/completions", json={**base, "prompt": "x", "initial_state": "nobody"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "initial_state"


def test_saved_states_are_right_in_a_batch_with_a_constrained_row(server, reference):
    """A batch holding a grammar row is not pipelined: its rows' final states must still include the last token."""
    model, tok = reference
    c = http(server)
    jobs = {"free": {"prompt": "KING:\nWhat", "save_state": "free-beside-grammar"},
            "constrained": {"prompt": "KING:\nSay", "save_state": "grammar-row", "grammar": 'root ::= " " [a-z]+ "."'}}
    replies = {}

    def run(name):
        replies[name] = c.post("/v1/completions", json={"model": NAME, "max_tokens": 12, **PLAIN_GREEDY, **jobs[name]})

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for name, job in jobs.items():
        r = replies[name]
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        # the grammar row ends on end-of-text (forced once the grammar is complete), which the model read too
        eot = [tok.end_of_text_id] if choice["finish_reason"] == "stop" else []
        want = rwkv_mlx.cache_prompt(model, tok, tok.encode(job["prompt"]) + tok.encode(choice["text"]) + eot)
        got = State.load(server.config.states_directory / f"{job['save_state']}.safetensors", model)
        assert all(mx.allclose(a, b, atol=1e-5).item() for a, b in zip(got.arrays(), want.arrays())), name


def test_a_failing_constraint_fails_its_own_request_only(server):
    """A grammar that compiles but becomes too ambiguous while generating ends that request with an error;
    a request beside it finishes normally and the server keeps serving."""
    c = http(server)
    ambiguous = 'root ::= e\ne ::= "a" e | "a" e "b" | "a" e "c" | ""'
    replies = {}

    def run(name, body):
        replies[name] = c.post("/v1/completions", json={"model": NAME, "prompt": "KING:", **body})

    threads = [threading.Thread(target=run, args=("bad", {"max_tokens": 64, "grammar": ambiguous, **PLAIN_GREEDY})),
               threading.Thread(target=run, args=("good", {"max_tokens": 24, **PLAIN_GREEDY}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert replies["good"].status_code == 200 and replies["good"].json()["choices"][0]["text"]
    bad = replies["bad"]  # greedy, so it always reaches the parse limit within 64 tokens
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "constraint_failed", bad.text
    assert c.get("/health").json()["status"] == "ok"


# -- hostility --------------------------------------------------------------------------------------------

GOOD_CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

HOSTILE = {
    "garbage bytes": (dict(content=bytes(range(256)) * 4), 400),
    "10 MB body": (dict(content=b'{"model": "' + b"x" * (10 << 20) + b'"}'), 413),
    "JSON not an object": (dict(json=[1, 2, 3]), 400),
    "messages wrong type": (dict(json={**GOOD_CHAT, "messages": "hello"}), 400),
    "max_tokens wrong type": (dict(json={**GOOD_CHAT, "max_tokens": "ten"}), 400),
    "temperature wrong type": (dict(json={**GOOD_CHAT, "temperature": [1]}), 400),
    "negative max_tokens": (dict(json={**GOOD_CHAT, "max_tokens": -5}), 400),
    "boolean max_tokens": (dict(json={**GOOD_CHAT, "max_tokens": True}), 400),
    "top_p out of range": (dict(json={**GOOD_CHAT, "top_p": 7}), 400),
    "penalty that overflows float32": (dict(json={**GOOD_CHAT, "frequency_penalty": 1e39}), 400),
    "JSON nested 100,000 deep": (dict(content=b"[" * 100_000), 400),
    "schema bound of 400 digits": (dict(json={**GOOD_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "big", "schema": {"type": "integer", "minimum": 10 ** 400}}}}), 400),
    "unknown model": (dict(json={**GOOD_CHAT, "model": "gpt-9"}), 404),
    "model wrong type": (dict(json={**GOOD_CHAT, "model": 7}), 400),
    "unknown role": (dict(json={**GOOD_CHAT, "messages": [{"role": "wizard", "content": "x"}]}), 400),
    "ends with the assistant": (dict(json={**GOOD_CHAT, "messages": [{"role": "user", "content": "a"},
                                                                     {"role": "assistant", "content": "b"}]}), 400),
    "n = 2": (dict(json={**GOOD_CHAT, "n": 2}), 400),
    "unknown response_format": (dict(json={**GOOD_CHAT, "response_format": {"type": "xml"}}), 400),
    "json_schema without a schema": (dict(json={**GOOD_CHAT, "response_format": {"type": "json_schema",
                                                                                 "json_schema": {}}}), 400),
    "recursive $ref": (dict(json={**GOOD_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "loop", "schema": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}}), 400),
    "broken grammar": (dict(json={**GOOD_CHAT, "grammar": "root ::= (\"a\""}), 400),
    "grammar not a string": (dict(json={**GOOD_CHAT, "grammar": 7}), 400),
    "path in a state name": (dict(json={**GOOD_CHAT, "initial_state": "../../etc/passwd"}), 400),
    "too many stops": (dict(json={**GOOD_CHAT, "stop": ["a"] * 40}), 400),
    "logit_bias key not a token id": (dict(json={**GOOD_CHAT, "logit_bias": {"hello": 1}}), 400),
    "logit_bias out of range": (dict(json={**GOOD_CHAT, "logit_bias": {"11": 1e6}}), 400),
    "logit_bias past the vocabulary": (dict(json={**GOOD_CHAT, "logit_bias": {"99999999": 1}}), 400),
    "logit_bias not an object": (dict(json={**GOOD_CHAT, "logit_bias": [1, 2]}), 400),
}


def test_completions_refuse_what_they_would_ignore(server):
    """Fields the server cannot honour get 400 naming them rather than a silently different answer."""
    c = http(server)
    base = {"prompt": "KING:", "max_tokens": 2}
    for field, value in (("best_of", 2), ("echo", True), ("suffix", "x"), ("n", 3)):
        r = c.post("/v1/completions", json={**base, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert c.post("/v1/completions", json={**base, "best_of": 1, "n": 1}).status_code == 200


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_get_4xx_and_the_server_keeps_serving(server, case):
    kwargs, status = HOSTILE[case]
    with http(server) as c:
        r = c.post("/v1/chat/completions", **kwargs)
        assert r.status_code == status, r.text[:500]
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in r.text
        assert c.get("/health").json()["status"] == "ok"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "kind": {"enum": ["king", "fool", "ghost"]}},
          "required": ["name", "age", "kind"]}


@pytest.mark.slow
def test_response_format_json_schema_gives_valid_json_streamed_or_not(server):
    """The demo model knows no JSON; the constraint alone makes every answer parse and validate."""
    import jsonschema

    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        kw = dict(model=NAME, messages=[{"role": "user", "content": "Describe someone."}], max_tokens=120,
                  temperature=1.0, seed=seed, response_format=fmt)
        whole = c.chat.completions.create(**kw)
        assert whole.choices[0].finish_reason == "stop", whole.choices[0]
        jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
            stream=True, **kw) if chunk.choices)
        assert streamed == whole.choices[0].message.content


@pytest.mark.slow
def test_grammar_extension_and_json_object_beside_free_rows(server):
    """Constrained rows share the batch with free ones; each keeps its own constraint (or none)."""
    c = client(server)
    jobs = {
        "grammar": dict(extra_body={"grammar": 'root ::= ("yes" | "no") "."'}),
        "json_object": dict(response_format={"type": "json_object"}, max_tokens=200),
        "free": {},
    }
    results = {}

    def run(name):
        kw = {"max_tokens": 60, **jobs[name]}
        results[name] = c.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Well?"}], temperature=0.9, seed=1, **kw)

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["grammar"].choices[0].message.content in ("yes.", "no.")
    obj = results["json_object"].choices[0]
    if obj.finish_reason == "stop":  # complete: it must parse; cut by max_tokens: no claim is made
        assert isinstance(json.loads(obj.message.content), dict)
    else:
        assert obj.finish_reason == "length" and obj.message.content.lstrip().startswith("{")
    alone = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Well?"}], max_tokens=60,
                                      temperature=0.9, seed=1)
    assert results["free"].choices[0].message.content == alone.choices[0].message.content


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=GOOD_CHAT, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    models = http(server).get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    assert client(server).models.retrieve(NAME).model_dump(exclude_none=True) == models["data"][0]  # the openai client's retrieve
    missing = http(server).get("/v1/models/gpt-9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + f"/v1/models/{NAME}").status_code == 401
    assert httpx.get(server.url + "/nowhere").json()["error"]["message"]


def test_a_disconnected_client_frees_its_slot(server):
    metrics = server.engine.metrics
    before = metrics.counter("cancelled_total")
    with http(server) as c:
        with c.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "KING:", "max_tokens": 4000,
                                                       "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (server.engine.active_rows or metrics.counter("cancelled_total") == before):
        time.sleep(0.05)
    assert server.engine.active_rows == 0
    assert metrics.counter("cancelled_total") == before + 1
    assert http(server).get("/health").status_code == 200


@pytest.mark.slow
def test_full_queue_gets_429_and_slow_requests_time_out(tmp_path):
    config = ServeConfig(model=DEMO, port=0, max_batch=1, max_queue=1, request_timeout=3.0, max_tokens=100000)
    with Server(config) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        long = dict(model=NAME, prompt="KING:", max_tokens=100000)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.completions.create, **long)  # takes the only slot
            deadline = time.monotonic() + 10
            while s.engine.active_rows == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            waiting = pool.submit(c.completions.create, **long)  # waits in the queue
            while s.engine.metrics.gauge("queue_depth") == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as full:
                c.completions.create(**long)
            assert full.value.status_code == 429
            for future in (running, waiting):
                with pytest.raises(openai.APIStatusError) as late:
                    future.result(timeout=30)
                assert late.value.status_code == 504 and "3 s" in late.value.message
        streamed = httpx.post(s.url + "/v1/completions", json={**long, "stream": True}, timeout=30).text
        assert '"code": "timeout"' in streamed and streamed.rstrip().endswith("data: [DONE]")
        assert httpx.get(s.url + "/health").json()["active_rows"] == 0


# -- reasoning, CLI ---------------------------------------------------------------------------------------


def test_think_blocks_become_reasoning_content():
    from rwkv_mlx.serve.protocol import ReasoningSplitter, split_reasoning

    assert split_reasoning(">\nweigh it</think>\nYes.", "think") == ("\nweigh it", "\nYes.")
    assert split_reasoning("plain", "off") == (None, "plain")
    splitter, pieces = ReasoningSplitter("think"), []
    for piece in [">a", "b</th", "ink", ">c", "d"]:
        pieces.append(splitter.feed(piece))
    pieces.append(splitter.flush())
    assert "".join(r for r, _ in pieces) == "ab" and "".join(c for _, c in pieces) == "cd"


def test_think_mode_request_returns_reasoning_content(server):
    r = http(server).post("/v1/chat/completions", json={**GOOD_CHAT, "think": "think", "max_tokens": 6,
                                                        "temperature": 0})
    message = r.json()["choices"][0]["message"]
    assert "reasoning_content" in message and isinstance(message["content"], str)


def test_a_model_that_fails_to_load_frees_the_port(tmp_path):
    """The socket is bound before the model loads; a load that fails must close it, even while the error is
    kept (pytest's excinfo, as Jupyter's last traceback, holds Server.start's frame and its locals)."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(rwkv_mlx.ModelFileError, match="bad.gguf: not a GGUF file") as caught:
        Server(ServeConfig(model=bad, port=port, warmup=False)).start()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # EADDRINUSE while the first socket lives
    assert caught.tb is not None


def test_serve_command_is_registered_and_refuses_bad_options(capsys):
    from rwkv_mlx.cli import run

    assert run(["serve", "--help"]) == 0
    assert "--cache-dir" in capsys.readouterr().out
    assert run(["serve", "--port", "-3"]) == 2
    assert run(["serve", "--model", "/nonexistent/model.gguf"]) == 3
    assert "no such file" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: one line with the reason, before any model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run(["serve", "--port", str(port), "--no-warmup"]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"rwkv-mlx: error: cannot listen on 127.0.0.1:{port}: address already in use"], err
    assert run(["serve", "--host", "no-such-host.invalid", "--no-warmup"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkv-mlx: error: cannot listen on no-such-host.invalid:8080: "), err
