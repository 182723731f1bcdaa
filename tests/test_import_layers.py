"""The package's import graph: no cycles between modules or between packages, every arrow down the layers.

The graph is read from the source with ``ast`` (every ``import`` statement, those
inside functions included), not by importing anything, so it does not depend on
the code it checks.  Imports built from strings (``importlib.import_module``)
are not seen; the CLI registers its commands that way, from the top layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rwkv_mlx"

# Bottom to top; an import may only point to a lower layer or stay inside its own unit.
# A unit is a subpackage (rwkv_mlx.model) or a top-level module (rwkv_mlx.arch).
LAYERS = [
    {"errors", "version"},
    {"backend", "progress", "io", "settings"},
    {"arch", "quants"},
    {"layers"},  # storage-form matrix layers: below the kernels that read them
    {"kernels"},
    {"model", "formats"},  # peers: neither knows the other
    {"text"},
    {"loader"},  # wires formats to the model
    {"train", "bench"},
    {""},  # rwkv_mlx/__init__.py: the public facade
    {"serve"},  # the applications, on the public API: the HTTP server,
    {"cli"},  # and the command line that starts it
    {"testing"},  # tests' and scripts' helpers, which use the public API
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = ["rwkv_mlx", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of rwkv_mlx that ``name`` imports (``from pkg import mod`` counts as mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import rwkv_mlx.x.y as z`` style names
                target = target.rpartition(".")[0]
            if target.startswith("rwkv_mlx") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = source_modules()
    known = set(mods)
    # entry points run a command; nothing imports them
    return {m: imports_of(m, p, known) for m, p in mods.items() if not m.endswith("__main__")}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The parser finds what it must (else the checks below would pass on an empty graph)."""
    g = graph()
    assert "rwkv_mlx.model.rwkv7" in g["rwkv_mlx.loader.gguf"] or "rwkv_mlx.model" in g["rwkv_mlx.loader.gguf"]
    assert "rwkv_mlx.formats.gguf_file" in g["rwkv_mlx.loader.gguf"]
    assert "rwkv_mlx.quants" in g["rwkv_mlx.formats.gguf_writer"]  # ``from .. import quants``
    assert "rwkv_mlx.kernels" in g["rwkv_mlx.model.wkv"]  # a function-level import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in source_modules()} - set(RANK))
    assert not missing, f"place these in LAYERS (and docs/architecture.md): {missing}"


def test_no_module_cycle():
    assert cycles(graph()) == []


def test_no_package_cycle():
    units: dict[str, set[str]] = {}
    for m, targets in graph().items():
        units.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m))
    assert cycles(units) == []


def test_imports_point_down_the_layers():
    wrong = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
             if unit(t) != unit(m) and RANK[unit(t)] >= RANK[unit(m)]]
    assert wrong == []


@pytest.mark.parametrize("a,b", [("model", "formats"), ("formats", "model"), ("kernels", "model"),
                                 ("kernels", "formats"), ("formats", "loader"), ("model", "loader")])
def test_no_import_between(a, b):
    bad = [f"{m} -> {t}" for m, targets in graph().items() if unit(m) == a for t in targets if unit(t) == b]
    assert bad == []
