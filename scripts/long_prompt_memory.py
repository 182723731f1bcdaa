#!/usr/bin/env python3
"""Peak memory of long prompts: prefill 1k, 10k and 100k tokens, each in a fresh process.

    python scripts/long_prompt_memory.py                            # synthetic model, vocab 65536
    python scripts/long_prompt_memory.py --model m.gguf --lengths 1000,10000,100000

Each length runs in its own subprocess: load the model, take exactly N prompt tokens
(``rwkv_mlx.bench.benchmark.benchmark_prompt``: the bundled passage, repeated), reset the
peak RSS (Linux ``/proc/self/clear_refs``; elsewhere the peak includes loading), prefill
with ``rwkv_mlx.text.generate.prefill`` (chunks of 512 tokens, each evaluated before the next
is built) and sample nothing.  Reported per length: seconds, tokens/s, the process's
peak RSS during the prefill (``VmHWM``, reset after the load), its peak RSS while loading, and MLX's peak
memory during the prefill (``mx.get_peak_memory`` after ``mx.reset_peak_memory``).
Memory is flat when the prefill peaks of the longest prompt are within ``--tolerance``
of the second length's.

The default model is written here with rwkv_mlx.testing.synthetic: RWKV-7, 2
layers, n_embd 256, ffn 1024, LoRA ranks 32/32/16/64 (the oracle's fixa shape) with
the full 65536-token world vocabulary, F32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import rwkv_mlx  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mlx.testing.fuzz_gguf import peak_rss  # noqa: E402 -- VmHWM: this process's own peak, not its parent's


def reset_peak_rss() -> bool:
    """Linux (>= 4.0) can reset a process's peak RSS to its current RSS; elsewhere the peak covers the load too."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(model_path: str, n_tokens: int, chunk: int) -> dict:
    """One measurement, in this (fresh) process."""
    import mlx.core as mx

    import rwkv_mlx
    from rwkv_mlx import LoadOptions
    from rwkv_mlx.bench.benchmark import benchmark_prompt
    from rwkv_mlx.text.generate import prefill

    model, tokenizer = rwkv_mlx.load(model_path, LoadOptions.for_backend("cpu"))
    ids = benchmark_prompt(tokenizer, n_tokens)
    load_peak = peak_rss()
    reset = reset_peak_rss()
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits, state = prefill(model, ids, chunk_size=chunk)
    mx.eval(logits, *state.arrays())
    seconds = time.perf_counter() - start
    return {
        "tokens": len(ids), "seconds": seconds, "tps": len(ids) / seconds,
        "peak_rss": peak_rss(), "peak_rss_covers_load": not reset, "load_peak_rss": load_peak,
        "mlx_peak": mx.get_peak_memory(), "logits_finite": bool(mx.isfinite(logits).all().item()),
    }


def measure(model: Path, n_tokens: int, chunk: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(model), str(n_tokens), str(chunk)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"measurement of {n_tokens} tokens failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GGUF file (default: a synthetic 2-layer model with vocab 65536)")
    ap.add_argument("--lengths", default="1000,10000,100000", help="prompt lengths in tokens (comma separated)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size (rwkv_mlx.text.generate's default: 512)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed growth from the 2nd length to the last")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]

    from rwkv_mlx.bench.record import format_table

    with tempfile.TemporaryDirectory(prefix="rwkv-mlx-long-") as tmp:
        model = args.model
        if model is None:
            from rwkv_mlx.testing.synthetic import make_synthetic_model, synthetic_args

            model = Path(tmp) / "synthetic-L2-C256-V65536-F32.gguf"
            make_synthetic_model(model, "F32", synthetic_args(2, 256, 1024, (32, 32, 16, 64), vocab=65536))
        rows = []
        for n in lengths:
            r = measure(model, n, args.chunk)
            print(f"{n} tokens: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
            rows.append(r)
    mib = lambda b: f"{b / 2**20:.1f}"
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, {platform.system()}, "
          f"model {model.name}, chunk {args.chunk}")
    during = "peak RSS MiB (load + prefill)" if rows[0]["peak_rss_covers_load"] else "peak RSS MiB (prefill)"
    print(format_table(["tokens", "seconds", "tok/s", during, "peak RSS MiB (load)", "MLX peak MiB (prefill)", "logits finite"],
                       [[str(r["tokens"]), f"{r['seconds']:.1f}", f"{r['tps']:.0f}", mib(r["peak_rss"]),
                         mib(r["load_peak_rss"]), mib(r["mlx_peak"]), str(r["logits_finite"])] for r in rows]))
    if len(rows) < 2:
        return 0
    base, last = rows[1] if len(rows) > 2 else rows[0], rows[-1]
    growth = {k: last[k] / base[k] - 1 for k in ("peak_rss", "mlx_peak")}
    flat = all(g <= args.tolerance for g in growth.values())
    print(f"from {base['tokens']} to {last['tokens']} tokens: peak RSS {growth['peak_rss']:+.1%}, "
          f"MLX peak {growth['mlx_peak']:+.1%} -> {'flat' if flat else 'NOT flat'} (tolerance {args.tolerance:.0%})")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
