"""The adapters package has no import cycle, counting imports inside functions too.

A cycle hidden by an import inside a function still couples the modules both ways (and breaks
as soon as someone moves the import to the top); so every `import` / `from ... import` anywhere
in a module's syntax tree counts. `import_graph` and `find_cycle` take any package directory.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path, package_dir: Path, package_name: str) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package_name, *parts])


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name `from <level dots><target> import ...` means inside `module`."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(package_dir: Path | str, package_name: str) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, for every .py file under package_dir.
    Counts imports at any depth (inside functions, classes, if/try blocks) and both
    `from .x import y` and `from package.x import y`; `from . import y` (or `from package import
    y`) counts as importing the submodule y when there is one, else the package itself."""
    package_dir = Path(package_dir)
    files = {_module_name(p, package_dir, package_name): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(files)

    def inside(name: str) -> str | None:
        """The longest module of the package that `name` is or lies in."""
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                          else node.module or "")
                # `from pkg import name` may name a submodule: count that submodule
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                found = inside(target)
                if found is not None and found != module:
                    edges.add(found)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_adapters_has_no_import_cycle():
    graph = import_graph(ROOT / "adapters", "adapters")
    assert "adapters.base" in graph and "adapters.gradient" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in adapters/: " + " -> ".join(cycle)


def test_the_contract_imports_no_adapter():
    """base.py (the contract) and common.py (helpers) sit below every adapter."""
    graph = import_graph(ROOT / "adapters", "adapters")
    assert graph["adapters.common"] == set()
    assert graph["adapters.base"] <= {"adapters.common"}


def test_no_import_inside_a_function_in_adapters():
    """Every import of adapters/ runs when its module is imported, where the dependency is visible."""
    found = set()
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found |= {f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(function)
                          if isinstance(node, (ast.Import, ast.ImportFrom))}
    assert not found, f"imports inside functions: {sorted(found)}"


@pytest.mark.parametrize("sources, cycle", [
    # a cycle hidden in a function body, through `from . import NAME` of the package
    ({"__init__.py": "from .a import A\n", "a.py": "def f():\n    from . import REGISTRY\n"},
     ["pkg", "pkg.a", "pkg"]),
    # a -> b -> c -> a, mixing relative and absolute forms
    ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "import pkg.c\n",
      "c.py": "class C:\n    def m(self):\n        from pkg.a import y\n"},
     ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
    # `from . import b` names the submodule b
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "if True:\n    from .a import z\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    ({"__init__.py": "from .a import A\n", "a.py": "import os\nfrom .b import B\n", "b.py": "import torch\n"}, None),
])
def test_find_cycle_sees_hidden_cycles(tmp_path, sources, cycle):
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    assert find_cycle(import_graph(tmp_path, "pkg")) == cycle
