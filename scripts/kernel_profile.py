"""GPU time of every kernel in decoded tokens and in a prompt chunk, read with CUPTI.

    python scripts/kernel_profile.py MODEL.gguf [--tokens 16] [--prompt 512] [--batch 1] [--repeat 3]

A development aid for kernel work (results/kernel_log.md). MLX has no kernel
profiler of its own; torch.profiler's CUPTI tracer records every kernel the
process runs on the device, MLX's included, so this needs a CUDA build of
torch beside MLX's CUDA backend. Prints, per kernel name, calls per token and
GPU microseconds, and compares the GPU's busy time with the wall-clock time:
when busy time is far below wall time, the host sets the pace.

--repeat N first times N unprofiled decode runs in the same process (tok/s, and the process's CPU time a
token), then the host's time to queue a step while the GPU is idle: one tree's one-row decode differed by up
to 1.6x between processes (results/kernel_log.md step 23), and a slow process's busy time against a fast one's
says whether its kernels or its host were slower.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

import rwkv_mlx
from rwkv_mlx.bench.measure import greedy_steps, host_alone
from rwkv_mlx.text.generate import prefill


def table(prof, per: int, wall_us: float, what: str) -> None:
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    busy = sum(e.device_time_total for e in rows)
    print(f"\n## {what}: GPU busy {busy / per:.1f} us per {'token' if per > 1 else 'chunk'}, "
          f"wall {wall_us / per:.1f} us")
    print("| kernel | calls | GPU us total | GPU us per call |\n|---|---|---|---|")
    for e in rows[:25]:
        print(f"| {e.key[:90]} | {e.count / per:.1f} | {e.device_time_total / per:.1f} | "
              f"{e.device_time_total / max(e.count, 1):.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="decode this many rows at once (model.step's batch)")
    ap.add_argument("--repeat", type=int, default=0, help="first time this many unprofiled decode runs of --tokens")
    ap.add_argument("--no-prefill", action="store_true", help="profile decode only")
    args = ap.parse_args()
    torch.cuda.init()
    model, _ = rwkv_mlx.load(args.model)
    ids = [(7 * i + 3) % model.args.vocab_size for i in range(args.prompt)]
    logits, state = model(mx.array([ids[:16]] * args.batch), logits="last")
    logits = logits[:, -1]
    token = mx.argmax(logits, axis=-1)
    for _ in range(4):  # compile the decode step
        logits, state = model.step(token, state)
        token = mx.argmax(logits, axis=-1)
        mx.eval(token, *state.arrays())
    for r in range(args.repeat):
        timings: dict = {}
        rows, seconds = greedy_steps(model, token, state, args.tokens, timings)
        print(f"timed run {r + 1}: {args.batch * args.tokens / seconds:8.1f} tok/s, "
              f"{seconds / args.tokens * 1e6:7.0f} us a step (cpu {timings['cpu'] / args.tokens * 1e6:6.0f}), "
              f"first tokens {rows[0][:6]}")
    if args.repeat:  # (each step after the one before finished: queueing never waits for the device)
        alone = host_alone(model, token, state, args.tokens)
        print(f"timed host alone: {(alone['replay'] + alone['queue']) * 1e6:7.0f} us to queue a step with the GPU "
              f"idle (cpu {alone['cpu'] * 1e6:6.0f})")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tic = time.perf_counter()
        for _ in range(args.tokens):
            logits, state = model.step(token, state)
            token = mx.argmax(logits, axis=-1)
            mx.async_eval(token, *state.arrays())
        mx.eval(token)
        wall = (time.perf_counter() - tic) * 1e6
    table(prof, args.tokens, wall, f"decode ({args.batch} rows a step)")
    if args.no_prefill:
        return
    mx.eval(prefill(model, ids)[0])  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tic = time.perf_counter()
        mx.eval(prefill(model, ids)[0])
        wall = (time.perf_counter() - tic) * 1e6
    table(prof, 1, wall, f"prefill of {args.prompt} tokens")


if __name__ == "__main__":
    main()
