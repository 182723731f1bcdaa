#!/usr/bin/env python3
"""N concurrent streaming clients against ``rwkv-mlx serve``: aggregate tok/s, TTFT and inter-token latency.

    python scripts/bench_serve.py --model rwkv7-g1b-2.9b-Q4_K_M.gguf --clients 1,4,16,64 \\
        --prompt-tokens 128 --gen-tokens 128 --device gpu

Starts the server in this process (port 0) unless ``--url`` names a running one.
For each N it runs one short warm-up round (the GPU compiles a decode graph per
batch size) and then one timed round: N clients start together, each streams a
/v1/completions request with a fixed prompt of ``--prompt-tokens`` tokens (the
benchmark passage, rotated per client so no two prompts are equal) and exactly
``--gen-tokens`` generated tokens (``ignore_eos``).

* aggregate tok/s: all generated tokens / (last token of any client - the round's start);
* TTFT: from a client's request to its first streamed token (p50, p99 over clients);
* inter-token latency: gaps between a client's streamed chunks (p50, p99 over all gaps);
* where the engine's time went in the round, from the server's /metrics before and after it: prompt
  calls and their seconds, decode steps and their mean, and calls or steps that took over a second (a
  stall: on a GPU, most likely a kernel compiled for a shape the warm-up did not meet).

Appends a markdown table to results/serve_bench.md and one JSON line per N to
results/serve_bench.jsonl, each with the device, command, commit and date.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


async def one_client(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps, "tokens": tokens}


async def round_of(url: str, bodies: list[dict], api_key: str | None) -> tuple[float, list[dict]]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=3600, headers=headers, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, b) for b in bodies))
    return t0, results


def engine_counts(url: str) -> dict[str, float]:
    """Every sample of the server's /metrics (no key needed), by its name and labels as printed."""
    import httpx

    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in lines if line[:1] != "#")}


def engine_split(before: dict, after: dict) -> dict:
    """What the engine did between two engine_counts: its prompt chunks and decode steps (the histograms'
    counts and sums) and how many of them took over a second."""
    def d(sample: str) -> float:
        return after.get("rwkv_serve_" + sample, 0.0) - before.get("rwkv_serve_" + sample, 0.0)

    def over_1s(hist: str) -> int:
        return int(d(hist + '_bucket{le="+Inf"}') - d(hist + '_bucket{le="1"}'))

    steps = d("decode_step_seconds_count")
    return {"prompt_calls": int(d("prefill_chunk_seconds_count")),
            "prompt_seconds": d("prefill_chunk_seconds_sum"),
            "decode_steps": int(steps),
            "decode_step_ms": 1e3 * d("decode_step_seconds_sum") / steps if steps else float("nan"),
            "over_1s": over_1s("prefill_chunk_seconds") + over_1s("decode_step_seconds")}


