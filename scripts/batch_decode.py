"""Batched decode throughput: total tok/s of ``model.step`` for B rows at once, tokens checked.

    python scripts/batch_decode.py MODEL.gguf [--batches 1 4 16 64] [--tokens 128] [--routes kernels matmul]

Each row decodes greedily from its own prompt. Row 0's tokens at every B (the prompt's first
greedy token, then one a step) must equal those of the same prompt decoded alone, or else, fed
the alone tokens (teacher forcing), row 0's logits must stay within
``measure.ROW0_LOGIT_TOLERANCE`` of the alone logits at every step: the differing token was then
a near-tie that float16 rounding flipped, and the table says so. Otherwise the batch size
reports no speed.
Every figure is the median of ``--runs`` runs (default three) of the same length in the same process, each
from its prompts again, and the table shows their range: one run of 16 rows gave 2,286-2,442 tok/s in some
processes of one tree and 3,167-3,491 in others, and one stream 232-364, on one H100 (results/kernel_log.md
step 28); a batch size whose runs decoded different tokens reports no speed. "x one stream" divides by the
one-stream median (the table's first line gives it). Runs shorter than the default mislead: in one process,
Q4_K_M's one stream ran at 243-253 tok/s in runs of 64 tokens and at 348 in runs of 128, and 16 rows at
2,085-2,164 against 3,358 (an H100, results/kernel_log.md step 27).
Each batch size is measured by every route asked for:

* kernels:  the decode kernels (kernels/decode.py), the usual plan;
* matmul:   no matvec plan (``kernels.matvec.MAX_BATCH`` below B): MLX's matrix products
            (kernels/products.py) and the time-mix kernel, quantized weights expanded on CUDA
            from ``layers.cuda_dequant_min_rows()`` rows (before commit c685d75: the whole pure
            block with the prefill WKV kernel, and expansion from 64 rows);
* matmul-q: the same with MLX's quantized products at every row count (affine weights only:
            GGUF blocks have no quantized product, they are always expanded; run it with
            RWKV_MLX_GPU_BLOCKS=affine);
* pure:     the pure-MLX path, no custom kernel at all.

A development aid for the server's batching (issue: batched decode must scale) and for
choosing ``MAX_BATCH``; the figures are printed as a table to paste into results/, and
``--json FILE`` appends one line per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

from pathlib import Path

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx import layers, settings
from rwkv_mlx.bench.measure import greedy_steps, row0_agreement, row0_logits
from rwkv_mlx.kernels import kernels_disabled, matvec

ROUTES = ("kernels", "matmul", "matmul-q", "pure")


@contextlib.contextmanager
def route(model, name: str, batch: int):
    """Plans and compiled steps rebuilt under ``name``'s settings, restored afterwards."""
    saved = matvec.MAX_BATCH, layers.CUDA_DEQUANT_MIN_ROWS
    matvec.MAX_BATCH = 0 if name in ("kernels", "pure") else batch - 1  # (at B = 1 the plan can't be refused)
    if name == "matmul-q":
        layers.CUDA_DEQUANT_MIN_ROWS = 0
    model.runtime.invalidate()
    try:
        with kernels_disabled() if name == "pure" else contextlib.nullcontext():
            yield
    finally:
        matvec.MAX_BATCH, layers.CUDA_DEQUANT_MIN_ROWS = saved
        model.runtime.invalidate()


def prompts(model, batch: int, n: int = 16) -> mx.array:
    """B different prompts of n token ids spread over the vocabulary (no tokenizer needed)."""
    V = model.args.vocab_size
    return mx.array([[(7 * i + 3 + 101 * b) % V for i in range(n)] for b in range(batch)])


def start(model, batch: int):
    """The B prompts read: (last logits [B, V], first greedy tokens [B], state)."""
    logits, state = model(prompts(model, batch), logits="last")
    logits = logits[:, -1]
    token = mx.argmax(logits, axis=-1)
    mx.eval(logits, token, *state.arrays())
    return logits, token, state


