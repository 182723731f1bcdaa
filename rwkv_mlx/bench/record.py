"""The records: ``results/BENCHMARKS.md`` (one markdown entry per run, grouped under its title) and
``results/benchmarks.jsonl`` (every figure and the environment), both written atomically, and the
comparison view of recorded entries.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from ..errors import ModelFileError
from ..io import atomic_write_text
from .measure import PrimitiveCount, RunTiming, Spread, local_now
from .quality import QUALITY_TOKENS, Reference, quality_hash


MARKDOWN_NAME = "BENCHMARKS.md"


def settings_cell(values: dict[str, str]) -> str:
    """The environment's tuning settings (settings.in_effect) as one line: `NAME=value`, ..."""
    return ", ".join(f"`{name}={value}`" for name, value in values.items())


JSONL_NAME = "benchmarks.jsonl"


MARKDOWN_HEADER = (
    "# rwkv-mlx benchmark log\n\n"
    "Written by `rwkv-mlx benchmark` (see docs/benchmarks.md): one entry per run, grouped by title, newest last.\n"
    "Every entry names the device it was measured on (the `GPU` row; `CPU (...)` means MLX's CPU backend).\n"
    "Every figure and the environment of each entry are in benchmarks.jsonl.\n"
)


@dataclass
class BenchmarkResult:
    model_path: str
    model_name: str
    fingerprint: str
    args: dict
    tensor_types: dict
    load_seconds: float
    load_peak_bytes: int
    prompt_tokens: int
    gen_tokens: int
    warmup: int
    runs: list[RunTiming]
    dispatch: PrimitiveCount
    tokens: list[int]  # the first QUALITY_TOKENS greedy tokens (equal in every run)
    reference: Reference
    env: dict
    quality_note: str | None = None  # how the tokens passed the gate when they left the reference's path
    bytes_read: dict | None = None  # bytes_read.TokenBytes.to_json() of the GPU plans; None on the CPU backend

    def bytes_read_cell(self) -> str:
        b = self.bytes_read
        if b is None:
            return "-"
        return (f"{b['gb_read_per_token']:.3f} GB ({b['ratio']:.2f}x the GGUF's {b['gguf_gb_per_token']:.3f} GB; "
                + ", ".join(f"{t} {v['ratio']:.2f}x" for t, v in sorted(b["matrices"].items())) + " matrices)")

    @property
    def prefill(self) -> Spread:
        return Spread.of(r.prefill_tps for r in self.runs)

    @property
    def generation(self) -> Spread:
        return Spread.of(r.generation_tps for r in self.runs)

    @property
    def prefill_peak_bytes(self) -> int:
        return max(r.prefill_peak_bytes for r in self.runs)

    @property
    def decode_peak_bytes(self) -> int:
        return max(r.decode_peak_bytes for r in self.runs)

    @property
    def quality_hash(self) -> str:
        return quality_hash(self.tokens)

    def table_rows(self) -> list[tuple[str, str]]:
        """(metric, value) rows of the log entry, in the order of the log's format."""
        pre, gen = self.prefill, self.generation
        return [
            ("Model", self.model_name),
            ("Version", "V7"),
            ("Layers", str(self.args["n_layer"])),
            ("Embedding", str(self.args["n_embd"])),
            ("GPU", self.env["device"]),
            ("**Load Time**", f"**{self.load_seconds * 1000:.2f} ms**"),
            ("**Prefill**", f"**{pre.median:.2f} tok/s**"),
            ("**Generation**", f"**{gen.median:.2f} tok/s**"),
            ("Prefill Spread", f"{pre.min:.2f}-{pre.max:.2f} tok/s ({self.prompt_tokens} prompt tokens)"),
            ("Generation Spread", f"{gen.min:.2f}-{gen.max:.2f} tok/s ({self.gen_tokens} tokens)"),
            ("Peak Memory", f"{_mb(self.load_peak_bytes)} load, {_mb(self.prefill_peak_bytes)} prefill, "
                            f"{_mb(self.decode_peak_bytes)} decode"),
            ("Dispatches / Token", self.dispatch.summary()),
            ("GB read / token", self.bytes_read_cell()),
            ("Backend", f"{self.env['backend']} (MLX {self.env['mlx']})"),
            *((("Settings", settings_cell(self.env["settings"])),) if self.env.get("settings") else ()),
            ("Runs", f"{len(self.runs)} timed + {self.warmup} warm-up; median, min-max"),
            ("Commit", (self.env.get("commit") or "unknown") + (" (modified)" if self.env.get("commit_dirty") else "")),
            ("Quality Hash", f"`{self.quality_hash}`"),
            *((("Quality Check", self.quality_note),) if self.quality_note else ()),
        ]

    def to_json(self) -> dict:
        pre, gen = self.prefill, self.generation
        return {
            "engine": "rwkv-mlx",
            "model": self.model_name, "model_path": self.model_path, "fingerprint": self.fingerprint,
            "args": self.args, "tensor_types": self.tensor_types,
            "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens,
            "runs": len(self.runs), "warmup": self.warmup,
            "load_ms": round(self.load_seconds * 1000, 3),
            "prefill_tps": round(pre.median, 3), "prefill_tps_min": round(pre.min, 3),
            "prefill_tps_max": round(pre.max, 3), "prefill_tps_runs": [round(v, 3) for v in pre.values],
            "generation_tps": round(gen.median, 3), "generation_tps_min": round(gen.min, 3),
            "generation_tps_max": round(gen.max, 3), "generation_tps_runs": [round(v, 3) for v in gen.values],
            "peak_memory_bytes": {"load": self.load_peak_bytes, "prefill": self.prefill_peak_bytes,
                                  "decode": self.decode_peak_bytes},
            "dispatches_per_token": self.dispatch.kernels,
            "dispatches_per_layer": round(self.dispatch.kernels_per_layer, 2),
            "primitives_per_token": self.dispatch.primitives,
            "primitives_by_name": self.dispatch.by_name,
            "gb_read_per_token": self.bytes_read and self.bytes_read["gb_read_per_token"],
            "gb_read_ratio": self.bytes_read and self.bytes_read["ratio"], "bytes_read": self.bytes_read,
            "quality_tokens": self.tokens, "quality_hash": self.quality_hash, "quality_note": self.quality_note,
            "reference": self.reference.to_json(),
            **self.env,
        }


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def rejected_record(result: BenchmarkResult, reason: str) -> dict:
    """The JSON line of a rejected run: what was compared, and no speed at all."""
    return {
        "engine": "rwkv-mlx", "rejected": reason,
        "model": result.model_name, "model_path": result.model_path, "fingerprint": result.fingerprint,
        "args": result.args, "prompt_tokens": result.prompt_tokens, "gen_tokens": result.gen_tokens,
        "runs_tokens": [t.tokens[:QUALITY_TOKENS] for t in result.runs],
        "quality_tokens": result.tokens, "quality_hash": result.quality_hash,
        "reference": result.reference.to_json(),
        **result.env,
    }


