"""Shared builders for graph-level tests: tiny ONNX models made with onnx.helper, run in onnxruntime.

Every model is built at IR version 10 and (unless a test says otherwise) opset 17. Reference runs
use onnxruntime with graph optimisations OFF: at BASIC and above onnxruntime fuses Conv+BN itself,
so an optimised reference would compare folded with folded.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR = 10
EPS = 1e-5

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
DOUBLE = TensorProto.DOUBLE
INT64 = TensorProto.INT64


# ---- building -------------------------------------------------------------------------------
def vi(name: str, shape: Sequence | int | None, elem: int = FLOAT) -> onnx.ValueInfoProto:
    """A tensor value info. ``shape`` an int: that rank with symbolic dims; ``None``: unknown rank."""
    if isinstance(shape, int):
        shape = [f"{name}_d{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(
    nodes: Iterable[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = OPSET,
    ir_version: int = IR,
    value_info: Sequence[onnx.ValueInfoProto] = (),
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers),
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def bn_params(rng: np.random.Generator, c: int, dtype=np.float32, *, spread: float = 1.0) -> dict[str, np.ndarray]:
    """Non-trivial BN parameters (every channel different, no identity scale)."""
    return {
        "scale": rng.uniform(0.5, 2.0, c).astype(dtype) * spread,
        "bias": rng.standard_normal(c).astype(dtype),
        "mean": rng.standard_normal(c).astype(dtype),
        "var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def bn(name: str, x: str, y: str, params: Mapping[str, np.ndarray], *, prefix: str | None = None,
       eps: float = EPS, **attrs) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """An inference BatchNormalization node with its four parameter initializers."""
    p = prefix or name
    names = [f"{p}.scale", f"{p}.bias", f"{p}.mean", f"{p}.var"]
    inits = [init(n, params[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))]
    node = helper.make_node("BatchNormalization", [x, *names], [y], name=name, epsilon=eps, **attrs)
    return node, inits


def rand(rng: np.random.Generator, *shape, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- running --------------------------------------------------------------------------------
def ort_session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if isinstance(model_or_path, onnx.ModelProto):
        source = model_or_path.SerializeToString()
    else:
        source = str(model_or_path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_run(model_or_path, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """Run a model (proto or path) in onnxruntime with every graph optimisation disabled."""
    sess = ort_session(model_or_path)
    return sess.run(list(outputs) if outputs else None, dict(feeds))


def assert_same_outputs(reference, candidate, feeds, *, rtol=1e-5, atol=1e-5) -> None:
    ref = ort_run(reference, feeds)
    out = ort_run(candidate, feeds)
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        assert r.shape == o.shape
        np.testing.assert_allclose(o.astype(np.float64), r.astype(np.float64), rtol=rtol, atol=atol)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def count_op(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def all_nodes(graph_or_model):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    g = graph_or_model.graph if isinstance(graph_or_model, onnx.ModelProto) else graph_or_model
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from all_nodes(sub)


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


def record(result, name: str):
    """The report record of BN ``name``; a subgraph BN is reported as ``<graph path>::<name>``."""
    for r in result.report.bns:
        if r.name == name:
            return r
    for r in result.report.bns:
        if r.name.endswith("::" + name):
            return r
    raise KeyError(name)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_full(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def list_dir(path) -> set[str]:
    return set(os.listdir(path))


_TORCHVISION_OPS: list[object] = []  # the Library declaring torchvision's ops, kept alive for the session


@pytest.fixture(scope="session")
def torchvision_ops() -> None:
    """Make ``import torchvision`` (and timm, which imports it) work here, once per process.

    The registry's torchvision wheel links CUDA libraries that the CPU torch here lacks: ``import
    torchvision`` dies registering its ``torchvision::nms`` kernel ("operator torchvision::nms does
    not exist"). Declaring the schemas of the ops whose fake kernels its Python code registers
    (``nms``, ``qnms``) first lets its pure-Python modules load; no test calls them (issue 16 point 5).
    Done only where a plain import fails (checked in a child process: a failed import leaves
    torchvision half-registered in this one), only once (torch allows one ``DEF`` library per
    namespace), and only in this fixture: never in the package."""
    import subprocess

    if "torchvision" in sys.modules or _TORCHVISION_OPS:
        return
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode != 0:
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---- the slow tier ----------------------------------------------------------------------------
# ``pytest -m "not slow"`` is the fast tier. Files this suite's owners mark themselves carry
# ``pytestmark = pytest.mark.slow`` (test_e2e_large_model.py); the tests below live in files owned
# elsewhere and are marked here by node id (a file, or file::test without parameters), with the
# time measured here (2 cores, ``--durations=0``). Fast tier: under 2 minutes; whole suite: the
# README's ``python -m pytest -q``.
SLOW: dict[str, str] = {
    "tests/test_torch_cli.py": "a Python process per test importing torch (22 of 24 tests took 2-17 s; 130 s in all)",
    "tests/test_stages_fold.py::test_light_resnet50_from_onnx_wheel": "folds and verifies a ResNet-50 (~9 s)",
    "tests/test_torch_fold.py::test_efficientnet_b0_depthwise_same_padding": "builds and folds EfficientNet-B0 (~6 s)",
}


def _slow_reason(nodeid: str) -> str | None:
    path, _, rest = nodeid.partition("::")
    test = rest.split("[", 1)[0]
    return SLOW.get(path) or SLOW.get(f"{path}::{test}")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = _slow_reason(item.nodeid)
        if reason is not None:
            item.add_marker(pytest.mark.slow(reason=reason))


# ---- memory -----------------------------------------------------------------------------------
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line with the peak resident memory of this pytest process and of its largest finished
    child process (``bnfold`` runs in subprocesses), the figures the suite's 3 GB budget is about."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    per_mib = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, kB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / per_mib
    terminalreporter.write_line(f"peak RSS: pytest {own:.0f} MiB, largest child process {child:.0f} MiB")
