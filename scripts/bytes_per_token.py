"""Bytes one decoded token reads by a GPU backend's launch plans, beside the GGUF's tensor bytes.

Runs on any machine (the launches are recorded, not run: rwkv_mlx/bench/bytes_read.py). Each file
is loaded as the GPU backend loads it (``LoadOptions.for_backend(backend)``) and counted; one
markdown row per file goes to stdout (for results/bytes_per_token.md), with ``--json`` the full
breakdown too.

    python scripts/bytes_per_token.py /tmp/syn-2.9b-Q4_K_M.gguf --backend metal
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

from rwkv_mlx.bench.bytes_read import token_bytes
from rwkv_mlx.bench.record import format_table
from rwkv_mlx.errors import RwkvMlxError
from rwkv_mlx.loader import load
from rwkv_mlx.model.weights import LoadOptions

HEADER = ["file", "layers", "GGUF GB / token", "plan GB / token", "ratio", "blocks' matrices (plan / GGUF)",
          "head GB", "LoRA GB", "state MB"]


def row(path: str, backend: str, scale_dtype: str) -> tuple[list[str], dict]:
    model, _ = load(path, LoadOptions.for_backend(backend, scale_dtype=scale_dtype))
    tb = token_bytes(model, path, backend)
    n_layer = model.args.n_layer
    del model
    gc.collect()
    parts = tb.plan.parts
    matrices = ", ".join(f"{t} {p / 1e9:.3f} / {g / 1e9:.3f} GB = {p / g:.3f}x"
                         for t, (p, g) in sorted(tb.matrices.items()))
    cells = [path.rsplit("/", 1)[-1], str(n_layer), f"{tb.gguf.per_token / 1e9:.3f}", f"{tb.plan.total / 1e9:.3f}",
             f"{tb.ratio:.3f}x", matrices, f"{parts.get('head', 0) / 1e9:.3f}", f"{parts.get('lora', 0) / 1e9:.3f}",
             f"{parts.get('state', 0) / 1e6:.1f}"]
    return cells, tb.to_json()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="GGUF files")
    ap.add_argument("--backend", choices=("metal", "cuda"), default="metal")
    ap.add_argument("--scale-dtype", default="float32", help="affine scales' dtype, as `--scale-dtype` of the CLI")
    ap.add_argument("--json", action="store_true", help="also print each file's full breakdown as a JSON line")
    args = ap.parse_args(argv)
    rows = []
    for path in args.files:
        try:
            cells, figures = row(path, args.backend, args.scale_dtype)
        except RwkvMlxError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        rows.append(cells)
        if args.json:
            print(json.dumps({"file": path, **figures}), flush=True)
    sys.stdout.write(format_table(HEADER, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
