"""The import graph of vhostser and virtqueue: no cycles, and each layer imports only the
layers below it. Every import counts, at the top of a module, inside a function or under
TYPE_CHECKING: each is a dependency, and a function-local import is how a cycle hides."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vhostser", "virtqueue")

_ABOVE_BACKENDS = ("vhostser.config", "vhostser.daemon", "vhostser.admin", "vhostser.service",
                   "vhostser.cli")

# The leaf helpers every layer may use; they import nothing of vhostser but each other.
LEAVES = ("vhostser.fds", "vhostser.logs", "vhostser.options", "vhostser.pacing",
          "vhostser.sockets")

# (importers, forbidden): no module in `importers` imports a module in `forbidden`.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("virtqueue", ("vhostser",)),
    ("vhostser.vhost_user", ("vhostser.console", "vhostser.backends", *_ABOVE_BACKENDS)),
    ("vhostser.backends", _ABOVE_BACKENDS),
    # The port interface lives with the console; backends implement it.
    ("vhostser.console", ("vhostser.backends", *_ABOVE_BACKENDS)),
]

@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported}  ({self.where})"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> file, for every .py under the packages (a package is its __init__)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom,
              known: dict[str, Path]) -> Iterator[str]:
    """The known modules an import statement in module `name` makes Python run.

    `import a.b.c` and `from a.b.c import x` run a, a.b and a.b.c; `from a.b import c` where
    a.b.c is a module runs that too. The packages the importer itself is inside are left out
    (their __init__ ran before it did), unless it takes names from their __init__: a module
    that re-exports a submodule which imports names back from it is a real cycle."""
    if isinstance(node, ast.Import):
        targets = [(alias.name, False) for alias in node.names]
    else:
        if node.level:
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        subs = [f"{target}.{alias.name}" for alias in node.names]
        targets = [(target, any(sub not in known for sub in subs))]
        targets += [(sub, False) for sub in subs if sub in known]
    for target, takes_names in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            already_ran = _within(name, module) and not (takes_names and module == target)
            if module in known and module != name and not already_ran:
                yield module


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> list[Edge]:
    known = find_modules(root, packages)
    edges: dict[tuple[str, str], Edge] = {}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for imported in _imported(name, path, node, known):
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    edges.setdefault((name, imported), Edge(name, imported, where))
    return sorted(edges.values(), key=lambda e: (e.importer, e.imported))


def find_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected group of modules (Tarjan)."""
    out: dict[str, list[Edge]] = {}
    for e in edges:
        out.setdefault(e.importer, []).append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for e in out.get(v, []):
            w = e.imported
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: set[str] = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(out):
        if v not in index:
            visit(v)
    cycles: list[list[Edge]] = []
    for group in groups:
        start = min(group)
        # Breadth-first inside the group from `start` back to it: the shortest such cycle.
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        cycle: list[Edge] | None = None
        while frontier and cycle is None:
            nxt: list[str] = []
            for v in frontier:
                for e in out.get(v, []):
                    if e.imported == start:
                        cycle = paths[v] + [e]
                        break
                    if e.imported in group and e.imported not in paths:
                        paths[e.imported] = paths[v] + [e]
                        nxt.append(e.imported)
                if cycle is not None:
                    break
            frontier = nxt
        assert cycle is not None
        cycles.append(cycle)
    return cycles


def violations(edges: Iterable[Edge], importers: str, forbidden: Iterable[str]) -> list[Edge]:
    return [e for e in edges if _within(e.importer, importers)
            and any(_within(e.imported, f) for f in forbidden)]


def _report(title: str, edges: Iterable[Edge]) -> str:
    return "\n".join([title, *(f"    {e}" for e in edges)])


def path_of(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0].importer, *(e.imported for e in cycle)])


# ------------------------------------------------------------------------ the package


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "\n".join(_report(f"import cycle: {path_of(c)}", c) for c in cycles)


def test_leaf_helpers_import_only_each_other() -> None:
    bad = [e for e in import_graph() if e.importer in LEAVES and e.imported not in LEAVES
           and _within(e.imported, "vhostser")]
    assert not bad, _report(f"the leaf helpers import only each other ({', '.join(LEAVES)}):",
                            bad)


@pytest.mark.parametrize(("importers", "forbidden"), LAYERS, ids=[i for i, _ in LAYERS])
def test_layers(importers: str, forbidden: tuple[str, ...]) -> None:
    bad = violations(import_graph(), importers, forbidden)
    assert not bad, _report(f"{importers} must not import {', '.join(forbidden)}:", bad)


# ------------------------------------------------------------------------ the graph itself


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def pairs(edges: Iterable[Edge]) -> set[tuple[str, str]]:
    return {(e.importer, e.imported) for e in edges}


def test_every_kind_of_import_is_an_edge(tmp_path: Path) -> None:
    write(tmp_path, {
        "pkg/__init__.py": "from .a import A\n",
        "pkg/a.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from .sub.c import C\nA = 1\n",
        "pkg/b.py": "def f():\n    from . import a\n    import pkg.sub.c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import A\nfrom .. import b\n",
    })
    edges = import_graph(tmp_path, ["pkg"])
    assert pairs(edges) == {
        ("pkg", "pkg.a"),
        ("pkg.a", "pkg.sub"), ("pkg.a", "pkg.sub.c"),  # TYPE_CHECKING; runs pkg.sub first
        ("pkg.b", "pkg.a"), ("pkg.b", "pkg.sub"), ("pkg.b", "pkg.sub.c"),  # function-local
        ("pkg.sub.c", "pkg.a"), ("pkg.sub.c", "pkg.b"),  # not pkg: its __init__ already ran
    }
    assert {e.where for e in edges if e.importer == "pkg.b"} == {"pkg/b.py:2", "pkg/b.py:3"}
    # pkg.a, pkg.b and pkg.sub.c import each other: one group, reported by its shortest cycle
    assert [path_of(c) for c in find_cycles(edges)] == ["pkg.a -> pkg.sub.c -> pkg.a"]


def test_a_name_taken_from_the_own_package_init_is_an_edge(tmp_path: Path) -> None:
    write(tmp_path, {
        "pkg/__init__.py": "from .a import f\nX = 1\n",
        "pkg/a.py": "from pkg import X\ndef f(): pass\n",
    })
    edges = import_graph(tmp_path, ["pkg"])
    assert pairs(edges) == {("pkg", "pkg.a"), ("pkg.a", "pkg")}
    (cycle,) = find_cycles(edges)
    assert [str(e) for e in cycle] == ["pkg -> pkg.a  (pkg/__init__.py:1)",
                                       "pkg.a -> pkg  (pkg/a.py:1)"]


def test_layer_violations_name_the_edge(tmp_path: Path) -> None:
    write(tmp_path, {"low/__init__.py": "", "low/m.py": "import high.n\n",
                     "high/__init__.py": "", "high/n.py": "from low import m\n"})
    edges = import_graph(tmp_path, ["low", "high"])
    assert [str(e) for e in violations(edges, "low", ["high"])] == [
        "low.m -> high  (low/m.py:1)", "low.m -> high.n  (low/m.py:1)",
    ]
    assert violations(edges, "high", ["lo"]) == []  # packages, not string prefixes
