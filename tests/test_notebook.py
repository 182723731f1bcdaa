"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel of this virtual environment.

The notebook is committed executed (outputs of a run on the demo model, made by
``scripts/execute_notebook.py``); it is executed again here, in memory.  Model: the
bundled demo model when present, else an oracle file, else a tiny synthetic model
(test_state.tiny_model_path) -- the notebook's own assertions (a cached state gives
the same text as the whole prompt; a batch gives what one-at-a-time gives) run on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import ORACLE
from conftest import tiny_model_path

from rwkv_mlx import DEMO_MODEL

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel is in the test extra: pip install -e '.[test]'")
pytest.importorskip("matplotlib", reason="matplotlib is in the test extra: pip install -e '.[test]'")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def notebook_model() -> Path:
    for path in (DEMO_MODEL, ORACLE / "models" / "fixa-Q4_K_M.gguf"):
        if path.is_file():
            return path
    return tiny_model_path()


def test_notebook_is_committed_executed_on_the_demo_model():
    """The committed outputs are a real top-to-bottom run on the demo model, so the notebook reads on GitHub."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert code[0].outputs[0]["text"].startswith(DEMO_MODEL.name)  # the first cell prints the model's file name
    assert any("image/png" in o.get("data", {}) for o in outputs) and any("text/markdown" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("RWKV_MLX_MODEL", str(notebook_model()))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any failure

    printed = nb.cells[-1].outputs[0]["text"].strip()
    assert printed == sys.prefix, "the kernel ran another Python than this virtual environment's"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the probability plot was not drawn"
    assert any("text/markdown" in o.get("data", {}) for o in outputs), "no top-k table"
    assert not any(o.get("output_type") == "error" for o in outputs)
