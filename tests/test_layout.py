"""The package's layering: no import cycle, no function-local import of a bnfold module (outside
the allowlist below, which is being emptied), lazy third-party imports only of the packages
``benchmarks/import_graph.py`` declares (``LAZY_THIRD_PARTY``)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "import_graph.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bnfold_import_graph", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ig = _load()

# (importing module, imported bnfold module): function-local imports still there in files whose
# owners are removing them. Empty this as they go; never add to it.
ALLOWED_LOCAL: frozenset[tuple[str, str]] = frozenset({
    # torch is an optional, heavy dependency: the CLI imports the PyTorch front end only when it
    # is given a PyTorch model (bnfold/__init__.py's lazy names go through importlib instead)
    ("bnfold.cli.torch_fold", "bnfold.torch"),
    # the console script's entry imports the command inside a try, so that a Ctrl-C during those
    # imports ends as 'bnfold: interrupted' (exit 130) and not as a traceback
    ("bnfold.cli.entry", "bnfold.cli.main"),
})

# layers that must never import a bnfold module inside a function, allowlist or not
_STRICT = ("bnfold.verification", "bnfold.report", "bnfold.records", "bnfold.onnx", "bnfold.data",
           "bnfold.errors", "bnfold.environment", "bnfold.json_values", "bnfold.version")


@pytest.fixture(scope="module")
def edges() -> list[Any]:
    found: list[Any] = ig.imports()
    return found


def test_the_graph_is_read(edges: list[Any]) -> None:
    files = ig.module_files()
    assert "bnfold.verification.engine" in files and "bnfold.cli.main" in files and "bnfold" in files
    g = ig.graph(edges)
    # a module-level and a function-level edge are both there
    assert "bnfold.verification.config" in g["bnfold.verification.engine"]
    assert "bnfold.torch" in g["bnfold.cli.torch_fold"]  # imported inside a function
    # TYPE_CHECKING imports are not edges
    assert not any(i.module == "bnfold" and i.target == "bnfold.api" and not i.local for i in edges)


def test_no_import_cycle(edges: list[Any]) -> None:
    assert ig.cycles(ig.graph(edges)) == []


def test_the_cycle_finder_finds_cycles() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert ig.cycles(g) == [["a", "b", "c"], ["e", "f"]]


def test_no_function_local_import_of_a_bnfold_module(edges: list[Any]) -> None:
    local = {(i.module, i.target) for i in ig.local_internal_imports(edges)}
    assert sorted(local - ALLOWED_LOCAL) == []
    # the allowlist only shrinks: an entry that is gone must be taken off it
    assert sorted(ALLOWED_LOCAL - local) == []


def test_lower_layers_have_no_function_local_bnfold_import(edges: list[Any]) -> None:
    strict = [(i.module, i.line, i.target) for i in ig.local_internal_imports(edges)
              if i.module == "bnfold.records" or i.module.startswith(_STRICT)]
    assert strict == []


def test_lazy_third_party_imports_only_from_the_declared_set(edges: list[Any]) -> None:
    assert [(i.module, i.line, i.target) for i in ig.disallowed_lazy_imports(edges)] == []
    assert {"onnxruntime", "torch"} <= ig.LAZY_THIRD_PARTY


def test_onnx_runtime_does_not_import_the_data_layer(edges: list[Any]) -> None:
    g = ig.graph(edges)
    assert not any(t.startswith("bnfold.data") for t in g["bnfold.onnx.runtime"])
    assert not any(t.startswith(("bnfold.verification", "bnfold.report")) for t in g["bnfold.records"])


def test_every_package_is_installed() -> None:
    """pyproject.toml lists the packages a (non-editable) install ships: every folder of bnfold/ with
    an __init__.py, and cli/ as bnfold.cli. An editable install would hide one that is missing."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "bnfold").rglob("__init__.py")}
    assert found | {"bnfold.cli"} == listed
    assert config["package-dir"] == {"bnfold.cli": "cli"}
