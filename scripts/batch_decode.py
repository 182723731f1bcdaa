"""Batched decode throughput: total tok/s of ``model.step`` for B rows at once, tokens checked.

    python scripts/batch_decode.py MODEL.gguf [--batches 1 4 16 64] [--tokens 64]

Each row decodes greedily from its own prompt. Row 0's tokens at every B must equal the
tokens of the same prompt decoded alone; a batch size whose rows disagree reports no speed.
A development aid for the server's batching (issue: batched decode must scale); the figures
are printed as a table to paste into results/.
"""

from __future__ import annotations

import argparse

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx.bench.measure import greedy_steps


def prompts(model, batch: int, n: int = 16) -> mx.array:
    """B different prompts of n token ids spread over the vocabulary (no tokenizer needed)."""
    V = model.args.vocab_size
    return mx.array([[(7 * i + 3 + 101 * b) % V for i in range(n)] for b in range(batch)])


def run(model, batch: int, n_tokens: int):
    logits, state = model(prompts(model, batch), logits="last")
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token, *state.arrays())
    for _ in range(3):  # compile the step for this batch size
        model.step(token, state)
    rows, seconds = greedy_steps(model, token, state, n_tokens)
    return rows, batch * n_tokens / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model, _ = rwkv_mlx.load(args.model)
    alone, one_tps = run(model, 1, args.tokens)
    print(f"| {args.model} | B | total tok/s | x one stream | row 0 = alone |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        rows, tps = run(model, batch, args.tokens)
        same = sum(a == b for a, b in zip(rows[0], alone[0]))
        speed = f"{tps:,.1f}" if same == args.tokens else "(tokens differ: no speed)"
        print(f"| | {batch} | {speed} | {tps / one_tps:.1f} | {same}/{args.tokens} |", flush=True)


if __name__ == "__main__":
    main()
