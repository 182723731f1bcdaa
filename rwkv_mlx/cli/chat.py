"""``rwkv-mlx chat``: an interactive terminal chat that carries the model's state across turns.

Each turn reads only the new message (``User: ...\\n\\nAssistant:``) from the
state the previous answer left; the history is never re-read.  Answers stream
to stdout; command feedback and statistics go to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import app
from ..text.chat import THINK_MODES, ChatSession, assistant_prefix, unescape_cli_text
from ..errors import InvalidArgumentError, RwkvMlxError
from ..text.sample import SamplingParams
from .common import (
    DECAY_OPTION, DEVICE_OPTION, FILE_OPTION, FREQUENCY_OPTION, GREEDY_OPTION, MIN_P_OPTION, MODEL_OPTION, PRESENCE_OPTION,
    SCALE_DTYPE_OPTION, SEED_OPTION, STATE_OPTION, TEMPERATURE_OPTION, TOP_K_OPTION, TOP_P_OPTION, ThinkOption,
    load_for_cli, load_state_option, sampling_from_options, select_device,
)

# --- the chat loop ------------------------------------------------------------------------

HELP = ("commands: /reset (forget the conversation), /save FILE, /load FILE, /system TEXT (new system prompt, "
        "new conversation), /think on|off|fast, /quit (or exit, quit, Ctrl-C at an empty prompt, Ctrl-D)")
_THINK_WORDS = {"on": "think", "think": "think", "off": "off", "fast": "fast"}
QUIT_WORDS = ("exit", "quit", "/quit", "/exit", "/q")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _enable_line_editing() -> None:
    """Arrow keys and history for input(), where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on for input())
    except ImportError:
        pass


def _typed_so_far() -> str:
    """The text on the prompt line when Ctrl-C came (readline keeps it); empty without readline."""
    readline = sys.modules.get("readline")
    try:
        return readline.get_line_buffer() if readline is not None else ""
    except Exception:  # an input() not served by readline (a pipe): nothing was being edited
        return ""


def _run_command(session: ChatSession, line: str) -> bool:
    """Carry out one /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in QUIT_WORDS:
        return False
    if name == "/reset":
        session.reset()
        _note("(conversation reset)")
    elif name == "/save":
        if not arg:
            raise InvalidArgumentError("/save needs a file name")
        path = session.save(Path(arg).expanduser())
        _note(f"(saved {len(session.history)} turns to {path}, {path.stat().st_size / 1024:.1f} KiB)")
    elif name == "/load":
        if not arg:
            raise InvalidArgumentError("/load needs a file name")
        session.load(Path(arg).expanduser())
        _note(f"(loaded {arg}: {len(session.history)} turns, think {session.think}"
              f"{', system: ' + session.system if session.system else ''})")
    elif name == "/system":
        session.set_system(unescape_cli_text(arg) if arg else None)
        _note("(system prompt set; conversation reset)" if arg else "(system prompt cleared; conversation reset)")
    elif name == "/think":
        if arg not in _THINK_WORDS:
            raise InvalidArgumentError(f"/think takes on, off or fast, got {arg!r}")
        session.think = _THINK_WORDS[arg]
        _note(f"(think mode {session.think})")
    elif name == "/help":
        _note(HELP)
    else:
        raise InvalidArgumentError(f"unknown command {name}; {HELP}")
    return True


def _answer(session: ChatSession, text: str, stats: bool) -> None:
    shown = assistant_prefix(session.think if session.think == "think" else "off")
    sys.stdout.write(shown)
    sys.stdout.flush()
    last = None
    try:
        for last in session.stream(text):
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        _note("(interrupted: this turn is forgotten)")
        return
    sys.stdout.write("\n\n")
    sys.stdout.flush()
    if stats and last is not None:
        _note(f"({last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generation_tokens} generated "
              f"at {last.generation_tps:.1f} tok/s, {last.finish_reason})")


@app.command(help="Chat in the terminal. The conversation is kept as the model's state, so each turn reads only "
                  "the new message. Commands: /reset, /save FILE, /load FILE, /system TEXT, /think on|off|fast, /quit.")
def chat(
    model: Optional[Path] = MODEL_OPTION,
    file: Optional[str] = FILE_OPTION,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt, read once at the start (escapes like \\n processed)."),
    think: ThinkOption = typer.Option(ThinkOption.off, "--think", help="'think' opens a <think> block, 'fast' an empty one."),
    state: Optional[Path] = STATE_OPTION,
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    min_p: Optional[float] = MIN_P_OPTION,
    presence_penalty: Optional[float] = PRESENCE_OPTION,
    frequency_penalty: Optional[float] = FREQUENCY_OPTION,
    penalty_decay: Optional[float] = DECAY_OPTION,
    seed: Optional[int] = SEED_OPTION,
    greedy: bool = GREEDY_OPTION,
    device: str = DEVICE_OPTION,
    scale_dtype: str = SCALE_DTYPE_OPTION,
    stats: bool = typer.Option(False, "--stats/--no-stats", help="After each answer, print token counts and speeds to stderr."),
) -> None:
    select_device(device)
    sampling = sampling_from_options(
        SamplingParams.chat(), greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, seed=seed)
    loaded, tokenizer, _ = load_for_cli(model, file=file, scale_dtype=scale_dtype)
    initial = load_state_option(state, loaded)
    session = ChatSession(loaded, tokenizer, system=unescape_cli_text(system) if system else None, sampling=sampling,
                          think=think.value, max_tokens=max_tokens, state=initial)
    _enable_line_editing()
    _note(f"{HELP}; think modes: {', '.join(THINK_MODES)}")
    while True:
        try:
            line = input("User: ").strip()
        except EOFError:
            sys.stdout.write("\n")
            break
        except KeyboardInterrupt:  # Ctrl-C: clears a half-typed line; at an empty prompt, leaves
            sys.stdout.write("\n")
            if _typed_so_far():
                continue
            break
        if not line:
            continue
        if line in QUIT_WORDS:  # as typed alone; "/quit" works too
            break
        if line.startswith("/"):
            try:
                if not _run_command(session, line):
                    break
            except RwkvMlxError as e:
                _note(f"rwkv-mlx: error: {e}")
            continue
        _answer(session, line, stats)
