"""The import graph matches docs/architecture.md: every import runs down the layer table
(or stays inside its own package), and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import cloister

ROOT = Path(cloister.__file__).parent

# Lowest first; a module may import its own package and any package of a lower layer.
LAYERS: list[set[str]] = [
    {"errors", "_histogram"},
    {"wire", "_tasks", "_backoff", "_loopwatch", "_quiet", "_events", "ring"},
    {"schema"},
    {"backends"},
    {"store"},
    {"cluster"},
    {"sources", "local"},
    {"manager"},
    {"health"},
    {"observer", "metrics", "demo", "testing"},
    {"client"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER_OF = {package: n for n, packages in enumerate(LAYERS) for package in packages}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(["cloister", *parts])


def _imports(path: Path) -> set[str]:
    """Every ``cloister.*`` name ``path`` imports, at any depth (TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cloister"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module == "cloister" or (node.module or "").startswith("cloister."))
        ):
            # ``from cloister.x import y``: y may be a submodule or a name of cloister.x
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    # compiled modules (the ring's accelerator) are known by their stubs; they import nothing
    compiled = {_module_name(p) for p in ROOT.rglob("*.pyi")} - set(modules)
    graph: dict[str, set[str]] = {name: set() for name in compiled}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported not in modules and imported not in compiled and "." in imported:
                imported = imported.rsplit(".", 1)[0]  # a name imported from a module
            if (imported in modules or imported in compiled) and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_every_package_has_a_layer() -> None:
    packages = {_package(_module_name(p)) for p in ROOT.rglob("*.py")}
    assert packages <= set(LAYER_OF), packages - set(LAYER_OF)


def test_imports_only_run_down_the_layers() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in _graph().items()
        for target in targets
        if _package(target) != _package(source)
        and LAYER_OF[_package(target)] >= LAYER_OF[_package(source)]
        and _package(target) != "__init__"  # cloister/__init__ re-exports; nobody needs it
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: a component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []
