"""ChatSession carries the state across turns; ``rwkv-mlx chat`` driven through a pseudo-terminal.

The judge for a multi-turn conversation is a greedy decoder written out here
over the whole token history (system, every turn, every generated token), run
from a zero state with plain model calls.
"""

from __future__ import annotations

import codecs
import os
import select
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model, tiny_model_path, write_torch_zip

from rwkv_mlx import ChatSession, SamplingParams, State, cache_prompt
from rwkv_mlx.text.chat import format_chat_prompt
from rwkv_mlx.cli import run
from rwkv_mlx.errors import InvalidArgumentError, ModelFileError

CHAT_GREEDY = SamplingParams.greedy(banned_tokens=(0,))
MAX_TOKENS = 10


def greedy_turn(model, tokenizer, history: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], str]:
    """Read ``history`` from a zero state, then decode greedily (token 0 banned) until "\\n\\n"."""
    logits, state = model(mx.array([history]), logits="last")
    out: list[int] = []
    while True:
        x = np.array(logits[0, -1])
        x[0] = -np.inf
        out.append(int(x.argmax()))
        text = tokenizer.decode(out)
        if "\n\n" in text:
            return out, text[: text.index("\n\n")]
        if len(out) == max_tokens:
            return out, text
        logits, state = model(mx.array([[out[-1]]]), state, logits="last")


def test_session_carries_the_state_instead_of_rereading():
    model, tokenizer = tiny_model()
    session = ChatSession(model, tokenizer, system="You are brief.", sampling=CHAT_GREEDY, max_tokens=MAX_TOKENS)
    history = tokenizer.encode("System: You are brief.\n\n")
    for question in ["Hello there", "What is 2+2?", "Thanks"]:
        turn = tokenizer.encode(format_chat_prompt(question))
        want_tokens, want_text = greedy_turn(model, tokenizer, history + turn)
        pieces = list(session.stream(question))
        assert pieces[0].prompt_tokens == len(turn)  # only the new turn is read
        assert [p.token for p in pieces] == want_tokens
        assert "".join(p.text for p in pieces) == want_text
        history += turn + want_tokens
        if "\n\n" not in tokenizer.decode(want_tokens):  # cut by max_tokens: the session closes the turn
            history += tokenizer.encode("\n\n")
    assert [q for q, _ in session.history] == ["Hello there", "What is 2+2?", "Thanks"]
    # the session's state is the state after the whole conversation
    _, want = model(mx.array([history]), logits="none")
    for a, b in zip(session.state.arrays(), want.arrays()):
        assert np.abs(np.array(a) - np.array(b)).max() < 1e-4


def test_session_save_load_reset(tmp_path):
    model, tokenizer = tiny_model()
    session = ChatSession(model, tokenizer, system="Be kind.", sampling=CHAT_GREEDY, max_tokens=MAX_TOKENS)
    first = session.ask("hi")
    assert first == first.strip() and first
    session.save(tmp_path / "chat.state")
    second = session.ask("and then?")

    restored = ChatSession(model, tokenizer, sampling=CHAT_GREEDY, max_tokens=MAX_TOKENS, think="fast")
    restored.load(tmp_path / "chat.state")
    assert restored.system == "Be kind." and restored.think == "off" and restored.history == [("hi", session.history[0][1])]
    assert restored.ask("and then?") == second

    restored.reset()
    assert restored.history == [] and restored.ask("hi") == first  # back to the system prompt's state

    other, _ = tiny_model(seed=2)
    with pytest.raises(ModelFileError, match="belongs to"):
        ChatSession(other, tokenizer).load(tmp_path / "chat.state")


def test_session_think_modes_and_initial_state():
    model, tokenizer = tiny_model()
    session = ChatSession(model, tokenizer, sampling=CHAT_GREEDY, max_tokens=3, think="think")
    piece = next(session.stream("hi"))
    assert piece.prompt_tokens == len(tokenizer.encode("User: hi\n\nAssistant: <think"))
    with pytest.raises(InvalidArgumentError, match="think mode"):
        session.think = "sometimes"
    # starting from a given state is the same as having read what made it
    primer = "User: hi\n\nAssistant: Hello!\n\n"
    primed = ChatSession(model, tokenizer, sampling=CHAT_GREEDY, max_tokens=MAX_TOKENS,
                         state=cache_prompt(model, tokenizer, primer))
    turn = tokenizer.encode(format_chat_prompt("again"))
    assert primed.ask("again") == greedy_turn(model, tokenizer, tokenizer.encode(primer) + turn)[1].strip()


# --------------------------------------------------------------------------------------
# the terminal chat


