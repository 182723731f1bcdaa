"""``rwkv-mlx benchmark``: time a model, pass the quality gate, append the entry to results/."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from . import app
from ..errors import InvalidArgumentError
from ..progress import Progress
from .common import DEVICE_OPTION, MODEL_OPTION, load_for_cli, print_table, resolve_model, select_device


@app.command(help="Benchmark a model: load time, prefill and generation tok/s (median of --runs), peak memory and "
                  "dispatches per token; refuses to report a speed when the first 16 greedy tokens are degenerate or "
                  "differ from the float32 reference. Appends to RESULTS_DIR/BENCHMARKS.md and benchmarks.jsonl. "
                  "--compare TITLE prints a title's entries side by side instead.")
def benchmark(
    model: Optional[Path] = MODEL_OPTION,
    title: Optional[str] = typer.Option(None, "--title", help="Section of the log this entry belongs to (e.g. 'Fused WKV Kernel')."),
    change: Optional[str] = typer.Option(None, "--change", help="What changed since the previous entry (one line)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length in tokens (the bundled passage, repeated)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens to decode greedily (>= 16, the gate's length)."),
    runs: int = typer.Option(3, "--runs", help="Timed runs; the median and min-max are reported."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first (compilation, caches)."),
    device: str = DEVICE_OPTION,
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="Where BENCHMARKS.md and benchmarks.jsonl live (relative to the current directory)."),
    no_record: bool = typer.Option(False, "--no-record", help="Print the figures; write nothing to the results directory."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Print the entries of this title side by side (ratios to the first) and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    from .. import bench

    if compare is not None:
        entries = bench.load_entries(results_dir, compare)
        if not entries:
            titles = sorted({e.get("title", "") for e in bench.load_entries(results_dir)})
            raise InvalidArgumentError(f"no entries titled {compare!r} in {results_dir / bench.JSONL_NAME} "
                                       f"(titles: {', '.join(map(repr, titles)) or 'none'})")
        sys.stdout.write(bench.format_table(*bench.compare_table(entries)))
        return
    if not no_record and not (title and change):
        raise InvalidArgumentError("--title and --change are required to record an entry (or pass --no-record)")
    select_device(device)
    path = resolve_model(model)
    command = shlex.join(["rwkv-mlx", "benchmark", "--model", str(path), "--title", title or "", "--change", change or "",
                          "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--runs", str(runs),
                          "--warmup", str(warmup), "--device", device, "--results-dir", str(results_dir)]
                         + (["--no-record"] if no_record else []))

    bar = Progress("benchmark runs", warmup + runs, enabled=not quiet)
    try:
        result = bench.run_benchmark(
            path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, warmup=warmup,
            loader=lambda p: load_for_cli(p, quiet=quiet), on_run=lambda done, total: bar.update(done),
        )
    except bench.QualityGateError as e:
        bar.close("rejected")
        if not no_record and e.rejected is not None:
            bench.record_rejected(e.rejected, title, change, results_dir, command)
        raise
    bar.close(f"{len(result.runs)} timed")
    print_table([(k.strip("*"), v.strip("*")) for k, v in result.table_rows()]
                + [("Quality tokens", str(result.tokens)), ("Reference", result.reference.source)])
    if not no_record:
        md, jsonl = bench.record(result, title, change, results_dir, command)
        print(f"recorded: {md} (## {title}) and {jsonl}", file=sys.stderr)