def run(model, batch: int, n_tokens: int):
    """Each row's tokens (its first greedy token, then n_tokens steps') and the steps' total tok/s."""
    _, token, state = start(model, batch)
    for _ in range(3):  # compile the step for this batch size, and run it (MLX builds GPU kernels on first use)
        logits, after = model.step(token, state)
        mx.eval(logits, *after.arrays())
    rows, seconds = greedy_steps(model, token, state, n_tokens)
    return [[int(token[b].item())] + r for b, r in enumerate(rows)], batch * n_tokens / seconds


def runs(model, batch: int, n_tokens: int, n_runs: int):
    """``run`` n_runs times: (the first run's rows, the median tok/s, every run's tok/s, whether every run
    decoded the first one's tokens: greedy decoding of the same prompts should)."""
    rows, first = run(model, batch, n_tokens)
    all_tps, same = [first], True
    for _ in range(n_runs - 1):
        again, tps = run(model, batch, n_tokens)
        same = same and again == rows
        all_tps.append(tps)
    return rows, statistics.median(all_tps), all_tps, same


def spread(values) -> str:
    """The range of runs' tok/s, as the table shows it."""
    return f"{min(values):,.0f}-{max(values):,.0f}"


def row0_reference(model, batch: int, n_tokens: int, forced=None):
    """Row 0's logits at the prompt's end and at each step ([n_tokens + 1, V]); ``forced``: row 0 fed
    these tokens (its first, then one a step) instead of its own (teacher forcing)."""
    import numpy as np

    logits, token, state = start(model, batch)
    if forced is not None:
        token = mx.concatenate([mx.array([forced[0]], dtype=token.dtype), token[1:]])
    steps = row0_logits(model, token, state, n_tokens, forced=None if forced is None else forced[1:])
    return np.concatenate([np.array(logits[0], dtype=np.float32)[None], steps])


def suggest(lines: list[dict], model: str) -> str:
    """Environment settings that take the fastest route measured at each batch size of ``model``:
    kernels up to the largest B where they win (and win at every smaller B), then MLX's products,
    expanded or quantized as measured at the largest B."""
    best: dict[int, tuple[float, str]] = {}
    for line in lines:
        if line["model"] == model and line["tps"] is not None and line["route"] != "pure":  # (no setting for it)
            best[line["batch"]] = max(best.get(line["batch"], (0.0, "")), (line["tps"], line["route"]))
    max_batch = 0
    for batch in sorted(best):
        if best[batch][1] != "kernels":
            break
        max_batch = batch
    if max_batch == max(best, default=0):
        max_batch = 0  # kernels everywhere measured: no bound
    dequant = 0 if best and best[max(best)][1] == "matmul-q" else layers.cuda_dequant_min_rows()
    return f"RWKV_MLX_KERNEL_MAX_BATCH={max_batch} RWKV_MLX_CUDA_DEQUANT_MIN_ROWS={dequant}"


# Issue 14's bars: aggregate tok/s at B rows at least this many times one stream's.
BARS = {16: 8, 64: 24}


