"""The G1 chat format: ``User: ...\\n\\nAssistant:`` turns (spec 7.2).

"\\n\\n" separates chat rounds in RWKV's training data, so messages are cleaned
(CRLF -> LF, runs of blank lines collapsed, stripped) before they are placed
in the template, and the model's turn ends at the first "\\n\\n".

:class:`ChatSession` holds a conversation as the model's state: each turn
reads only the new message, never the history.
"""

from __future__ import annotations

import json
import re
from typing import Iterator, Literal, Sequence

from ..errors import InvalidArgumentError, ModelFileError
from .generate import GenerationResponse, cache_prompt, stream_generate
from .sample import SamplingParams
from ..model.state import State

TURN_END = "\n\n"
ThinkMode = Literal["off", "think", "fast"]  # off: plain; think: "<think"; fast: empty think block

_THINK_SUFFIX = {"off": "", "think": " <think", "fast": " <think>\n</think>"}
THINK_MODES: tuple[str, ...] = tuple(_THINK_SUFFIX)


def clean_message(text: str) -> str:
    """What BlinkDL's demos do to user text: no CRLF, no blank lines, no outer whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{2,}", "\n", text).strip()


def system_prompt(system: str) -> str:
    """The system turn that opens a conversation (read once, then kept as a state)."""
    return f"System: {clean_message(system)}{TURN_END}"


def assistant_prefix(think: ThinkMode = "off") -> str:
    """What opens the assistant's turn: ``Assistant:`` and, in a think mode, the think tag."""
    return f"Assistant:{_THINK_SUFFIX[think]}"


def format_chat_prompt(
    user: str,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    think: ThinkMode = "off",
) -> str:
    """A complete prompt ending at the assistant's turn."""
    parts = []
    if system:
        parts.append(system_prompt(system))
    for question, answer in history:
        parts.append(f"User: {clean_message(question)}{TURN_END}Assistant: {clean_message(answer)}{TURN_END}")
    parts.append(f"User: {clean_message(user)}{TURN_END}{assistant_prefix(think)}")
    return "".join(parts)


def unescape_cli_text(text: str) -> str:
    """Backslash escapes typed on a command line (\\n, \\t, \\r, \\\\, \\", \\'), as llama.cpp's -e does."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(0)), text, flags=re.S)


class ChatSession:
    """A multi-turn chat that carries the model's state instead of re-reading the history.

        session = ChatSession(model, tokenizer, system="You are terse.")
        print(session.ask("Why is the sky blue?"))
        for piece in session.stream("And the sunset?"):
            print(piece.text, end="")

    Each turn reads only ``User: ...\\n\\nAssistant:`` from the state left by
    the previous turn, generates until "\\n\\n" and keeps the state after the
    answer.  The system prompt is read once; :meth:`reset` returns to it at no
    cost.  ``state`` starts the conversation from a given state instead of
    zeros (e.g. ``State.from_state_tuning(...)``).  A turn that is interrupted
    (the stream not consumed to its end) is forgotten.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, sampling: SamplingParams | None = None,
                 think: ThinkMode = "off", max_tokens: int = 1024, state: State | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingParams.chat()
        self.max_tokens = max_tokens
        self.think = think
        self.initial_state = state
        self._system: str | None = None
        self._base = None  # the state after the system prompt, computed on first use
        self.set_system(system)

    # -- settings ---------------------------------------------------------------------

    @property
    def think(self) -> ThinkMode:
        return self._think

    @think.setter
    def think(self, mode: str) -> None:
        if mode not in THINK_MODES:
            raise InvalidArgumentError(f"think mode must be one of {', '.join(THINK_MODES)}, got {mode!r}")
        self._think = mode

    @property
    def system(self) -> str | None:
        return self._system

    def set_system(self, system: str | None) -> None:
        """A new system prompt starts a new conversation."""
        self._system = clean_message(system) if system else None
        self._base = None
        self.reset()

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt (its state is cached)."""
        self.state = None  # None: the conversation has not started, begin from base_state()
        self.history: list[tuple[str, str]] = []

    def base_state(self) -> State:
        """The state a new conversation starts from: after the system prompt, if any."""
        if self._base is None:
            start = self.initial_state
            if self._system:
                self._base = cache_prompt(self.model, self.tokenizer, system_prompt(self._system), start)
            else:
                self._base = start if start is not None else State.zeros(self.model.args).owned_by(self.model)
        return self._base

    def current_state(self) -> State:
        return self.state if self.state is not None else self.base_state()

    # -- turns ----------------------------------------------------------------------------

    def stream(self, text: str) -> Iterator[GenerationResponse]:
        """Yield the answer as :class:`GenerationResponse` pieces; the state advances when it ends."""
        prompt = format_chat_prompt(text, think=self._think)
        pieces, last = [], None
        for last in stream_generate(self.model, self.tokenizer, prompt, state=self.current_state(),
                                    max_tokens=self.max_tokens, sampling=self.sampling, stop=[TURN_END],
                                    return_state=True):
            pieces.append(last.text)
            yield last
        state = last.state
        if last.finish_reason != "stop":  # cut short: close the turn so the next one starts cleanly
            state = cache_prompt(self.model, self.tokenizer, TURN_END, state)
        self.state = state
        self.history.append((text, "".join(pieces)))

    def ask(self, text: str) -> str:
        """The whole answer (outer whitespace stripped)."""
        return "".join(piece.text for piece in self.stream(text)).strip()

    # -- files ------------------------------------------------------------------------------

    def save(self, path):
        """Save the conversation's state with the system prompt, think mode and history."""
        meta = {"chat": json.dumps({"system": self._system, "think": self._think, "history": self.history})}
        return self.current_state().save(path, self.model, metadata=meta)

    def load(self, path) -> None:
        """Continue a conversation saved by :meth:`save` (or any state saved for this model)."""
        state, meta = State.load(path, self.model, return_metadata=True)
        if state.batch_size != 1:
            raise ModelFileError(path, f"a chat needs a single state, this file holds a batch of {state.batch_size}")
        try:
            chat = json.loads(meta.get("chat", "{}"))
            system, think = chat.get("system"), chat.get("think", self._think)
            history = [(str(q), str(a)) for q, a in chat.get("history", [])]
        except (ValueError, TypeError, AttributeError):
            raise ModelFileError(path, "chat metadata is not valid JSON") from None
        self.set_system(system)
        if think in THINK_MODES:
            self._think = think
        self.state = state
        self.history = history
