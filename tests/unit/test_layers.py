"""The import graph of `broker/`: no cycles, and layers that only point down.

Read from the source with `ast` (every import counts, those under ``TYPE_CHECKING`` and inside
functions too: a cycle for the type checker is a cycle for the reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "broker"

#: The wire: HTTP/1.1 framing and flow control, knowing nothing of ERPs, tokens or errors.
WIRE = {"broker.server", "broker.http1", "broker.flow", "broker.client"}
#: What the wire may never import.
ABOVE_WIRE = (
    "broker.proxy",
    "broker.tokens",
    "broker.connectors",
    "broker.errors",
    "broker.upstream",
    "broker.app",
    "broker.admin",
    "broker.config",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ``broker.*`` modules ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("broker"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("broker"):
                continue
            for alias in node.names:
                # ``from . import x`` may name a submodule.
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    found.discard(name)
    return {m for m in found if m in MODULES}


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py") if "sandbox" not in p.parts}
GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if "sandbox" not in p.parts}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class TestImportGraph:
    def test_the_graph_is_read(self) -> None:
        """The reader sees the imports it must (a guard against a reader that finds none)."""
        assert "broker.tokens" in GRAPH["broker.upstream"]
        assert "broker.flow" in GRAPH["broker.http1"]

    def test_no_cycles(self) -> None:
        """No two modules of broker/ import each other, directly or around a loop."""
        assert cycles(GRAPH) == []

    def test_the_cycle_finder_finds_cycles(self) -> None:
        """The check above can fail: a loop of three is found."""
        assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

    @pytest.mark.parametrize("wire", sorted(WIRE))
    def test_the_wire_imports_nothing_above_it(self, wire: str) -> None:
        """server.py, http1.py and flow.py know nothing of proxy, tokens, connectors, errors."""
        above = {m for m in GRAPH[wire] if m.startswith(ABOVE_WIRE)}
        assert above == set()
