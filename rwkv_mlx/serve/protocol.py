"""The OpenAI wire format: request bodies in (validated), a :class:`Spec` for the engine out, response bodies.

Sampling follows RWKV semantics (``rwkv_mlx.text.sample``): temperature is applied
after top-p/top-k, and the presence/frequency penalties decay and count only
generated tokens. Fields a request leaves out take the ``rwkv`` reference
defaults: ``SamplingParams.chat()`` for chat, ``SamplingParams()`` for
completions.

Chat prompts are the G1 format of ``rwkv-mlx chat`` (``rwkv_mlx.text.chat``), read
as segments that end at message boundaries: the system turn, each past
exchange (user + assistant), the new user turn with ``Assistant:``. Each
segment is tokenized alone, so the token ids of a conversation's prefix do not
change when it grows, and the state cache can key checkpoints by token prefix.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidArgumentError
from ..text.sample import SamplingParams
from ..text.chat import THINK_MODES, TURN_END, assistant_prefix, clean_message, system_prompt
from .constraints import constraint_fields
from .errors import APIError, bad_request

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # state names: no path separators, no dot files
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Spec:
    """One request, validated and tokenized: everything the engine needs and nothing HTTP."""

    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    checkpoints: tuple[int, ...] = ()  # prompt positions (message boundaries) whose state the cache keeps
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    think: str = "off"
    stop_at_end_of_text: bool = True  # False: the ``ignore_eos`` extension (fixed-length benchmarks)
    initial_state: str | None = None  # a name in the server's state directory
    save_state: str | None = None  # save the final state under this name
    #: chat: the token ids under which the conversation continues once the answer is resent
    #: (``turn_key(answer_text)``); the engine checkpoints the turn only when they are exactly what it read.
    turn_key: Callable[[str], list[int]] | None = field(default=None, repr=False)
    close_turn: list[int] = field(default_factory=list)  # tokens that end a turn cut short (chat: "\n\n")


# -- field readers: each names the field and the problem ------------------------------------


def _get(body: dict, name: str, types, default=None, *, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"{name} must be {what}, got {value!r}", name)
    if not isinstance(value, types):
        raise bad_request(f"{name} must be {what}, got {type(value).__name__}", name)
    return value


MAX_PENALTY = 1e3  # OpenAI allows [-2, 2]; RWKV's decaying penalties are used up to about 1


def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None):
    value = _get(body, name, (int, float), what="a number")
    if value is not None and (not math.isfinite(value) or (lo is not None and value < lo)
                              or (hi is not None and value > hi)):
        bounds = f" in [{lo:g}, {hi:g}]" if hi is not None else f" >= {lo:g}" if lo is not None else ""
        raise bad_request(f"{name} must be a finite number{bounds}, got {value!r}", name)
    return value


def _integer(body: dict, name: str, lo: int, hi: int | None = None):
    value = _get(body, name, int, what="an integer")
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad_request(f"{name} must be an integer {bounds}, got {value}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def state_name(body: dict, name: str) -> str | None:
    value = _get(body, name, str, what="a state name")
    if value is not None and not NAME_PATTERN.fullmatch(value):
        raise bad_request(f"{name} must be a name of letters, digits, '.', '_' or '-' (no path), got {value!r}", name)
    return value


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...] | None:
    """OpenAI's logit_bias: an object from token ids (as JSON keys, so decimal strings) to numbers; ranges are
    SamplingParams.validate's."""
    value = _get(body, "logit_bias", dict, what="an object from token ids to biases")
    if value is None:
        return None
    pairs = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise bad_request(f"logit_bias keys must be token ids (decimal integers), got {key!r}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise bad_request(f"logit_bias[{key}] must be a number, got {type(bias).__name__}", "logit_bias")
        pairs.append((int(key), bias))
    return tuple(pairs)


def _sampling(body: dict, base: SamplingParams, vocab_size: int) -> SamplingParams:
    knobs = {
        "logit_bias": _logit_bias(body),
        "temperature": _number(body, "temperature", 0.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "top_k": _integer(body, "top_k", 0),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        # bounded so that a penalty stays finite in float32 (1e39 times zero counts is NaN logits)
        "presence_penalty": _number(body, "presence_penalty", -MAX_PENALTY, MAX_PENALTY),
        "frequency_penalty": _number(body, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY),
        "penalty_decay": _number(body, "penalty_decay", 0.0, 1.0),
        "seed": _integer(body, "seed", 0, 2**64 - 1),
    }
    try:
        return base.replace(**{k: v for k, v in knobs.items() if v is not None}).validate(vocab_size)
    except InvalidArgumentError as e:
        raise bad_request(str(e)) from None


def _common(body: dict, *, kind: str, model_name: str, vocab_size: int, max_tokens_cap: int,
            base: SamplingParams) -> dict:
    """The fields both endpoints share, checked."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    # absent means the one model served, as llama-server and mlx_lm.server take it (curl users omit it)
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise bad_request("model must be a string (GET /v1/models lists this server's)", "model")
    if model != model_name:
        raise APIError(404, f"model {model!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request("n must be 1: one completion per request", "n")
    max_tokens = _integer(body, "max_completion_tokens", 1) if kind == "chat" else None
    max_tokens = max_tokens or _integer(body, "max_tokens", 1) or max_tokens_cap
    stream = _get(body, "stream", bool, False, what="true or false")
    options = _get(body, "stream_options", dict, {}, what="an object")
    include_usage = _get(options, "include_usage", bool, False, what="true or false")
    return dict(
        sampling=_sampling(body, base, vocab_size).replace(**constraint_fields(body)),
        max_tokens=min(max_tokens, max_tokens_cap),
        stop=_stops(body),
        stream=stream,
        include_usage=include_usage,
        stop_at_end_of_text=not _get(body, "ignore_eos", bool, False, what="true or false"),
        initial_state=state_name(body, "initial_state"),
        save_state=state_name(body, "save_state"),
    )


def _check_prompt_length(ids: list[int], cap: int) -> None:
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    if len(ids) > cap:
        raise bad_request(f"the prompt has {len(ids)} tokens; this server accepts at most {cap}", "messages",
                          "context_length_exceeded")


def parse_completion(body: dict, tokenizer, *, model_name: str, max_tokens_cap: int,
                     max_prompt_tokens: int) -> Spec:
    """POST /v1/completions: a raw text prompt (or token ids), continued as written."""
    common = _common(body, kind="completion", model_name=model_name, vocab_size=tokenizer.vocab_size,
                     max_tokens_cap=max_tokens_cap, base=SamplingParams())
    if body.get("suffix") is not None:
        raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
    if body.get("echo"):
        raise bad_request("echo is not supported", "echo")
    best_of = _integer(body, "best_of", 1)
    if best_of is not None and best_of != 1:  # n more drawn, the best returned: as n, one per request
        raise bad_request("best_of must be 1: one completion per request", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {tokenizer.vocab_size - 1}]", "prompt")
        ids = list(prompt)
    else:
        raise bad_request("prompt must be a string, a one-string list or a list of token ids", "prompt")
    _check_prompt_length(ids, max_prompt_tokens)
    logprobs = _integer(body, "logprobs", 0, 5)
    return Spec(kind="completion", prompt_ids=ids, logprobs=logprobs is not None, top_logprobs=logprobs or 0,
                **common)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
    return content


def assistant_turn(content: str) -> str:
    """A past answer as the conversation reads it: ``Assistant:`` and the text, ending the turn.

    The server returns the model's text verbatim (it normally starts with the
    space or newline the model chose after ``Assistant:``), so a resent answer
    is exactly what the model wrote; an answer without leading whitespace gets
    the one space of ``rwkv_mlx.text.chat.format_chat_prompt``.
    """
    text = content.replace("\r\n", "\n").replace("\r", "\n").rstrip()
    text = re.sub(r"\n{2,}", "\n", text)
    if not text[:1].isspace():
        text = " " + text.lstrip()
    return f"Assistant:{text}{TURN_END}"


def chat_segments(messages: list, think: str) -> tuple[list[str], str]:
    """(closed segments, the open last segment) of a conversation in the G1 format."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    segments: list[str] = []
    pending_user: str | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role, content = m.get("role"), _content(m, i)
        if role in ("system", "developer"):
            if segments or pending_user is not None:
                raise bad_request(f"messages[{i}]: a system message may only open the conversation", f"messages[{i}]")
            if clean_message(content):
                segments.append(system_prompt(content))
        elif role == "user":
            if pending_user is not None:
                raise bad_request(f"messages[{i}]: two user messages in a row; join them", f"messages[{i}]")
            pending_user = f"User: {clean_message(content)}{TURN_END}"
        elif role == "assistant":
            if pending_user is None:
                raise bad_request(f"messages[{i}]: an assistant message must answer a user message", f"messages[{i}]")
            segments.append(pending_user + assistant_turn(content))
            pending_user = None
        else:
            raise bad_request(f"messages[{i}].role {role!r} is not supported (system, user, assistant)",
                              f"messages[{i}].role")
    if pending_user is None:
        raise bad_request("the last message must be a user message", "messages")
    return segments, pending_user + assistant_prefix(think)


def parse_chat(body: dict, tokenizer, *, model_name: str, max_tokens_cap: int, max_prompt_tokens: int,
               default_think: str = "off") -> Spec:
    """POST /v1/chat/completions: messages in the G1 chat format, stopping at the end of the turn."""
    common = _common(body, kind="chat", model_name=model_name, vocab_size=tokenizer.vocab_size,
                     max_tokens_cap=max_tokens_cap, base=SamplingParams.chat())
    think = _get(body, "think", str, default_think, what=f"one of {', '.join(THINK_MODES)}")
    if think not in THINK_MODES:
        raise bad_request(f"think must be one of {', '.join(THINK_MODES)}, got {think!r}", "think")
    for unsupported in ("tools", "functions", "tool_choice"):
        if body.get(unsupported):
            raise bad_request(f"{unsupported} is not supported", unsupported)
    closed, last = chat_segments(body.get("messages"), think)
    ids: list[int] = []
    checkpoints = []
    for segment in closed:
        ids += tokenizer.encode(segment)
        checkpoints.append(len(ids))
    prefix_len = len(ids)
    user = last[: last.index(TURN_END) + len(TURN_END)]
    ids += tokenizer.encode(last)
    _check_prompt_length(ids, max_prompt_tokens)
    prefix = ids[:prefix_len]

    def turn_key(answer: str) -> list[int]:
        return prefix + tokenizer.encode(user + assistant_turn(split_reasoning(answer, think)[1]))

    logprobs = _get(body, "logprobs", bool, False, what="true or false")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    return Spec(kind="chat", prompt_ids=ids, checkpoints=tuple(checkpoints), logprobs=logprobs or top > 0,
                top_logprobs=top, think=think, turn_key=turn_key, close_turn=tokenizer.encode(TURN_END),
                **{**common, "stop": [TURN_END, *common["stop"]]})


# -- reasoning (G1's <think> block) ------------------------------------------------------------


def split_reasoning(text: str, think: str) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole answer; reasoning only in the 'think' mode."""
    splitter = ReasoningSplitter(think)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    reasoning = r1 + r2
    return (reasoning if think == "think" else None), c1 + c2


class ReasoningSplitter:
    """Streams an answer into reasoning (before ``</think>``) and content (after), holding back a
    partial ``</think>``. In the 'think' mode the prompt ends with ``<think``, so the model's first
    character is normally the tag's ``>``, which is not reasoning."""

    def __init__(self, think: str):
        self.in_reasoning = think == "think"
        self.started = False
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", text
        self.pending += text
        if not self.started and self.pending:
            self.started = True
            if self.pending.startswith(">"):
                self.pending = self.pending[1:]
        at = self.pending.find(THINK_CLOSE)
        if at >= 0:
            reasoning, content = self.pending[:at], self.pending[at + len(THINK_CLOSE):]
            self.pending, self.in_reasoning = "", False
            return reasoning, content
        hold = next((n for n in range(min(len(THINK_CLOSE) - 1, len(self.pending)), 0, -1)
                     if self.pending.endswith(THINK_CLOSE[:n])), 0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, ""

    def flush(self) -> tuple[str, str]:
        out, self.pending = self.pending, ""
        return (out, "") if self.in_reasoning else ("", out)


# -- responses ---------------------------------------------------------------------------------

FINISH = {"stop": "stop", "eot": "stop", "length": "length"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(spec: Spec, request_id: str, model_name: str, created: int | None = None, *, chunk: bool) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if spec.kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created or int(time.time()), "model": model_name}


def chat_logprobs(entries: list[dict]) -> dict:
    return {"content": entries}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The legacy completions layout, from chat-style entries."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}
