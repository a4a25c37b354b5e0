"""The layers of the project (docs/ARCHITECTURE.md): no import cycle among its modules, counting
imports inside functions too, and imports that point down.

A cycle hidden by an import inside a function still couples the modules both ways (and breaks
as soon as someone moves the import to the top); so every `import` / `from ... import` anywhere
in a module's syntax tree counts. `import_graph` and `find_cycle` take any package directories.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def import_graph(package_dir: Path | str, package_name: str, *more: tuple[Path | str, str]) -> dict[str, set[str]]:
    """{module: modules of the packages it imports}, for every .py file under the package dirs.
    Counts imports at any depth (inside functions, classes, if/try blocks) and both
    `from .x import y` and `from package.x import y`; `from . import y` (or `from package import
    y`) counts as importing the submodule y when there is one, else the package itself."""
    files = {}
    for folder, name in [(package_dir, package_name), *more]:
        folder = Path(folder)
        files.update({_module_name(p, folder, name): p for p in sorted(folder.rglob("*.py"))
                      if "_generated" not in p.parts})
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


def project_graph() -> dict[str, set[str]]:
    return import_graph(ROOT / "adapters", "adapters", (ROOT / "runtime", "runtime"))


def direct_imports(module: str) -> set[str]:
    """Top-level names of everything a module imports (torch, asyncio, runtime, ...)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def reaches(graph: dict[str, set[str]], module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_project_has_no_import_cycle():
    graph = project_graph()
    assert "adapters.base" in graph and "runtime.engine.table" in graph and "runtime.serving.wire" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    """server -> serving -> engine -> guard/drift/metrics/checkpoints -> adapters; never back up."""
    graph = project_graph()
    serving = {m for m in graph if m.startswith("runtime.serving")}
    engine = {m for m in graph if m.startswith("runtime.engine")}
    below_engine = {"runtime.guard", "runtime.drift", "runtime.metrics", "runtime.checkpoints",
                    "runtime.model_config", "runtime.preprocess", "runtime.protocol",
                    *(m for m in graph if m.startswith("runtime.coordination"))}
    for module in engine | below_engine | {m for m in graph if m.startswith("adapters")}:
        assert not graph[module] & (serving | {"runtime.server"}), f"{module} imports the serving layer"
    for module in below_engine | {m for m in graph if m.startswith("adapters")}:
        assert not graph[module] & engine, f"{module} imports the engine"
    for module in (m for m in graph if m.startswith("adapters")):
        assert not {m for m in graph[module] if m.startswith("runtime")}, f"{module} imports runtime"


def test_clients_never_import_the_server():
    """Clients share only runtime/protocol.py with the server (and the generated stubs)."""
    graph = project_graph()
    server_side = {m for m in graph if m.startswith(("runtime.serving", "runtime.engine"))} | {"runtime.server"}
    clients = [m for m in graph if m in ("runtime.ctl", "runtime.healthcheck") or m.startswith("runtime.demo")]
    assert "runtime.ctl" in clients and any(m.startswith("runtime.demo") for m in clients)
    for module in clients:
        assert not reaches(graph, module) & server_side, f"{module} reaches the server's modules"


def test_serving_knows_protos_not_torch_and_never_a_stream():
    graph = project_graph()
    for module in (m for m in graph if m.startswith("runtime.serving")):
        assert not direct_imports(module) & {"torch", "adapters"}, f"{module} imports torch or adapters"
        assert not graph[module] & {"runtime.engine.stream", "runtime.engine.table"}, f"{module} touches streams"


def test_only_jobs_touches_both_asyncio_and_the_worker_thread():
    graph = project_graph()
    for module in (m for m in graph if m.startswith("runtime.engine")):
        imported = direct_imports(module)
        if module != "runtime.engine.jobs":
            assert not imported & {"asyncio", "threading", "queue"} or module == "runtime.engine.engine" \
                and not imported & {"asyncio", "threading"}, f"{module} crosses the thread boundary"


def test_adapters_contract_imports_no_adapter():
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
