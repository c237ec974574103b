"""The package's layout: pure modules stay pure, and docs/contributing.md lists every module.

Reading a config, routing a line, masking a secret or parsing an address needs no gRPC;
a module that grew an import of one that does would make every tool and test that
loads a config start gRPC's threads. The import graph is read from the source (AST),
so imports under ``if TYPE_CHECKING:`` and inside functions count too: they are
dependencies all the same, and the first refactoring that drops the guard makes them real.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import mesh

MESH = Path(mesh.__file__).resolve().parent
CONTRIBUTING = MESH.parent / "docs" / "contributing.md"

#: Modules that must not import gRPC, directly or through any mesh module they import.
PURE = (
    "mesh.errors",
    "mesh.flowfile",
    "mesh.conditions",
    "mesh.routing",
    "mesh.analysis",
    "mesh.versions",
    "mesh.masking",
    "mesh.addresses",
    "mesh.config",
    "mesh.token",
    "mesh.tls",
    "mesh.ui.model",
    "mesh.ui.pages",
    "mesh.ui.access",
)


@dataclass(frozen=True)
class ImportGraph:
    """Which modules each module of a package imports: its own, and outside ones."""

    package: str
    #: module -> the package's modules it imports
    internal: dict[str, frozenset[str]]
    #: module -> the top-level names of other packages it imports (``grpc``, ``structlog``)
    external: dict[str, frozenset[str]]

    @classmethod
    def of(cls, root: Path) -> ImportGraph:
        """Read every ``.py`` file under ``root``, the folder of a package."""
        package = root.name
        files = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
        internal: dict[str, frozenset[str]] = {}
        external: dict[str, frozenset[str]] = {}
        for module, path in files.items():
            ours: set[str] = set()
            theirs: set[str] = set()
            for name in _imported_names(path, module, is_package=path.name == "__init__.py"):
                if name == package or name.startswith(package + "."):
                    ours.add(_known(name, files))
                else:
                    theirs.add(name.partition(".")[0])
            ours.discard(module)
            internal[module] = frozenset(ours)
            external[module] = frozenset(theirs)
        return cls(package, internal, external)

    def closure(self, module: str) -> set[str]:
        """Every module of the package that importing ``module`` imports (not itself)."""
        seen: set[str] = set()
        todo = [module]
        while todo:
            for imported in self.internal[todo.pop()]:
                if imported not in seen:
                    seen.add(imported)
                    todo.append(imported)
        seen.discard(module)
        return seen

    def path(self, start: str, goal: str) -> list[str]:
        """A shortest chain of imports from ``start`` to ``goal`` (for messages); [] if none."""
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier:
            following = []
            for module in frontier:
                for imported in sorted(self.internal[module]):
                    if imported in previous or imported == start:
                        continue
                    previous[imported] = module
                    if imported == goal:
                        chain = [goal]
                        while chain[-1] != start:
                            chain.append(previous[chain[-1]])
                        return chain[::-1]
                    following.append(imported)
            frontier = following
        return []

    def importers(self, prefix: str) -> set[str]:
        """The modules that import an outside package whose name starts with ``prefix``."""
        return {m for m, names in self.external.items() if any(n.startswith(prefix) for n in names)}

    def cycles(self) -> list[list[str]]:
        """Every import circle: each strongly connected group of modules, sorted (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(module: str) -> None:
            index[module] = low[module] = len(index)
            stack.append(module)
            on_stack.add(module)
            for imported in sorted(self.internal[module]):
                if imported not in index:
                    visit(imported)
                    low[module] = min(low[module], low[imported])
                elif imported in on_stack:
                    low[module] = min(low[module], index[imported])
            if low[module] == index[module]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        for module in sorted(self.internal):
            if module not in index:
                visit(module)
        return sorted(found)


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(path: Path, module: str, *, is_package: bool) -> Iterator[str]:
    """Every module name ``path`` imports, anywhere in it: ``from a import b`` gives ``a.b``
    (which :func:`_known` turns back into ``a`` when ``b`` is not a module of its own).

    The parent packages Python runs on the way (``mesh/__init__.py`` for ``mesh.config``)
    are not counted: a package's ``__init__`` is an edge only when a name is taken from it.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _known(name: str, files: dict[str, Path]) -> str:
    """``name`` if it is a module of the package, else the nearest package module above it."""
    while name not in files and "." in name:
        name = name.rpartition(".")[0]
    return name


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph.of(MESH)


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_nothing_that_imports_grpc(graph: ImportGraph, module: str) -> None:
    """A pure module, and every mesh module it imports, is free of gRPC."""
    grpc_users = graph.importers("grpc")
    offenders = sorted((graph.closure(module) | {module}) & grpc_users)
    chains = [" -> ".join(graph.path(module, o) or [module]) for o in offenders]
    assert not offenders, f"{module} imports gRPC through: {'; '.join(chains)}"


def test_the_graph_sees_grpc_where_it_is(graph: ImportGraph) -> None:
    """The helper is not blind: the runtime's gRPC modules are found, and reached from cli."""
    assert {"mesh.peer", "mesh.links", "mesh.guard", "mesh.credentials"} <= graph.importers("grpc")
    assert "mesh.peer" in graph.closure("mesh.cli")
    assert graph.path("mesh.cli", "mesh.supervisor") == ["mesh.cli", "mesh.supervisor"]


def test_the_graph_counts_type_checking_and_relative_imports(tmp_path: Path) -> None:
    """Imports under TYPE_CHECKING, inside functions and relative ones are edges; a circle
    they close is listed by cycles()."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import X\n"
    )
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def f():\n    from .. import a\n    import grpc\n")
    (pkg / "d.py").write_text("from .sub import c\nfrom pkg import VERSION\n")

    graph = ImportGraph.of(pkg)

    assert graph.internal["pkg.b"] == {"pkg.sub.c"}
    assert graph.internal["pkg.sub.c"] == {"pkg.a"}
    assert graph.internal["pkg.d"] == {"pkg", "pkg.sub.c"}
    assert graph.importers("grpc") == {"pkg.sub.c"}
    assert graph.cycles() == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert graph.path("pkg.a", "pkg.sub.c") == ["pkg.a", "pkg.b", "pkg.sub.c"]


def test_layout_names_every_module() -> None:
    """The contributors' page's Layout section has a line for every module of mesh/ (but v1)."""
    text = CONTRIBUTING.read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    listed = set(re.findall(r"^\s*(mesh/[\w/]+\.py)", layout, flags=re.MULTILINE))
    modules = {
        f"mesh/{path.relative_to(MESH).as_posix()}"
        for path in MESH.rglob("*.py")
        if "v1" not in path.relative_to(MESH).parts
    }
    assert sorted(modules - listed) == []
    assert sorted(listed - modules) == []


def test_no_module_of_mesh_imports_one_that_imports_it_back(graph: ImportGraph) -> None:
    """No import circle in mesh/, counting imports under TYPE_CHECKING: a flow's state has
    one owner (runtime), the node and the peer are reached through protocols there."""
    assert graph.cycles() == []