def summarize(t0: float, results: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in results)
    end = max(r["stamps"][-1] for r in results)
    ttft = [r["stamps"][0] - r["start"] for r in results]
    gaps = np.concatenate([np.diff(r["stamps"]) for r in results if len(r["stamps"]) > 1] or [np.zeros(0)])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    return {"tokens": tokens, "seconds": end - t0, "tok_s": tokens / (end - t0),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(gaps, 50), "itl_p99_ms": 1e3 * pct(gaps, 99)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF or MLX directory (default: the demo model)")
    p.add_argument("--url", default=None, help="a running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", default="1,4,16,64", help="comma-separated N")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="temperature 0, no penalties (default: the rwkv reference "
                                                         "sampling defaults with a seed per client)")
    p.add_argument("--device", default="auto")
    p.add_argument("--note", default="", help="a remark recorded with the run")
    p.add_argument("--results-dir", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]

    sys.path.insert(0, str(REPO))
    from rwkv_mlx.bench import benchmark_prompt, environment, format_table
    from rwkv_mlx.io import atomic_write_text
    from rwkv_mlx.bench.record import settings_cell
    from rwkv_mlx.cli.common import resolve_model, select_device
    from rwkv_mlx.serve.app import ServeConfig
    from rwkv_mlx.serve.server import Server
    from rwkv_mlx.text.tokenizer import Tokenizer

    server = None
    if args.url is None:
        config = ServeConfig(model=resolve_model(args.model), port=0, max_batch=max(counts), max_queue=max(counts),
                             max_tokens=max(args.gen_tokens, 8), device=args.device, request_timeout=None)
        server = Server(config).start()
        url, name, tokenizer = server.url, server.model_name, server.engine.tokenizer
        select_device(args.device)  # environment() below describes this device
    else:
        url = args.url.rstrip("/")
        import httpx

        name = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key
                         else {}).json()["data"][0]["id"]
        tokenizer = Tokenizer.from_vocab_file()
    passage = benchmark_prompt(tokenizer, args.prompt_tokens + max(counts))
    sampling = (dict(temperature=0, presence_penalty=0, frequency_penalty=0) if args.greedy else {})

    def bodies(n: int, gen: int) -> list[dict]:
        return [{"model": name, "prompt": passage[i : i + args.prompt_tokens], "max_tokens": gen, "stream": True,
                 "stream_options": {"include_usage": True}, "ignore_eos": True, "seed": i, **sampling}
                for i in range(n)]

    rows, lines = [], []
    env = environment()
    command = "python scripts/bench_serve.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    when = dt.datetime.now().astimezone()
    try:
        for n in counts:
            asyncio.run(round_of(url, bodies(n, 4), args.api_key))  # warm-up: compile this batch size
            before = engine_counts(url)
            t0, results = asyncio.run(round_of(url, bodies(n, args.gen_tokens), args.api_key))
            s = {**summarize(t0, results), **engine_split(before, engine_counts(url))}
            if s["tokens"] != n * args.gen_tokens:
                raise RuntimeError(f"N={n}: {s['tokens']} tokens generated, expected {n * args.gen_tokens}")
            rows.append([n, f"{s['tok_s']:.1f}", f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p99_ms']:.0f}",
                         f"{s['itl_p50_ms']:.1f}", f"{s['itl_p99_ms']:.1f}",
                         f"{s['prompt_calls']} / {s['prompt_seconds']:.2f}", f"{s['decode_steps']} / "
                         f"{s['decode_step_ms']:.1f}", s["over_1s"]])
            print(" | ".join(map(str, rows[-1])), flush=True)
            lines.append({"date": when.isoformat(timespec="seconds"), "command": command, "clients": n,
                          "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                          "sampling": "greedy" if args.greedy else "reference defaults, seeded",
                          "model": str(resolve_model(args.model)) if args.url is None else name,
                          "note": args.note, **s, **env})
    finally:
        if server is not None:
            server.stop()
    table = format_table(["clients", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                          "prompt calls / s", "decode steps / ms each", "over 1 s"], rows)
    first = float(rows[0][1])
    ratios = ", ".join(f"N={r[0]}: {float(r[1]) / first:.1f}x" for r in rows[1:])
    md = args.results_dir / "serve_bench.md"
    header = "# rwkv-mlx serve: concurrent streaming clients\n\nWritten by scripts/bench_serve.py, newest last.\n"
    entry = (f"\n## {when:%Y-%m-%d %H:%M} - {lines[0]['model'].rsplit('/', 1)[-1]} on {env['device']} "
             f"({env['backend']})\n\n- command: `{command}`\n- commit: {env['commit']}"
             f"{' (modified)' if env['commit_dirty'] else ''}; MLX {env['mlx']}"
             f"{'; settings ' + settings_cell(env['settings']) if env['settings'] else ''}\n"
             f"- prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated per client, sampling: "
             f"{lines[0]['sampling']}{'; ' + args.note if args.note else ''}\n"
             f"- aggregate tok/s relative to one client: {ratios or '-'}\n\n{table}")
    atomic_write_text(md, (md.read_text() if md.is_file() else header) + entry)
    jsonl = args.results_dir / "serve_bench.jsonl"
    atomic_write_text(jsonl, (jsonl.read_text() if jsonl.is_file() else "") +
                      "".join(json.dumps(line) + "\n" for line in lines))
    print(f"recorded in {md} and {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
