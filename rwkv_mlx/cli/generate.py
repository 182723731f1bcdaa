"""``rwkv-mlx generate``: stream a completion or a chat answer to stdout, statistics to stderr."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from ..text.chat import TURN_END, format_chat_prompt, unescape_cli_text
from ..errors import InvalidArgumentError, ModelFileError
from ..text.sample import SamplingParams
from .common import (
    DECAY_OPTION, DEVICE_OPTION, FILE_OPTION, FREQUENCY_OPTION, GREEDY_OPTION, MIN_P_OPTION, MODEL_OPTION, PRESENCE_OPTION,
    SCALE_DTYPE_OPTION, SEED_OPTION, STATE_OPTION, TEMPERATURE_OPTION, TOP_K_OPTION, TOP_P_OPTION, ThinkOption, load_for_cli,
    load_state_option, print_table, sampling_from_options, select_device,
)


@app.command(help="Generate text from a prompt (or chat with --chat). With no --model, runs the bundled "
                  "demo model: a 4-layer RWKV-7 trained here on Tiny Shakespeare (see README).")
def generate(
    model: Optional[Path] = MODEL_OPTION,
    file: Optional[str] = FILE_OPTION,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text ('-' or omitted: read stdin, as raw bytes). Escapes like \\n are processed unless --no-escape."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    min_p: Optional[float] = MIN_P_OPTION,
    presence_penalty: Optional[float] = PRESENCE_OPTION,
    frequency_penalty: Optional[float] = FREQUENCY_OPTION,
    penalty_decay: Optional[float] = DECAY_OPTION,
    seed: Optional[int] = SEED_OPTION,
    greedy: bool = GREEDY_OPTION,
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as 'User: ...\\n\\nAssistant:', stop at a blank line, ban end-of-text."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (chat mode)."),
    think: ThinkOption = typer.Option(ThinkOption.off, "--think", help="Chat: 'think' opens a <think> block, 'fast' an empty one."),
    stop: List[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    escape: bool = typer.Option(True, "--escape/--no-escape", help="Process \\n, \\t, \\\\ in --prompt/--system/--stop."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before the output (off by default, as mlx-lm: "
                                                    "stdout carries only the generated text, ready to pipe)."),
    device: str = DEVICE_OPTION,
    scale_dtype: str = SCALE_DTYPE_OPTION,
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print load time, speeds and peak memory to stderr."),
    state: Optional[Path] = STATE_OPTION,
    check_finite: bool = typer.Option(False, "--check-finite", help="If the logits turn NaN or infinite, stop with an error naming the first layer that produced them."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Constrain the output to JSON that this JSON-schema file accepts."),
    grammar: Optional[Path] = typer.Option(None, "--grammar", help="Constrain the output to this GBNF grammar file (llama.cpp syntax, a 'root' rule)."),
    save_state: Optional[Path] = typer.Option(None, "--save-state", help="Save the state after the prompt to FILE (as "
                                              "mlx_lm.cache_prompt); continue from it later with --state FILE."),
) -> None:
    entered = time.perf_counter()
    select_device(device)
    constraint = constraint_options(json_schema, grammar)
    if prompt is None or prompt == "-":
        # bytes, not text: invalid UTF-8 and NULs reach the tokenizer unchanged (as PEP 383 escapes until then)
        data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
        prompt = data.decode("utf-8", "surrogateescape")
    elif escape:
        prompt = unescape_cli_text(prompt)
    if escape:
        system = unescape_cli_text(system) if system else system
        stop = [unescape_cli_text(s) for s in stop]
    if not prompt:
        raise InvalidArgumentError("no prompt: pass --prompt TEXT or pipe text on stdin")

    if think != ThinkOption.off and not chat:
        raise InvalidArgumentError("--think needs --chat")
    if chat:
        sampling = SamplingParams.chat()
        prompt = format_chat_prompt(prompt, system=system, think=think.value)
        stop = [*stop, TURN_END]
    else:
        sampling = SamplingParams()
        if system:
            raise InvalidArgumentError("--system needs --chat")
    sampling = sampling_from_options(sampling, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                                     min_p=min_p, presence_penalty=presence_penalty,
                                     frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, seed=seed)
    sampling = sampling.replace(**constraint)

    clock = Stopwatch(entered)
    loaded, tokenizer, info = load_for_cli(model, file=file, scale_dtype=scale_dtype, quiet=not stats)
    clock.lap("load")
    from ..text.generate import cache_prompt, stream_generate
    from ..progress import Progress

    prompt_bytes = as_given(prompt)
    prompt_ids = tokenizer.encode(prompt_bytes)
    n_prompt = len(prompt_ids)
    clock.lap("tokenize")
    bar = Progress("prefill", len(prompt_ids), " tok", enabled=stats and len(prompt_ids) > 2048)
    if echo:
        sys.stdout.flush()
        sys.stdout.buffer.write(prompt_bytes if isinstance(prompt_bytes, bytes) else prompt.encode("utf-8", "replace"))
    last, fed = None, list(prompt_ids)
    initial = load_state_option(state, loaded)
    if save_state is not None:  # the prompt but its last token read once; that token both ends the saved state and starts generation
        initial = cache_prompt(loaded, tokenizer, prompt_ids[:-1], initial) if len(prompt_ids) > 1 else initial
        cache_prompt(loaded, tokenizer, prompt_ids[-1:], initial).save(save_state)
        prompt_ids = prompt_ids[-1:]
    clock.lap("prefill" if save_state is not None else "other")
    try:
        for last in stream_generate(loaded, tokenizer, prompt_ids, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                    state=initial, prefill_progress=bar.update):
            clock.lap("prefill" if last.generation_tokens == 1 else "generation")
            if check_finite and not math.isfinite(last.logprob):
                raise_nonfinite(loaded, info.path, fed)
            fed.append(last.token)
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:  # the text so far, a newline and the statistics so far; then exit 130
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats:
            print_stats(clock, info, last, n_prompt, sampling, "interrupted", save_state)
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats and last is not None:
        print_stats(clock, info, last, n_prompt, sampling, last.finish_reason, save_state)


class Stopwatch:
    """Wall time by phase, from the process's start: the phases add up to the total."""

    def __init__(self, entered: float):
        started = process_started()
        self.phases = {"startup": entered - started}
        self.started, self.last = started, entered

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def ms(self, phase: str) -> str:
        return f"{self.phases.get(phase, 0.0) * 1000:.0f} ms"


