"""Pieces every command shares: device choice, loading with progress, tables."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Sequence

import typer

from ..backend import select_device  # noqa: F401 - the commands import it from here
from ..errors import InvalidArgumentError
from ..progress import Progress
from ..text.sample import SamplingParams


def resolve_model(path: Path | None) -> Path:
    """--model's path, or the bundled demo model where none is named."""
    if path is None:
        from ..loader import demo_model

        return demo_model()
    return path


def load_for_cli(path: Path | None, *, scale_dtype: str = "float32", quiet: bool = False, file: str | None = None):
    from ..loader import load
    from ..model.weights import LoadOptions

    if scale_dtype not in ("float32", "float16", "bfloat16"):
        raise InvalidArgumentError(f"--scale-dtype must be float32, float16 or bfloat16, got {scale_dtype!r}")
    path = resolve_model(path)
    bar = Progress(f"loading {path.name}", 1, enabled=not quiet)
    model, tokenizer, info = load(path, LoadOptions.for_backend(scale_dtype=scale_dtype), return_info=True, file=file,
                                  progress=lambda done, total, name: (setattr(bar, "total", total), bar.update(done, name)))
    bar.close(f"{info.weight_bytes / 1e6:.1f} MB of weights")
    return model, tokenizer, info


STATE_OPTION = typer.Option(None, "--state", help="Start from a saved state (State.save, chat's /save) or a BlinkDL state-tuning .pth file.")


def load_state_option(path: Path | None, model):
    """The starting state a --state option names (None: a zero state)."""
    if path is None:
        return None
    from ..model.state import State

    return State.from_state_tuning(path, model) if path.suffix == ".pth" else State.load(path, model)


def print_table(rows: Sequence[tuple[str, ...]], stream=None, header: tuple[str, ...] | None = None) -> None:
    """A table of any number of columns; markdown-compatible so it can be pasted into results/."""
    stream = stream or sys.stdout
    header = header or ("metric", "value")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |\n"
    stream.write(line(header) + "|" + "|".join("-" * (w + 2) for w in widths) + "|\n")
    for r in rows:
        stream.write(line(r))
    stream.flush()


class ThinkOption(str, Enum):
    off = "off"
    think = "think"
    fast = "fast"


# --- options shared by generate and chat --------------------------------------------------

MODEL_OPTION = typer.Option(None, "--model", "-m", help="GGUF file, converted MLX directory, .pth file, Hugging Face directory, "
                                                        "or a Hub repo: ORG/REPO, ORG/REPO:QUANT (e.g. :Q4_K_M); "
                                                        "default: the bundled demo model.")
FILE_OPTION = typer.Option(None, "--file", help="With --model ORG/REPO: the .gguf, .pth or .safetensors file of the repo to load.")
TEMPERATURE_OPTION = typer.Option(None, "--temperature", "--temp", help="Applied after top-p/top-k (RWKV semantics); 0 = greedy.")
TOP_P_OPTION = typer.Option(None, "--top-p", help="Nucleus cutoff (default 0.85, chat 0.3); 0 = greedy.")
TOP_K_OPTION = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off).")
MIN_P_OPTION = typer.Option(None, "--min-p", help="Keep tokens with p >= min_p * p_max (0 = off).")
PRESENCE_OPTION = typer.Option(None, "--presence-penalty", help="Subtracted once from every token already generated (default 0.2, chat 0.5).")
FREQUENCY_OPTION = typer.Option(None, "--frequency-penalty", help="Subtracted per (decayed) occurrence (default 0.2, chat 0.5).")
DECAY_OPTION = typer.Option(None, "--penalty-decay", help="Occurrence counts are multiplied by this each step (default 0.996).")
SEED_OPTION = typer.Option(None, "--seed", help="Random seed; the same seed reproduces a run.")
GREEDY_OPTION = typer.Option(False, "--greedy", help="Always take the most likely token, no penalties.")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto, gpu or cpu.")
SCALE_DTYPE_OPTION = typer.Option("float32", "--scale-dtype", help="Affine scale dtype: float32 (exact) or float16 "
                                  "(1 bit/weight smaller); GGUF blocks on GPUs are kept as stored.")


def sampling_from_options(base: SamplingParams, *, greedy: bool = False, **knobs) -> SamplingParams:
    """``base`` (or greedy decoding, keeping its bans) with the knobs the user gave (None = not given)."""
    if greedy:
        base = SamplingParams.greedy(banned_tokens=base.banned_tokens)
    return base.replace(**{k: v for k, v in knobs.items() if v is not None}).validate()
