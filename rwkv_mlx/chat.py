"""The G1 chat format: ``User: ...\\n\\nAssistant:`` turns (spec 7.2).

"\\n\\n" separates chat rounds in RWKV's training data, so messages are cleaned
(CRLF -> LF, runs of blank lines collapsed, stripped) before they are placed
in the template, and the model's turn ends at the first "\\n\\n".
"""

from __future__ import annotations

import re
from typing import Literal, Sequence

TURN_END = "\n\n"
ThinkMode = Literal["off", "think", "fast"]  # off: plain; think: "<think"; fast: empty think block

_THINK_SUFFIX = {"off": "", "think": " <think", "fast": " <think>\n</think>"}


def clean_message(text: str) -> str:
    """What BlinkDL's demos do to user text: no CRLF, no blank lines, no outer whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{2,}", "\n", text).strip()


def format_chat_prompt(
    user: str,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    think: ThinkMode = "off",
) -> str:
    """A complete prompt ending at the assistant's turn."""
    parts = []
    if system:
        parts.append(f"System: {clean_message(system)}{TURN_END}")
    for question, answer in history:
        parts.append(f"User: {clean_message(question)}{TURN_END}Assistant: {clean_message(answer)}{TURN_END}")
    parts.append(f"User: {clean_message(user)}{TURN_END}Assistant:{_THINK_SUFFIX[think]}")
    return "".join(parts)


def unescape_cli_text(text: str) -> str:
    """Backslash escapes typed on a command line (\\n, \\t, \\r, \\\\, \\", \\'), as llama.cpp's -e does."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(0)), text, flags=re.S)
