"""Prompt logits on this device against the oracle's exact float64 logits, per expansion dtype.

    python scripts/prefill_fidelity.py ORACLE_DIR [--expand float32 float16] [--names fixa-Q4_K_M ...]

Each oracle file's tokens are fed as one prompt (all positions' logits) with the load options of
this device, the quantized weights expanded for the products in each dtype asked for
(``layers.CUDA_EXPAND_DTYPE``; CUDA only, elsewhere the setting does nothing). The figures are the
oracle README's: max abs and rms difference from ``ref64`` and the share of positions whose top-1
token agrees. The oracle's bar for a documented lossy choice (float16 activations): state the
figure, aim under 0.05 max and 0.01 rms, top-1 at least 0.97. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

import rwkv_mlx
from rwkv_mlx import layers


def tokens(oracle: Path, name: str) -> list[int]:
    text = (oracle / "logits" / f"{name.split('-', 1)[0]}.tokens.txt").read_text()
    return [int(t) for t in text.replace("\n", ",").split(",") if t.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("oracle", type=Path, help="a folder with models/*.gguf and logits/ (the oracle or a part of it)")
    ap.add_argument("--expand", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    ap.add_argument("--names", nargs="*", help="oracle file names (default: every model in the folder)")
    args = ap.parse_args()
    names = args.names or sorted(p.stem for p in (args.oracle / "models").glob("*.gguf"))
    print(f"device: {mx.default_device()}, products expanded from {layers.cuda_dequant_min_rows()} rows")
    print("| file | expansion | max abs vs ref64 | rms | top-1 agreement |\n|---|---|---|---|---|")
    for name in names:
        model, _ = rwkv_mlx.load(args.oracle / "models" / f"{name}.gguf")
        ids = tokens(args.oracle, name)
        ref = np.load(args.oracle / "logits" / f"{name}.ref64.npy")
        for dtype in args.expand:
            layers.CUDA_EXPAND_DTYPE = dtype
            model.runtime.invalidate()
            logits, _ = model(mx.array([ids]), logits="all")
            ours = np.array(logits.astype(mx.float32))[0]
            diff = ours - ref
            agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
            print(f"| {name} | {dtype} | {np.abs(diff).max():.2g} | {np.sqrt((diff ** 2).mean()):.2g} | {agree:.3f} |")
        layers.CUDA_EXPAND_DTYPE = None


if __name__ == "__main__":
    main()
