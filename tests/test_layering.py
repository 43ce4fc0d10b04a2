"""The package's layering, read from the source with `ast`: recipe → plan → engine → io / methods
→ kernels. io/ reads and writes files and knows no plan; no two top-level modules import each other
at import time."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_ri"
# what io/ may import of mergekit_ri: itself and the leaves that import nothing of the package
IO_MAY_IMPORT = ("mergekit_ri.io", "mergekit_ri.errors", "mergekit_ri.lazy", "mergekit_ri.hugepages")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, *, deferred: bool = True) -> list[tuple[int, str]]:
    """(line, module) for every mergekit_ri module `path` imports, relative imports resolved;
    `deferred=False` leaves out imports inside functions and `if TYPE_CHECKING:` blocks."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, skipped: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = skipped or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            inner = inner or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join(parts + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                # `from . import x` imports the module x; `from .m import f` the module m
                names = [f"{source}.{a.name}" for a in child.names] if not child.module else [source]
            if deferred or not inner:
                found.extend((child.lineno, n) for n in names if n.split(".")[0] == "mergekit_ri")
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def test_io_imports_no_module_above_it():
    """io/ may use io/, errors, lazy and hugepages, never the plan, the engine or the methods."""
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted((PACKAGE / "io").rglob("*.py"))
        for line, name in imported(path)
        if not any(name == ok or name.startswith(ok + ".") for ok in IO_MAY_IMPORT)
    ]
    assert not bad, "\n".join(bad)


def top_level(name: str) -> str:
    return name.split(".")[1] if name.count(".") else name


def import_graph() -> dict[str, set[str]]:
    """Top-level module or package → the ones its import-time code imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue  # the package's lazy exports
        source = top_level(module_name(path))
        for _, name in imported(path, deferred=False):
            target = top_level(name)
            if target != source and target != "mergekit_ri":
                graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_cycle_between_top_level_modules():
    """Import-time imports only: a function-level import is how a lower layer reaches up lazily."""
    graph = import_graph()
    assert "plan" in graph["engine"] and "io" in graph["plan"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle or [])


def test_the_layer_test_sees_a_forbidden_import(tmp_path, monkeypatch):
    """A module of io/ that imports the plan is caught (the check is not vacuous)."""
    fake = tmp_path / "mergekit_ri"
    (fake / "io").mkdir(parents=True)
    (fake / "io" / "bad.py").write_text(
        "from ..plan import MergePlan\nfrom . import sources\n\ndef f():\n    from ..engine import run_merge\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    names = [name for _, name in imported(fake / "io" / "bad.py")]
    assert names == ["mergekit_ri.plan", "mergekit_ri.io.sources", "mergekit_ri.engine"]
    assert [n for _, n in imported(fake / "io" / "bad.py", deferred=False)] == names[:2]
