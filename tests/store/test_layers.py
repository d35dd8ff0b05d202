"""The store package is layered: base, observe <- memory, redis <- factory <- __init__.

Read from the source with `ast`, so every import counts: module-level, function-local (the
factory's lazy backend imports) and under `if TYPE_CHECKING:` alike. A cycle among these
modules is what this guards against, even one Python would tolerate at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sidecar.store"
ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "sidecar" / "store"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def store_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # Relative: level 1 is this module's package (the module itself for __init__).
                anchor = name.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            # `import sidecar.store.memory` also runs sidecar.store, but only as the parent
            # package of the target; that implicit edge is not counted.
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = store_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for child in sorted(graph.get(node, ())):
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child not in done:
                cycle = visit(child)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_the_graph_is_read() -> None:
    # Guard against a vacuous pass: the walker must see the imports we know are there,
    # including the factory's function-local backend imports.
    graph = import_graph()
    assert "sidecar.store.base" in graph["sidecar.store.memory"]
    assert "sidecar.store.resp" in graph["sidecar.store.redis"]
    assert {"sidecar.store.memory", "sidecar.store.redis"} <= graph["sidecar.store.factory"]
    assert "sidecar.store.factory" in graph["sidecar.store"]


def test_find_cycle_sees_type_checking_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sidecar.store.b import X\n"
    )
    (tmp_path / "a.py").write_text(source)
    found = imported_modules("sidecar.store.a", tmp_path / "a.py", {"sidecar.store.b"})
    assert found == {"sidecar.store.b"}
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_store_imports_are_acyclic() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in sidecar/store: " + " -> ".join(cycle or [])


def test_backends_sit_below_the_factory() -> None:
    graph = import_graph()
    for backend in ("sidecar.store.memory", "sidecar.store.redis"):
        assert "sidecar.store.factory" not in graph[backend]
        assert PACKAGE not in graph[backend]
