"""How fast MLX's CPU backend multiplies float32 matrices here, beside numpy's BLAS on the same shapes.

    python scripts/cpu_gemm.py [--repeats 3]

The shapes are the demo model's prompt products (512 tokens: the head 256 -> 65536, the FFN
256 -> 1024 and back) and one square product. Each product is timed after a warm-up, the best of
``--repeats``; both libraries get the same float32 operands and the results are compared, so a
figure comes only from a product that agrees. MLX's CPU backend is this project's correctness
path: the table says what a Linux user of it should expect from prompts, perplexity and training.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import mlx.core as mx
import numpy as np

SHAPES = [  # (M, K, N): [M, K] @ [K, N]
    (512, 256, 65536),  # the demo model's head over a 512-token prompt
    (512, 256, 1024),  # its FFN key
    (512, 1024, 256),  # its FFN value
    (1024, 1024, 1024),
]


def best_of(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    print(f"MLX {mx.__version__} (CPU backend), numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| M x K x N | MLX ms | MLX GFLOP/s | numpy ms | numpy GFLOP/s | numpy / MLX |")
    print("|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        xa, xb = mx.array(a), mx.array(b)
        ours, theirs = np.array(xa @ xb), a @ b
        scale = np.abs(theirs).max()
        if not np.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale):
            raise SystemExit(f"{m}x{k}x{n}: MLX and numpy disagree (max diff {np.abs(ours - theirs).max():.3g})")
        t_mlx = best_of(lambda: mx.eval(xa @ xb), args.repeats)
        t_np = best_of(lambda: a @ b, args.repeats)
        flop = 2 * m * k * n
        print(f"| {m} x {k} x {n} | {t_mlx * 1e3:.1f} | {flop / t_mlx / 1e9:.1f} | {t_np * 1e3:.1f} | "
              f"{flop / t_np / 1e9:.1f} | {t_mlx / t_np:.1f}x |")


if __name__ == "__main__":
    main()