def bars(lines: list[dict]) -> str:
    """Issue 14's bars as a table, from --json lines of the kernels route (one or more processes a model):
    each batch size's medians, divided by their own process's one-stream median and, the strict reading,
    the slowest process's median by the fastest process's one-stream median."""
    out = ["| model | B | total tok/s (a process each) | one stream (every run) | x own one stream "
           "| slowest / fastest one stream | bar | met |", "|---|---|---|---|---|---|---|---|"]

    def key(line):  # (a file's lines from several trees or settings, as scripts/gpu_session.sh ab writes them)
        return line["model"], line.get("tree", ""), json.dumps(line.get("settings", {}), sort_keys=True)

    trees = {line.get("tree", "") for line in lines}
    for model, tree, env in sorted({key(line) for line in lines}, key=lambda k: (k[0], k[1], k[2] != "{}", k[2])):
        mine = [line for line in lines if key(line) == (model, tree, env) and line["route"] == "kernels"]
        if not mine:
            continue
        label = model + "".join(f" {k}={v}" for k, v in json.loads(env).items())
        label += f" ({tree})" if len(trees) > 1 else ""
        ones = sorted({tuple(line.get("one_stream_runs") or [line["one_stream"]]) for line in mine})
        fastest = max(line["one_stream"] for line in mine)
        for batch in sorted({line["batch"] for line in mine} & set(BARS)):
            timed = [line for line in mine if line["batch"] == batch and line["tps"] is not None]
            if not timed:
                continue
            tps = [line["tps"] for line in timed]
            own = [line["tps"] / line["one_stream"] for line in timed]
            strict = min(tps) / fastest
            out.append(f"| {label} | {batch} | {', '.join(f'{v:,.0f}' for v in tps)} "
                       f"| {min(min(r) for r in ones):,.0f}-{max(max(r) for r in ones):,.0f} "
                       f"| {min(own):.1f}-{max(own):.1f}x "
                       f"| {strict:.1f}x | {BARS[batch]}x | {'yes' if strict >= BARS[batch] else 'no'} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--suggest", metavar="FILE", help="print the settings --json FILE's lines favour for MODEL, "
                    "as NAME=VALUE pairs for the shell, and exit")
    ap.add_argument("--bars", metavar="FILE", help="print issue 14's bars (B = 16 and 64 against one stream) from "
                    "--json FILE's lines, every model in it (MODEL is not read), and exit")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="runs a batch size (and one stream); the median counts")
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=["kernels"])
    ap.add_argument("--json", help="append one JSON line per (route, batch) to this file")
    args = ap.parse_args()
    if args.bars:
        with open(args.bars) as f:
            print(bars([json.loads(line) for line in f if line.strip()]))
        return
    if args.suggest:
        with open(args.suggest) as f:
            print(suggest([json.loads(line) for line in f if line.strip()], args.model))
        return
    model, _ = rwkv_mlx.load(args.model)
    # the usual plan, one stream: the reference of the ratios (one run of 32 tokens gave 236 to 314 tok/s in
    # processes of one tree, kernel_log step 20, and every ratio of the table divides by it)
    alone, one_tps, one_runs, _ = runs(model, 1, args.tokens, args.runs)
    alone_logits = None  # (computed once, when a batch size's row 0 first differs)
    print(f"| {args.model} (one stream: {one_tps:,.1f} tok/s, runs {spread(one_runs)}; {args.tokens} tokens) "
          "| route | B | total tok/s | runs | x one stream | row 0 = alone |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for name in args.routes:
            if name.startswith("matmul") and batch == 1:
                continue  # MAX_BATCH can't refuse one row
            with route(model, name, batch):
                rows, tps, all_tps, repeated = runs(model, batch, args.tokens, args.runs)
                forced = None
                if rows[0] != alone[0]:  # teacher forcing: does row 0 stay within rounding of the alone logits?
                    forced = row0_reference(model, batch, args.tokens, forced=alone[0])
            if forced is not None and alone_logits is None:
                alone_logits = row0_reference(model, 1, args.tokens)
            ok, said = row0_agreement(alone[0], rows[0], alone_logits, forced)
            if not repeated:
                ok, said = False, said + "; its runs decoded different tokens"
            speed = f"{tps:,.1f}" if ok else "(tokens differ: no speed)"
            print(f"| | {name} | {batch} | {speed} | {spread(all_tps)} | {tps / one_tps:.1f} | {said} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"model": args.model, "route": name, "batch": batch,
                                        "tps": tps if ok else None, "runs": all_tps if ok else None,
                                        "one_stream": one_tps, "one_stream_runs": one_runs,
                                        "settings": settings.in_effect(), "tree": str(Path(rwkv_mlx.__file__).parents[1]),
                                        "same": sum(a == b for a, b in zip(rows[0], alone[0])),
                                        "tokens": len(alone[0]), "row0": said}) + "\n")


if __name__ == "__main__":
    main()
