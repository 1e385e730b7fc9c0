"""The import graph of `broker/`: no cycles, and layers that only point down.

Read from the source with `ast` (every import counts, those under ``TYPE_CHECKING`` and inside
functions too: a cycle for the type checker is a cycle for the reader).
"""

from __future__ import annotations

import ast
import re
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


DOC = PACKAGE.parent / "docs" / "architecture.md"


def read_floors(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """The floors of the diagram under "## The layers": modules, and packages (``stores/``)
    whose every module is on one floor. A floor's names may run on to the next line."""
    block = text.split("## The layers", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    names: dict[int, list[str]] = {}
    floor = -1
    for line in block.splitlines():
        head = line.lstrip()
        if not head:
            continue
        if head[0].isdigit():
            digits, _, head = head.partition(" ")
            floor = int(digits)
        listed = re.split(r"\s{2,}", head.strip())[0]  # what follows two spaces describes
        names.setdefault(floor, []).extend(n.strip() for n in listed.split("·") if n.strip())
    modules: dict[str, int] = {}
    packages: dict[str, int] = {}
    for number, listed in names.items():
        for name in listed:
            if name.endswith("/"):
                packages[f"broker.{name[:-1]}"] = number
            else:
                modules[f"broker.{name}"] = number
    return modules, packages


#: docs/architecture.md's floors, bottom to top: a module imports from its own floor or from
#: floors below it, never from above. The package's ``__init__`` imports nothing: floor 0.
FLOORS, PACKAGE_FLOORS = read_floors(DOC.read_text())
FLOORS["broker"] = 0


def floor_of(module: str) -> int | None:
    if module in FLOORS:
        return FLOORS[module]
    for package, floor in PACKAGE_FLOORS.items():
        if module == package or module.startswith(package + "."):
            return floor
    return None


def points_up(module: str, imports: set[str]) -> list[str]:
    """The modules of ``imports`` on a floor above ``module``'s."""
    floor = floor_of(module)
    assert floor is not None, f"{module} has no floor"
    return sorted(
        f"{m} (floor {other})"
        for m in imports
        if (other := floor_of(m)) is not None and other > floor
    )


class TestFloors:
    def test_every_module_has_a_floor(self) -> None:
        """A new module is placed on a floor of docs/architecture.md; every name there exists."""
        assert sorted(m for m in MODULES if floor_of(m) is None) == []
        assert sorted(set(FLOORS) - MODULES) == []
        assert sorted(p for p in PACKAGE_FLOORS if p not in MODULES) == []

    def test_the_diagram_is_read(self) -> None:
        """The reader sees all eight floors, a run-on line and the packages."""
        assert sorted(set(FLOORS.values())) == list(range(8))
        assert FLOORS["broker.ports"] == 2 and FLOORS["broker.proxy"] == 5
        assert PACKAGE_FLOORS == {"broker.stores": 3, "broker.connectors": 3}

    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_imports_point_down(self, module: str) -> None:
        """Each import of a module is from its own floor or below (every import counts: under
        TYPE_CHECKING and inside functions too)."""
        assert points_up(module, GRAPH[module]) == [], f"{module} imports from above its floor"

    def test_the_floor_check_can_fail(self) -> None:
        """An import from above is found: upstream (4) importing proxy (5)."""
        assert points_up("broker.upstream", {"broker.proxy", "broker.tokens"}) == [
            "broker.proxy (floor 5)"
        ]
