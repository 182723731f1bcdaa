#!/usr/bin/env python3
"""Write an RWKV-7 GGUF of any shape with seeded random weights (rwkv_mlx/testing/synthetic.py).

    python scripts/make_synthetic_model.py --out /tmp/syn-2.9b-Q4_K_M.gguf --type Q4_K_M
    python scripts/make_synthetic_model.py --out tiny.gguf --type F16 --layers 2 --n-embd 256 \\
        --ffn 1024 --ranks 32,32,16,64 --vocab 4096
"""

import sys
from pathlib import Path

try:
    from rwkv_mlx.testing.synthetic import main
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rwkv_mlx.testing.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
