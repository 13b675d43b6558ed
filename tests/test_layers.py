"""The module layout: imports between ray_zerocopy's modules go one way (no cycle), and no module imports
another's private names. Reads the source only (no Ray, no torch): a fast unit test."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_zerocopy"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    for path in (PACKAGE.parent / "backends").glob("*.py"):  # (installed as ray_zerocopy.backends)
        out[f"ray_zerocopy.backends.{path.stem}".removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """``(imported module, imported name or "")`` for every ray_zerocopy import, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("ray_zerocopy")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "ray_zerocopy":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "") if sub in modules else (base, alias.name))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module -> the modules it imports, private names imported across modules, names taken from the root)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private, from_root = [], []
    for name, path in modules.items():
        for target, attr in _imports(name, path, modules):
            if target != name and target in modules:
                graph[name].add(target)
            if attr.startswith("_") and not attr.startswith("__") and target != name:
                private.append(f"{name} imports {target}.{attr}")
            if target == "ray_zerocopy" and attr and name != "ray_zerocopy":
                from_root.append(f"{name} imports {attr} from the package root")
    return graph, private, from_root


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules (re-exports) is not a layer above them
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_between_modules_have_no_cycle():
    graph, _, _ = _graph()
    assert "ray_zerocopy.actor" in graph and "ray_zerocopy.backends.packed" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_module_imports_private_names_of_another():
    _, private, _ = _graph()
    assert private == []


def test_only_the_package_root_imports_from_the_package_root():
    """Modules import a name from the module that defines it, never from the root (which imports everything)."""
    _, _, from_root = _graph()
    assert from_root == []


def test_the_runtime_does_not_import_the_benchmark_or_the_test_kit():
    graph, _, _ = _graph()
    runtime = [m for m in graph if not m.startswith(("ray_zerocopy.bench", "ray_zerocopy.testing"))
               and m not in ("ray_zerocopy.__main__",)]
    leaks = [(m, t) for m in runtime for t in graph[m] if t.startswith(("ray_zerocopy.bench", "ray_zerocopy.testing"))]
    assert leaks == []
