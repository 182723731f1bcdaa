"""Batched decode throughput: total tok/s of ``model.step`` for B rows at once, tokens checked.

    python scripts/batch_decode.py MODEL.gguf [--batches 1 4 16 64] [--tokens 64] [--routes kernels matmul]

Each row decodes greedily from its own prompt. Row 0's tokens at every B must equal the
tokens of the same prompt decoded alone; a batch size whose rows disagree reports no speed.
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

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx import layers
from rwkv_mlx.bench.measure import greedy_steps
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


def run(model, batch: int, n_tokens: int):
    logits, state = model(prompts(model, batch), logits="last")
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token, *state.arrays())
    for _ in range(3):  # compile the step for this batch size, and run it (MLX builds GPU kernels on first use)
        logits, after = model.step(token, state)
        mx.eval(logits, *after.arrays())
    rows, seconds = greedy_steps(model, token, state, n_tokens)
    return rows, batch * n_tokens / seconds


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--suggest", metavar="FILE", help="print the settings --json FILE's lines favour for MODEL, "
                    "as NAME=VALUE pairs for the shell, and exit")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=["kernels"])
    ap.add_argument("--json", help="append one JSON line per (route, batch) to this file")
    args = ap.parse_args()
    if args.suggest:
        with open(args.suggest) as f:
            print(suggest([json.loads(line) for line in f if line.strip()], args.model))
        return
    model, _ = rwkv_mlx.load(args.model)
    alone, one_tps = run(model, 1, args.tokens)  # the usual plan, one stream: the reference of the ratios
    print(f"| {args.model} | route | B | total tok/s | x one stream | row 0 = alone |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for name in args.routes:
            if name.startswith("matmul") and batch == 1:
                continue  # MAX_BATCH can't refuse one row
            with route(model, name, batch):
                rows, tps = run(model, batch, args.tokens)
            same = sum(a == b for a, b in zip(rows[0], alone[0]))
            ok = same == args.tokens
            speed = f"{tps:,.1f}" if ok else "(tokens differ: no speed)"
            print(f"| | {name} | {batch} | {speed} | {tps / one_tps:.1f} | {same}/{args.tokens} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"model": args.model, "route": name, "batch": batch,
                                        "tps": tps if ok else None, "one_stream": one_tps,
                                        "same": same, "tokens": args.tokens}) + "\n")


if __name__ == "__main__":
    main()