def markdown_entry(result: BenchmarkResult, change: str, when: _dt.datetime) -> str:
    lines = [f"### {when.strftime('%Y-%m-%d %H:%M:%S')} - {_one_line(change)}",
             "| Metric | Value |", "|--------|-------|"]
    lines += [f"| {k} | {v} |" for k, v in result.table_rows()]
    lines.append(f"<details><summary>Quality tokens (first {QUALITY_TOKENS})</summary> {result.tokens} </details>")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def insert_entry(document: str, title: str, entry: str) -> str:
    """``document`` with ``entry`` appended at the end of section ``## title`` (created at the end if missing)."""
    heading = f"## {_one_line(title)}"
    lines = document.splitlines()
    if heading not in lines:
        body = document.rstrip("\n")
        return f"{body}\n\n{heading}\n\n{entry}"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "\n".join(lines[:end]).rstrip("\n")
    after = "\n".join(lines[end:])
    return f"{before}\n\n{entry}" + (f"\n{after}\n" if after else "")


def record(result: BenchmarkResult, title: str, change: str, results_dir: str | os.PathLike = "results",
           command: str | None = None, when: _dt.datetime | None = None) -> tuple[Path, Path]:
    """Append the entry to BENCHMARKS.md (under ``title``) and its JSON line to benchmarks.jsonl."""
    when = when or local_now()
    results_dir = Path(results_dir)
    md = results_dir / MARKDOWN_NAME
    document = md.read_text(encoding="utf-8") if md.is_file() else MARKDOWN_HEADER
    jsonl = append_jsonl(results_dir, log_line(title, change, command, when, result.to_json()))
    atomic_write_text(md, insert_entry(document, title, markdown_entry(result, change, when)))
    return md, jsonl


