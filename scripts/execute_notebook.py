"""Execute notebooks/quickstart.ipynb top to bottom on the bundled demo model and save it with its outputs.

    python scripts/execute_notebook.py

The committed notebook then reads on GitHub as a real run; tests/test_notebook.py checks that
it was saved this way and executes it again in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def main() -> None:
    env_model = os.environ.pop("RWKV_MLX_MODEL", None)  # the demo model, whatever the shell says
    if env_model:
        print(f"ignoring RWKV_MLX_MODEL={env_model}: the committed run uses the demo model")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} with outputs")


if __name__ == "__main__":
    main()