class Terminal:
    """A child process on a pseudo-terminal: send lines, read until a marker appears."""

    def __init__(self, argv: list[str]):
        master, slave = os.openpty()
        env = dict(os.environ, TERM="dumb", PYTHONIOENCODING="utf-8")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(slave)
        self.fd = master
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} on the terminal; it shows {self.buffer[-400:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                assert data, f"the terminal closed before {marker!r}; it showed {self.buffer[-400:]!r}"
                self.buffer += self.decoder.decode(data)
        at = self.buffer.index(marker) + len(marker)
        out, self.buffer = self.buffer[:at], self.buffer[at:]
        return out

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


def reply(screen: str) -> str:
    """The assistant's answer on a screen that ends at the next prompt."""
    start = screen.index("Assistant:")
    return screen[start : screen.rindex("\r\n\r\nUser: ")]


def test_chat_command_in_a_pseudo_terminal(tmp_path):
    model, tokenizer = tiny_model()
    expected = ChatSession(model, tokenizer, sampling=CHAT_GREEDY, max_tokens=8)
    answer1 = "Assistant:" + "".join(p.text for p in expected.stream("hello"))
    answer2 = "Assistant:" + "".join(p.text for p in expected.stream("how are you"))
    saved = tmp_path / "talk.state"

    term = Terminal([sys.executable, "-c", "from rwkv_mlx.cli import main; main()", "chat",
                     "--model", str(tiny_model_path()), "--greedy", "--max-tokens", "8"])
    try:
        term.read_until("User: ")
        term.send("hello")
        assert reply(term.read_until("User: ")) == answer1.replace("\n", "\r\n")
        term.send(f"/save {saved}")
        assert "(saved 1 turns" in term.read_until("User: ")
        term.send("how are you")
        assert reply(term.read_until("User: ")) == answer2.replace("\n", "\r\n")
        term.send(f"/load {saved}")
        assert "(loaded" in term.read_until("User: ")
        term.send("how are you")  # from the saved state: the same second answer again
        assert reply(term.read_until("User: ")) == answer2.replace("\n", "\r\n")
        term.send("/reset")
        assert "(conversation reset)" in term.read_until("User: ")
        term.send("hello")
        assert reply(term.read_until("User: ")) == answer1.replace("\n", "\r\n")
        term.send("/think on")
        assert "(think mode think)" in term.read_until("User: ")
        term.send("hi")
        assert reply(term.read_until("User: ")).startswith("Assistant: <think")
        term.send("/load /no/such/file")
        assert "rwkv-mlx: error: /no/such/file: no such state file" in term.read_until("User: ")
        term.send("/system Speak in rhyme.")
        assert "(system prompt set; conversation reset)" in term.read_until("User: ")
        term.send("/quit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
    assert State.load(saved, model).batch_size == 1


def test_chat_command_refuses_a_state_of_another_model(tmp_path, capsys):
    other, tokenizer = tiny_model(seed=2)
    ChatSession(other, tokenizer).save(tmp_path / "other.state")
    code = run(["chat", "--model", str(tiny_model_path()), "--state", str(tmp_path / "other.state")])
    err = capsys.readouterr().err
    assert code == 3 and "other.state: this state belongs to" in err and "Traceback" not in err


def test_chat_command_starts_from_a_state_tuning_file(tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny_model()
    wkv = cache_prompt(model, tokenizer, "You are a pirate.\n\n").wkv
    write_torch_zip(tmp_path / "pirate.pth",
                    {f"blocks.{i}.att.time_state": np.array(w)[0].transpose(0, 2, 1) for i, w in enumerate(wkv)})
    expected = ChatSession(model, tokenizer, sampling=CHAT_GREEDY, max_tokens=6,
                           state=State.from_state_tuning(tmp_path / "pirate.pth", model))
    answer = "".join(p.text for p in expected.stream("ahoy"))
    plain = "".join(p.text for p in ChatSession(model, tokenizer, sampling=CHAT_GREEDY, max_tokens=6).stream("ahoy"))
    assert answer != plain

    lines = iter(["ahoy", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code = run(["chat", "--model", str(tiny_model_path()), "--state", str(tmp_path / "pirate.pth"), "--greedy",
                "--max-tokens", "6"])
    assert code == 0
    assert "Assistant:" + answer + "\n\n" in capsys.readouterr().out


def test_ctrl_c_clears_a_half_typed_line_and_leaves_at_an_empty_prompt():
    term = Terminal([sys.executable, "-c", "from rwkv_mlx.cli import main; main()", "chat",
                     "--model", str(tiny_model_path()), "--greedy", "--max-tokens", "8"])
    try:
        term.read_until("User: ")
        os.write(term.fd, b"half a thought")
        term.read_until("half a thought")  # echoed: readline holds it
        # (a pause before each signal: Python's readline notices a signal only while it waits for a key)
        time.sleep(0.5)
        term.proc.send_signal(signal.SIGINT)
        term.read_until("User: ")  # a fresh prompt: the chat goes on
        assert term.proc.poll() is None
        time.sleep(0.5)
        term.proc.send_signal(signal.SIGINT)  # nothing typed: leave
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