def process_started() -> float:
    """``perf_counter`` value when this process started (Linux: from /proc, 10 ms ticks; else when rwkv_mlx was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.perf_counter() - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        from .. import _IMPORT_STARTED

        return _IMPORT_STARTED


def print_stats(clock: Stopwatch, info, last, prompt_tokens: int, sampling: SamplingParams, finish: str | None,
                saved: Path | None) -> None:
    clock.lap("other")
    generated = last.generation_tokens if last is not None else 0
    decode_s = clock.phases.get("generation", 0.0)
    total = clock.last - clock.started
    print_table([
        ("model", info.path.name),
        ("startup", f"{clock.ms('startup')} (interpreter, imports)"),
        ("load", f"{clock.ms('load')} (weights and vocabulary)"),
        ("tokenize", f"{clock.ms('tokenize')} ({prompt_tokens} prompt tokens)"),
        ("prefill", f"{clock.ms('prefill')} ({prompt_tokens} tokens and the first generated one)"
                    if generated else f"{clock.ms('prefill')} (unfinished)"),
        ("generation", f"{clock.ms('generation')} ({generated} tokens, "
                       f"{(generated - 1) / decode_s if decode_s > 0 else 0:.1f} tok/s after the first; {finish})"),
        ("other", f"{clock.ms('other')} (arguments, sampler set-up, state files, output)"),
        ("total", f"{total * 1000:.0f} ms wall"),
        *([("saved state", f"{saved} (after the prompt)")] if saved else []),
        ("peak memory", f"{last.peak_memory_gb:.3f} GB" if last is not None else "-"),
        ("seed", str(sampling.seed) if sampling.seed is not None else "random"),
    ], stream=sys.stderr)


def constraint_options(json_schema: Path | None, grammar: Path | None) -> dict:
    """``SamplingParams`` fields for --json-schema / --grammar, compiled now so that a bad file fails
    before the model loads: an unreadable file or invalid JSON exits 3, a schema or grammar we
    cannot use exits 2, each with one line naming the file."""
    if json_schema is None and grammar is None:
        return {}
    if json_schema is not None and grammar is not None:
        raise InvalidArgumentError("give --json-schema or --grammar, not both")
    import json

    from ..text.grammar import GrammarError, compile_constraint

    path = json_schema if json_schema is not None else grammar
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    if json_schema is not None:
        try:
            fields = {"json_schema": json.loads(text)}
        except ValueError as e:
            raise ModelFileError(path, f"not valid JSON: {e}") from None
    else:
        fields = {"grammar": text}
    try:
        compile_constraint(**fields)
    except GrammarError as e:
        raise type(e)(f"{path}: {e}") from None
    return fields


def as_given(text: str) -> bytes | str:
    """The bytes the user gave: argv and stdin bytes that are not UTF-8 arrive as surrogate
    escapes (PEP 383) and go back to exactly those bytes; other lone surrogates stay text."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text


def raise_nonfinite(model, path, tokens: list[int]) -> None:
    """One error line naming the first module output that holds NaN or inf for ``tokens``."""
    from ..model.debug import find_first_nonfinite

    where = find_first_nonfinite(model, tokens)
    found = f"first non-finite output: {where}" if where else "a layer-by-layer rerun found every output finite"
    raise ModelFileError(path, f"logits are NaN or infinite after {len(tokens)} tokens; {found}")
