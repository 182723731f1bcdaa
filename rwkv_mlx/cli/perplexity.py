"""``rwkv-mlx perplexity``: how well a model predicts a text file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from . import app
from ..errors import InvalidArgumentError
from ..progress import Progress
from .common import DEVICE_OPTION, FILE_OPTION, MODEL_OPTION, load_for_cli, print_table, select_device


@app.command(help="Perplexity of a model on a text file: the text is read as one stream (state carried between "
                  "pieces of --seq-len tokens), every token predicted from all the text before it.")
def perplexity(
    model: Optional[Path] = MODEL_OPTION,
    file: Optional[str] = FILE_OPTION,
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    max_tokens: int = typer.Option(0, "--max-tokens", help="Score at most this many tokens (0: all)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per forward pass (the state carries across)."),
    streams: int = typer.Option(1, "--streams", help="Score the text as N rows side by side (faster, slightly less context)."),
    tail: float = typer.Option(1.0, "--tail", help="Score only the last fraction of the tokens (0.1: the held-out split of rwkv-mlx train)."),
    state: Optional[Path] = typer.Option(None, "--state", help="Start from a saved state (e.g. a state-tuned file)."),
    chunked: bool = typer.Option(False, "--chunked", help="Use the chunked WKV form (fast on GPUs without the fused kernel)."),
    device: str = DEVICE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    from ..model.state import State
    from ..train.data import read_text
    from ..train.evaluate import chunked_wkv, perplexity as score

    if not 0 < tail <= 1:
        raise InvalidArgumentError(f"--tail must be in (0, 1], got {tail}")
    if seq_len < 1 or streams < 1 or max_tokens < 0:
        raise InvalidArgumentError("--seq-len and --streams must be at least 1, --max-tokens at least 0")
    content = read_text(text)  # before the model loads: a missing or unreadable file costs nothing
    select_device(device)
    loaded, tokenizer, info = load_for_cli(model, file=file, quiet=quiet)
    tokens = tokenizer.encode(content)
    tokens = tokens[len(tokens) - int(round(len(tokens) * tail)):]  # as training holds out its validation split
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    initial = State.load(state, loaded, strict=False) if state else None
    bar = Progress("scoring", 1, " pieces", enabled=not quiet)
    start = time.perf_counter()
    with chunked_wkv(loaded, chunked):
        result = score(loaded, tokens, seq_len, streams, initial,
                       progress=lambda d, n: (setattr(bar, "total", n), bar.update(d)))
    seconds = time.perf_counter() - start
    bar.close()
    n_bytes = len(tokenizer.decode_bytes(tokens[1:]))
    print_table([
        ("model", info.path.name),
        ("text", f"{text.name}{f' (last {tail:.0%})' if tail < 1 else ''}"),
        ("tokens scored", f"{result.tokens:,}"),
        ("loss", f"{result.nll:.4f} nats/token"),
        ("perplexity", f"{result.ppl:.3f}"),
        ("bits per byte", f"{result.nll * result.tokens / max(1, n_bytes) / 0.6931471805599453:.4f}"),
        ("speed", f"{result.tokens / seconds:,.0f} tokens/s ({seconds:.1f} s)"),
    ])
