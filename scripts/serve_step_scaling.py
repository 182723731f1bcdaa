#!/usr/bin/env python3
"""Where a served decode step goes, per batch size: Model.step and the batched sampling, in ms.

    python scripts/serve_step_scaling.py [--model FILE] [--sizes 1,4,16,64]

Median of 5 steps (sampling: of 3), each evaluated alone; rows use the reference sampling defaults
(top-p 0.85, penalties) with a seed each. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx import SamplingParams
from rwkv_mlx.cli.common import resolve_model, select_device
from rwkv_mlx.text.generate import sampler_for
from rwkv_mlx.serve.batch_sampling import sample_rows


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--sizes", default="1,4,16,64")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    select_device(args.device)
    model, tokenizer = rwkv_mlx.load(resolve_model(args.model))
    print("| rows | step ms | step ms / row | sampling ms | sampling ms / row |\n|---|---|---|---|---|")
    for B in map(int, args.sizes.split(",")):
        box = {"state": model.initial_state(B)}
        tokens = mx.zeros((B,), dtype=mx.uint32)

        def step():
            box["logits"], box["state"] = model.step(tokens, box["state"])
            mx.eval(box["logits"], *box["state"].arrays())

        step()  # warm-up (a GPU compiles the step for this size)
        step_ms = median_ms(step, 5)
        samplers = [sampler_for(model, tokenizer, SamplingParams(seed=i), 1) for i in range(B)]

        def sample():
            mx.eval(sample_rows(box["logits"], samplers), *[a for s in samplers for a in s.state])

        sample()
        sample_ms = median_ms(sample, 3)
        print(f"| {B} | {step_ms:.1f} | {step_ms / B:.2f} | {sample_ms:.1f} | {sample_ms / B:.2f} |", flush=True)


if __name__ == "__main__":
    main()
