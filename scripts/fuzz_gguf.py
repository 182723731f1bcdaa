#!/usr/bin/env python3
"""Fuzz the GGUF reader (rwkv_mlx/testing/fuzz_gguf.py; ``--help`` for the options).

    python scripts/fuzz_gguf.py --minutes 10               # oracle files + tiny models
    python scripts/fuzz_gguf.py --minutes 1 --base my.gguf --seed 7
"""

import sys
from pathlib import Path

try:
    from rwkv_mlx.testing.fuzz_gguf import main
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rwkv_mlx.testing.fuzz_gguf import main

if __name__ == "__main__":
    sys.exit(main())
