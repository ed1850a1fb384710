"""No import cycle in florence_ops: the modules form a layered graph, so any module can be imported (or moved) alone."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "florence_ops"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of `package` (dotted name) and the package's modules it imports anywhere in its body: function-level
    imports count, since they close a cycle as soon as they run. Package `__init__.py` files hold no code and are left
    out."""
    modules = {_dotted(path): path for path in package.rglob("*.py") if path.name != "__init__.py"}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None when it has none."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for other in sorted(graph[node]):
            if (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if (cycle := visit(node)) is not None:
            return cycle
    return None


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_find_cycle_finds_a_lazy_cycle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_sees_the_package():
    graph = import_graph()
    assert "florence_ops.stages.train" in graph and "florence_ops.training" in graph["florence_ops.stages.train"]


def test_florence_ops_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
