#!/usr/bin/env python3
"""Time mlx-lm's RWKV-7 beside rwkv-mlx (rwkv_mlx/bench/peers.py; ``--help`` for the options).

    python scripts/bench_peers.py --model rwkv7-2.9b-Q4_K_M.gguf --mode 4bit
    python scripts/bench_peers.py --model fixa-f32.gguf --mode float32      # token agreement check
"""

import sys
from pathlib import Path

try:
    from rwkv_mlx.bench.peers import main
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rwkv_mlx.bench.peers import main

if __name__ == "__main__":
    sys.exit(main())