def append_jsonl(results_dir: str | os.PathLike, line: dict) -> Path:
    path = Path(results_dir) / JSONL_NAME
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    atomic_write_text(path, existing + json.dumps(line, sort_keys=False) + "\n")
    return path


def record_rejected(rejected: dict, title: str, change: str, results_dir: str | os.PathLike = "results",
                    command: str | None = None) -> Path:
    """A rejected run leaves a JSON line (reason, tokens, no speeds) and nothing in the markdown log."""
    return append_jsonl(results_dir, log_line(title, change, command, local_now(), rejected))


def log_line(title: str, change: str, command: str | None, when: _dt.datetime, figures: dict) -> dict:
    """One JSON line of the log: what it is about, when, how it was run, then the figures."""
    return {"title": _one_line(title), "change": _one_line(change), "date": when.isoformat(timespec="seconds"),
            "command": command, **figures}


def load_entries(results_dir: str | os.PathLike = "results", title: str | None = None,
                 include_rejected: bool = False) -> list[dict]:
    """The JSON lines of the log, oldest first (optionally one title's, without rejected runs)."""
    path = Path(results_dir) / JSONL_NAME
    if not path.is_file():
        return []
    entries = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            raise ModelFileError(path, f"line {n} is not JSON") from None
        if (title is None or entry.get("title") == title) and (include_rejected or "rejected" not in entry):
            entries.append(entry)
    return entries


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns (any number of them)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "| " + " | ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]) + "\n"


def _ratio(value, first) -> str:
    return f"{value / first:.2f}x" if value and first else "-"


def compare_table(entries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Entries side by side; each figure with its ratio to the first entry."""
    header = ["#", "date", "change", "engine", "model", "device", "prefill tok/s", "generation tok/s", "load ms",
              "peak MB", "dispatches/token", "GB read / token", "hash"]
    first = entries[0]
    rows = []
    for i, e in enumerate(entries, start=1):
        peak = max(e.get("peak_memory_bytes", {}).values() or [0])
        first_peak = max(first.get("peak_memory_bytes", {}).values() or [0])
        cells = [str(i), e.get("date", "")[:19].replace("T", " "), e.get("change", ""), e.get("engine", "rwkv-mlx"),
                 e.get("model", ""), e.get("device", "")]
        for key, value, base, fmt in (
            ("prefill", e.get("prefill_tps"), first.get("prefill_tps"), "{:.2f}"),
            ("generation", e.get("generation_tps"), first.get("generation_tps"), "{:.2f}"),
            ("load", e.get("load_ms"), first.get("load_ms"), "{:.1f}"),
            ("peak", peak / 1e6, first_peak / 1e6, "{:.1f}"),
            ("dispatches", e.get("dispatches_per_token"), first.get("dispatches_per_token"), "{}"),
        ):
            cells.append("-" if value is None else f"{fmt.format(value)} ({_ratio(value, base)})")
        gb = e.get("gb_read_per_token")  # older entries have none
        cells.append("-" if gb is None else f"{gb:.3f} ({e['gb_read_ratio']:.2f}x GGUF)")
        cells.append(e.get("quality_hash", ""))
        rows.append(cells)
    return header, rows
