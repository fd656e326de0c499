"""No module of kvmem imports another that (directly or not) imports it back.

The graph is built from the source with ``ast``: every ``import`` and
``from ... import`` of a kvmem module, at module level or inside a function
(a lazy import still ties the two modules together), except those under
``if TYPE_CHECKING:``. ``from pkg import name`` points at ``pkg.name`` when
that is a module, else at ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kvmem"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (packages by their ``__init__``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The kvmem modules that module ``name`` (its source at ``path``) imports."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in modules:
                    out.add(full)
                elif base in modules:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the kvmem modules it imports."""
    files = module_files(root)
    names = set(files)
    return {name: imported_modules(name, path, names) for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other in a circle, each sorted."""
    g = nx.DiGraph([(m, d) for m, deps in graph.items() for d in deps])
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "kvmem.allocator" in graph["kvmem.backends.base"]
    assert "kvmem.backends.base" in graph["kvmem.backends.blocks"]
    assert "kvmem.attention" in graph["kvmem.distributed.attention"]  # from kvmem import attention
    assert "kvmem.engine.demo" in graph["kvmem.cli"]  # imported inside a function


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kvmem.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvmem import a\n"
    )
    graph = import_graph(tmp_path)
    assert graph["kvmem.c"] == set()
    assert import_cycles(graph) == [["kvmem.a", "kvmem.sub.b"]]


def test_kvmem_has_no_import_cycle():
    cycles = import_cycles(import_graph())
    if cycles:
        pytest.fail("modules importing each other in a circle: " + "; ".join(map(str, cycles)))
