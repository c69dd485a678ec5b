"""The package's imports run one way: no circle (function-level imports included), and the command line
reaches the package only through the API (plus render and errors)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "soma_manifest"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (`from soma_manifest import atlas`
    counts as soma_manifest.atlas; the package's own lazy __init__ is left out)."""
    modules = _modules()

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("soma_manifest"):
                targets |= {module_of(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {module_of(a.name) for a in node.names if a.name.startswith("soma_manifest")}
        graph[name] = targets - {None, name, "soma_manifest"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that imports itself through others, with the way back (depth-first search)."""
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "soma_manifest.atlas" in graph["soma_manifest.verify"]  # the graph is read
    assert circles(graph) == []


def test_a_circle_is_found() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_command_line_imports_only_the_api_render_and_errors() -> None:
    graph = import_graph()
    cli = {name for name in graph if name == "soma_manifest.cli" or name.startswith("soma_manifest.cli.")}
    reached = set().union(*(graph[name] for name in cli)) - cli
    assert reached == {"soma_manifest.api", "soma_manifest.render", "soma_manifest.errors"}
