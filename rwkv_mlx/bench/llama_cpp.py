"""llama.cpp's llama-bench on the same GGUF file as ``rwkv-mlx benchmark``: its command, its JSON, the ratios.

``scripts/bench_peers.py --llama-bench PATH`` (rwkv_mlx/bench/peers.py) runs it; the binary is built
from the llama-cpp-python sdist's vendor/llama.cpp by scripts/build_llama_bench.sh.

What llama-bench measures: ``ppN`` processes one N-token prompt from an empty context and ``tgN``
generates N tokens one at a time from an empty context, each ``-r`` times after a warm-up run; it
reports the mean tokens per second over the runs and their standard deviation.  RWKV's state has a
fixed size, so a decoded token costs the same whatever came before it: tg128 from an empty context
measures what our decode after the prompt measures.  Its prompt tokens are random ids where ours are
the bundled passage; a token's cost does not depend on its id.  All layers go to the GPU (``-ngl 99``);
a CPU-only build ignores it.  llama-bench produces no text, so only our side passes the quality gate.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InvalidArgumentError, ModelFileError

ENGINE = "llama.cpp"
BINARY_ENV = "RWKV_MLX_LLAMA_BENCH"
ALL_LAYERS = 99  # -ngl: more than any RWKV-7 model has, so every layer is offloaded
TIMEOUT_S = 1800
# llama-bench's JSON fields this module reads from each test it ran
_FIELDS = ("n_prompt", "n_gen", "avg_ts", "stddev_ts")
# and the ones it copies into the log line: which llama.cpp, on what, how
_ABOUT = ("build_commit", "build_number", "backends", "gpu_info", "cpu_info", "model_type", "model_size",
          "n_gpu_layers", "n_threads", "n_batch", "n_ubatch")


class LlamaBenchError(ModelFileError):
    """llama-bench missing, failing, or printing something that is not its JSON (exit code 3, as for a file)."""


@dataclass(frozen=True)
class Speed:
    """One llama-bench test: mean tokens per second over its runs, their standard deviation and the runs."""

    tps: float
    stddev: float
    samples: tuple[float, ...] = ()


def find_binary(path: str | os.PathLike | None) -> Path:
    """The llama-bench to run: ``path``, else $RWKV_MLX_LLAMA_BENCH."""
    path = path or os.environ.get(BINARY_ENV)
    if not path:
        raise InvalidArgumentError(f"the llama.cpp peer needs llama-bench: --llama-bench PATH or ${BINARY_ENV} "
                                   "(build it with scripts/build_llama_bench.sh)")
    path = Path(path)
    if not path.is_file():
        raise LlamaBenchError(path, "no such file: build llama-bench with scripts/build_llama_bench.sh")
    if not os.access(path, os.X_OK):
        raise LlamaBenchError(path, "not executable")
    return path


def bench_command(binary: Path, model: Path, prompt_lengths: Sequence[int], gen_tokens: int, runs: int) -> list[str]:
    """One llama-bench call: a ppN test per prompt length and one tgN test, every layer on the GPU, JSON out."""
    return [str(binary), "-m", str(model), "-p", ",".join(map(str, prompt_lengths)), "-n", str(gen_tokens),
            "-r", str(runs), "-ngl", str(ALL_LAYERS), "-o", "json"]


def run_llama_bench(command: Sequence[str], timeout: float = TIMEOUT_S) -> str:
    """llama-bench's stdout; a one-line LlamaBenchError if it cannot start, fails or hangs."""
    binary, model = command[0], command[command.index("-m") + 1]
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        raise LlamaBenchError(binary, f"cannot run it: {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise LlamaBenchError(binary, f"no result on {model} within {timeout:.0f} s") from None
    if done.returncode:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise LlamaBenchError(binary, f"exited with code {done.returncode} on {model}: "
                                      f"{lines[-1] if lines else 'no output'}")
    return done.stdout


def parse_output(text: str, source: str | os.PathLike) -> list[dict]:
    """The tests of llama-bench's ``-o json`` output (a JSON array, one object per test)."""
    try:
        tests = json.loads(text)
    except ValueError:
        start = " ".join(text.split())[:60]
        raise LlamaBenchError(source, f"its output is not llama-bench's JSON (-o json): {start!r}") from None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise LlamaBenchError(source, "its JSON is not a list of tests")
    for t in tests:
        missing = [k for k in _FIELDS if not isinstance(t.get(k), (int, float))]
        if missing:
            raise LlamaBenchError(source, f"a test in its JSON lacks {', '.join(missing)}")
    return tests


def speeds(tests: list[dict], prompt_lengths: Sequence[int], gen_tokens: int,
           source: str | os.PathLike) -> tuple[dict[int, Speed], Speed]:
    """(prefill speed per prompt length, decode speed) from the parsed tests."""

    def find(n_prompt: int, n_gen: int, name: str) -> Speed:
        for t in tests:
            if t["n_prompt"] == n_prompt and t["n_gen"] == n_gen:
                return Speed(float(t["avg_ts"]), float(t["stddev_ts"]), tuple(map(float, t.get("samples_ts") or ())))
        raise LlamaBenchError(source, f"its JSON has no {name} test")

    return {p: find(p, 0, f"pp{p}") for p in prompt_lengths}, find(0, gen_tokens, f"tg{gen_tokens}")


def about(tests: list[dict]) -> dict:
    """Which llama.cpp ran, where and how (the first test's fields; one call shares them)."""
    return {k: tests[0][k] for k in _ABOUT if k in tests[0]}


def ratio(ours: float, theirs: float) -> float | None:
    """rwkv-mlx / llama.cpp, rounded as the log keeps ratios."""
    return round(ours / theirs, 4) if ours and theirs else None


def _cell(speed: Speed) -> str:
    return f"{speed.tps:.2f} ± {speed.stddev:.2f}"


def _ratio_cell(ours: float, theirs: float) -> str:
    r = ratio(ours, theirs)
    return "-" if r is None else f"{r:.2f}x"


def rows(ours: dict[int, dict], prefill: dict[int, Speed], decode: Speed, gen_tokens: int) -> list[list[str]]:
    """The side-by-side table: prefill at each prompt length, then decode (ours after the first length's prompt)."""
    out = [[f"prefill {p} tok/s (pp{p})", f"{ours[p]['prefill_tps']:.2f}", _cell(prefill[p]),
            _ratio_cell(ours[p]["prefill_tps"], prefill[p].tps)] for p in prefill]
    first = ours[next(iter(prefill))]
    out.append([f"decode tok/s (tg{gen_tokens})", f"{first['generation_tps']:.2f}", _cell(decode),
                _ratio_cell(first["generation_tps"], decode.tps)])
    return out


def log_figures(ours: dict, prefill: Speed, decode: Speed, prompt_tokens: int, gen_tokens: int, info: dict) -> dict:
    """The figures of one ``"engine": "llama.cpp"`` log line: llama-bench's speeds at one prompt length beside ours."""
    return {
        "engine": ENGINE, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "prefill_tps": round(prefill.tps, 3), "prefill_tps_stddev": round(prefill.stddev, 3),
        "prefill_tps_samples": [round(s, 3) for s in prefill.samples],
        "generation_tps": round(decode.tps, 3), "generation_tps_stddev": round(decode.stddev, 3),
        "generation_tps_samples": [round(s, 3) for s in decode.samples],
        "llama_cpp": info,
        "ours": {k: ours[k] for k in ("prefill_tps", "generation_tps", "quality_hash", "device", "date", "commit")
                 if k in ours},
        "ratio_prefill": ratio(ours["prefill_tps"], prefill.tps),
        "ratio_generation": ratio(ours["generation_tps"], decode.tps),
    }
