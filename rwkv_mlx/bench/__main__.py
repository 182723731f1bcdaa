"""``python -m rwkv_mlx.bench ...``: the benchmark command where no console script is installed."""

import sys

if __name__ == "__main__":  # importing the package's modules (tests walk them all) must not run it
    from ..cli import run

    sys.exit(run(["benchmark", *sys.argv[1:]]))
