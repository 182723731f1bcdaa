"""``python -m rwkv_mlx.bench ...``: the benchmark command where no console script is installed."""

import sys

from ..cli import run

sys.exit(run(["benchmark", *sys.argv[1:]]))
