"""Load time of models, each load in a fresh Python process, the files' runs interleaved.

    python scripts/load_times.py --runs 3 demo.gguf demo-mlx/ syn-2.9b-Q4_K_M.gguf syn-2.9b-keep/

For each run and each path, in turn: a new interpreter imports rwkv_mlx, then
``rwkv_mlx.load(path, LoadOptions.for_backend(...), return_info=True)`` is timed
(the call ends with every parameter evaluated).  The page cache is warmed by one
untimed load of each path first.  Interleaving the paths spreads the machine's
other load over all of them alike.  Prints one markdown row per path: the times,
the median, the weights in memory, and the 1-minute load average around the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import rwkv_mlx
from rwkv_mlx import LoadOptions
options = LoadOptions.for_backend(sys.argv[2])
t = time.perf_counter()
model, tokenizer, info = rwkv_mlx.load(sys.argv[1], options, return_info=True)
print(json.dumps({"seconds": time.perf_counter() - t, "weight_bytes": info.weight_bytes}))
"""


def load_once(path: str, backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, backend], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", default="cpu", help="cpu (float32, Q6_K dequantized) or gpu (the GPU layout)")
    args = ap.parse_args()
    for p in args.paths:
        load_once(p, args.backend)  # warm the page cache
    times: dict[str, list[float]] = {p: [] for p in args.paths}
    sizes: dict[str, int] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for p in args.paths:
            r = load_once(p, args.backend)
            times[p].append(r["seconds"])
            sizes[p] = r["weight_bytes"]
        loads.append(os.getloadavg()[0])
    print("| path | load times (s) | median | weights in memory | load average |")
    print("|---|---|---|---|---|")
    for p in args.paths:
        ts = " / ".join(f"{t:.3f}" for t in times[p])
        print(f"| {p} | {ts} | {statistics.median(times[p]):.3f} | {sizes[p] / 1e6:.0f} MB | "
              f"{min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
