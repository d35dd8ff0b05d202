"""The sidecar package's imports have no cycle, and keep the layering docs/architecture.md draws.

Read from the source with `ast`, so every import counts: module-level, function-local (lazy
imports) and under `if TYPE_CHECKING:` alike. The graph is one node per module, a package
being its `__init__`; the per-import rules are tests/store/test_layers.py's walker:

- `from sidecar.x import y` is an import of sidecar.x, and of sidecar.x.y when y is a module;
- a package `__init__` importing (re-exporting) its submodules imports them;
- `import sidecar.x.y` from *outside* sidecar.x also runs sidecar/x/__init__.py, so it counts
  as an import of sidecar.x too. From inside sidecar.x it does not: that package is already
  being imported. So a re-exporting `__init__` makes no cycle with its own submodules, and a
  module importing `sidecar.config` is in a cycle only if something config imports comes
  back to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.store.test_layers import ROOT, find_cycle, imported_modules, module_name

PACKAGE_DIR = ROOT / "sidecar"

POLICIES = (
    "sidecar.policies.tracing",
    "sidecar.policies.body_limit",
    "sidecar.policies.idempotency",
    "sidecar.policies.quota",
)


def sidecar_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def ancestors(name: str) -> list[str]:
    """The packages enclosing `name`, innermost first: sidecar.a.b -> [sidecar.a, sidecar]."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)]


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def import_graph() -> dict[str, set[str]]:
    modules = sidecar_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = imported_modules(name, path, known)
        # Importing a module runs the packages around it, unless the importer is in them.
        implicit = {
            package
            for target in targets
            for package in ancestors(target)
            if package in known and not inside(name, package)
        }
        graph[name] = (targets | implicit) - {name}
    return graph


def modules_of(graph: dict[str, set[str]], package: str) -> list[str]:
    return sorted(name for name in graph if inside(name, package))


def import_path(
    graph: dict[str, set[str]], start: str, forbidden: Callable[[str], bool]
) -> list[str] | None:
    """The shortest chain of imports from `start` to a forbidden module, or None."""
    parent: dict[str, str] = {}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        for child in sorted(graph[node]):
            if child in parent or child == start:
                continue
            parent[child] = node
            if forbidden(child):
                chain = [child]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return chain[::-1]
            todo.append(child)
    return None


def offenders(
    graph: dict[str, set[str]], importers: Iterable[str], forbidden: Callable[[str], bool]
) -> list[str]:
    """For each importer that loads a forbidden module, directly or not, how it does."""
    chains = (import_path(graph, importer, forbidden) for importer in importers)
    return [" -> ".join(chain) for chain in chains if chain is not None]


def in_package(package: str) -> Callable[[str], bool]:
    return lambda name: inside(name, package)


# -- the walker sees what is there ---------------------------------------------------------


def test_the_graph_is_read() -> None:
    """Guard against a vacuous pass: imports known to be there are seen, of every kind."""
    graph = import_graph()
    assert len(graph) >= 40
    assert "sidecar.app" in graph["sidecar.cli"]  # function-local
    assert "sidecar.config" in graph["sidecar.chain"]  # under TYPE_CHECKING
    assert "sidecar.config.model" in graph["sidecar.config"]  # a package re-exporting
    # `from sidecar.policies import tracing` imports the submodule.
    assert "sidecar.policies.tracing" in graph["sidecar.policies"]
    # `from sidecar.config.model import ...` from outside also runs sidecar/config/__init__.
    assert {"sidecar.config.model", "sidecar.config"} <= graph["sidecar.store.factory"]
    # ... but not from inside: config's own modules do not import their package.
    assert "sidecar.config" not in graph["sidecar.config.loader"]


def test_implicit_package_edges() -> None:
    assert ancestors("sidecar.policies.idempotency.policy") == [
        "sidecar.policies.idempotency",
        "sidecar.policies",
        "sidecar",
    ]
    graph = import_graph()
    # idempotency.policy imports policies.base: same enclosing package, no edge to it.
    assert "sidecar.policies" not in graph["sidecar.policies.idempotency.policy"]
    # sidecar itself encloses everything, so `from sidecar.x import y` never adds it;
    # `from sidecar import __version__` does.
    assert "sidecar" not in graph["sidecar.routing"]
    assert "sidecar" in graph["sidecar.cli"]


def test_helpers_find_what_they_should() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "a.x": {"a"}}
    assert offenders(graph, ["a.x", "b"], in_package("c")) == ["a.x -> a -> b -> c", "b -> c"]
    assert offenders(graph, ["b"], in_package("a")) == []
    assert find_cycle({"p": {"p.m"}, "p.m": {"q"}, "q": {"p"}}) == ["p", "p.m", "q", "p"]


# -- the rules ---------------------------------------------------------------------------


def test_sidecar_imports_are_acyclic() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in sidecar: " + " -> ".join(cycle or [])


def test_admin_does_not_import_the_app() -> None:
    """admin.py gets a status snapshot injected; it never loads app.py, even indirectly."""
    found = offenders(import_graph(), ["sidecar.admin"], in_package("sidecar.app"))
    assert not found, "\n".join(found)


def test_websocket_does_not_import_upstream() -> None:
    """upstream.py holds the WebSocket relay; websocket.py knows nothing of the forwarder
    (what both need lives below them, in relaying.py)."""
    found = offenders(import_graph(), ["sidecar.websocket"], in_package("sidecar.upstream"))
    assert not found, "\n".join(found)


def test_policies_never_import_each_other() -> None:
    """Each policy (a module, or a package with its submodules) loads no other policy,
    not even through the policies package, which imports them all."""
    graph = import_graph()
    assert all(policy in graph for policy in POLICIES)
    found: list[str] = []
    for policy in POLICIES:
        others = [other for other in POLICIES if other != policy]

        def forbidden(name: str, others: list[str] = others) -> bool:
            # The policies package itself imports every policy.
            return name == "sidecar.policies" or any(inside(name, other) for other in others)

        found += offenders(graph, modules_of(graph, policy), forbidden)
    assert not found, "\n".join(found)


def test_config_imports_nothing_else_of_sidecar() -> None:
    """config/ is the bottom floor: what it loads, directly or not, is config/ itself."""
    graph = import_graph()
    config = modules_of(graph, "sidecar.config")
    assert len(config) > 1
    found = offenders(graph, config, lambda name: not inside(name, "sidecar.config"))
    assert not found, "\n".join(found)
