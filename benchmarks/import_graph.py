"""The import graph of bnfold, read from the source with ``ast`` (nothing is imported).

    python benchmarks/import_graph.py          # prints cycles, function-local bnfold imports and
                                               # lazy third-party imports outside the allowed set;
                                               # exit 1 if there is any cycle or disallowed import

Every ``import`` / ``from ... import`` in ``bnfold/`` and ``cli/`` (installed as ``bnfold.cli``) is
an edge, at module level and inside functions alike; imports under ``if TYPE_CHECKING:`` are not
(they never run). An edge goes to the most specific bnfold module named (``from bnfold.verification
import engine`` -> ``bnfold.verification.engine``). The implicit import of parent packages is not an
edge: a package's ``__init__`` runs before its submodules, so it cannot close a loop at run time.

``tests/test_layout.py`` asserts on the same functions.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (folder, package name it is installed as)
SOURCES: tuple[tuple[str, str], ...] = (("bnfold", "bnfold"), ("cli", "bnfold.cli"))

#: The one list of third-party packages bnfold may import inside a function (lazily), because
#: importing them costs time or memory that a caller who never needs them should not pay
#: (``bnfold --help`` imports none of them). Every other third-party import is at module level.
LAZY_THIRD_PARTY: frozenset[str] = frozenset({
    "onnxruntime",  # ~0.1 s and a thread pool; only sessions need it
    "onnx",  # the CLI's --help and the report renderers run without it
    "torch",  # seconds; only the PyTorch front end needs it
    "ml_dtypes",  # optional: bfloat16 / float8 arrays
    "numba",  # optional: compiled calibration kernels
})


@dataclass(frozen=True)
class Import:
    """One import statement's target, as written in ``module``."""

    module: str  # the importing module
    target: str  # a bnfold module (most specific), or the top-level name of another package
    line: int
    local: bool  # inside a function (a lazy import)
    internal: bool  # target is a bnfold module


def module_files() -> dict[str, Path]:
    """``{module name: file}`` for every module of bnfold (``__init__.py`` is the package)."""
    out: dict[str, Path] = {}
    for folder, package in SOURCES:
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, known: set[str]) -> str | None:
    """The most specific bnfold module that ``name`` is or lies in; None outside bnfold."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in known:
            return candidate
    return None


def _base_package(module: str, path: Path, level: int) -> str:
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def _statements(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is inside a function; ``if TYPE_CHECKING`` skipped."""

    def walk(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    yield from walk_one(other, local)
                continue
            yield from walk_one(child, local)

    def walk_one(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
            return
        inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(node, inner)

    yield from walk(tree, False)


def imports() -> list[Import]:
    """Every import in bnfold (module level and function level), in file and line order."""
    files = module_files()
    known = set(files)
    out: list[Import] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, local in _statements(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    package = _base_package(module, path, node.level)
                    base = f"{package}.{base}" if base else package
                if node.module == "__future__":
                    continue
                names = [f"{base}.{alias.name}" if _resolve(f"{base}.{alias.name}", known) == f"{base}.{alias.name}"
                         else base for alias in node.names]
            for name in dict.fromkeys(names):
                target = _resolve(name, known)
                if target is not None:
                    out.append(Import(module, target, node.lineno, local, True))
                else:
                    out.append(Import(module, name.split(".")[0], node.lineno, local, False))
    return out


def graph(edges: list[Import] | None = None) -> dict[str, set[str]]:
    """``{module: bnfold modules it imports}`` over module-level and function-level imports."""
    g: dict[str, set[str]] = {m: set() for m in module_files()}
    for imp in edges if edges is not None else imports():
        if imp.internal and imp.target != imp.module:
            g[imp.module].add(imp.target)
    return g


def cycles(g: dict[str, set[str]] | None = None) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    g = g if g is not None else graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def local_internal_imports(edges: list[Import] | None = None) -> list[Import]:
    """Function-level imports of bnfold modules (each one is an import that dodges the layering)."""
    return [i for i in (edges if edges is not None else imports()) if i.local and i.internal]


def disallowed_lazy_imports(edges: list[Import] | None = None) -> list[Import]:
    """Function-level imports of third-party packages outside :data:`LAZY_THIRD_PARTY`."""
    return [i for i in (edges if edges is not None else imports())
            if i.local and not i.internal and i.target not in sys.stdlib_module_names
            and i.target not in LAZY_THIRD_PARTY]


def main() -> int:
    edges = imports()
    found = cycles(graph(edges))
    local = local_internal_imports(edges)
    lazy = disallowed_lazy_imports(edges)
    print(f"{len(module_files())} modules, {sum(1 for e in edges if e.internal)} internal imports")
    print(f"cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    print(f"function-local imports of bnfold modules: {len(local)}")
    for imp in local:
        print(f"  {imp.module}:{imp.line} -> {imp.target}")
    print(f"lazy third-party imports outside {sorted(LAZY_THIRD_PARTY)}: {len(lazy)}")
    for imp in lazy:
        print(f"  {imp.module}:{imp.line} -> {imp.target}")
    return 1 if found or lazy else 0


if __name__ == "__main__":
    sys.exit(main())
