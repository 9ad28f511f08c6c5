"""Signals while ``bnfold fold`` writes a large model over an existing output.

The model is x -> Conv(1x1, 6144 -> 6144) -> BN -> y with its 151 MB weight in an external-data
file, so the write of the folded model (and its data file) takes long enough to be hit. A first
fold writes the output; each later fold to the same ``-o`` is signalled at a point found by watching
the output's folder: when the staging folder (``.bnfold-*``) appears, while a staged data file
grows, and once it is complete (verification running). After SIGINT or SIGTERM the old output and
its data file must be intact (same bytes) and load, the exit code must be the documented one
(SIGINT: 130, ``bnfold: interrupted``; SIGTERM: 143, ``bnfold: terminated``, README "Exit codes"),
and nothing but the old files may remain beside the output. SIGKILL cannot be caught: the old
output must still be intact, and a later run into the same folder removes the staging folder the
killed run left (``bnfold/outputs.py``, sweep).
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import child_env
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.slow  # a 151 MB model folded 12 times as subprocesses: about 40 s

C = 6144  # 6144 x 6144 float32 = 151 MB of weights
WEIGHT_BYTES = C * C * 4
POLL_S = 0.002
RUN_TIMEOUT_S = 300


def _build(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((C, C, 1, 1), dtype=np.float32) * 0.01)
    (folder / "weights.bin").write_bytes(w.tobytes())
    wt = numpy_helper.from_array(np.zeros((1,), np.float32), "w")
    wt.ClearField("raw_data")
    wt.ClearField("dims")
    wt.dims.extend([C, C, 1, 1])
    wt.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(WEIGHT_BYTES))):
        entry = wt.external_data.add()
        entry.key, entry.value = key, value
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    params = [rng.uniform(0.5, 2, C), rng.standard_normal(C), rng.standard_normal(C), rng.uniform(0.5, 2, C)]
    inits = [wt] + [numpy_helper.from_array(p.astype(np.float32), n) for n, p in zip(names, params)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
             helper.make_node("BatchNormalization", ["z", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _fold(model: Path, output: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bnfold.cli.main", "fold", str(model), "-o", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _staged(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".bnfold-")]


def _staged_bytes(folder: Path, suffix: str) -> int:
    """The size of the largest staged file named ``*suffix`` (-1: none)."""
    return max((f.stat().st_size for d in _staged(folder) if d.is_dir() for f in d.iterdir()
                if f.name.endswith(suffix) and f.is_file()), default=-1)


# the points a signal is sent at: (name, condition on the output's folder). The data file is
# written under a temporary name (``*.bnfold-tmp``), renamed to ``*.data`` in the staging folder,
# then the model file is written beside it, verification runs (about a second here), and both move.
POINTS: dict[str, Callable[[Path], bool]] = {
    "staging-created": lambda out: bool(_staged(out)),
    "data-writing": lambda out: 0 < _staged_bytes(out, ".bnfold-tmp") < WEIGHT_BYTES // 2,
    "data-written": lambda out: _staged_bytes(out, ".data") >= WEIGHT_BYTES,
}


@pytest.fixture(scope="module")
def first_fold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The model, and an output (in a folder of its own) that a complete earlier fold wrote."""
    base = tmp_path_factory.mktemp("signals")
    model = _build(base / "model")
    out = base / "out"
    proc = _fold(model, out / "folded.onnx")
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, err
    return model, out / "folded.onnx"


def _signal_at(model: Path, output: Path, point: str, sig: int
               ) -> tuple[subprocess.Popen[str], str, bool, dict[str, str]]:
    """Fold ``model`` to ``output``, sending ``sig`` when ``point`` is reached; (process, stderr, whether
    the signal was sent before the process ended, the output folder's digests before the run). On a
    loaded machine this test's poll can see the point so late that the run has already moved its
    outputs into place ("Wrote" on stdout) when the signal lands (CI saw exit 0, and once -2 after
    "bnfold: interrupted"): that attempt says nothing about an interrupted write, so it is made
    again (at most three times)."""
    for _ in range(3):
        digests = _digests(output.parent) if output.parent.exists() else {}
        proc, out, err, sent = _one_attempt(model, output, point, sig)
        if sig == signal.SIGKILL or "Wrote" not in out:
            break
    return proc, err, sent, digests


def _one_attempt(model: Path, output: Path, point: str, sig: int) -> tuple[subprocess.Popen[str], str, str, bool]:
    proc = _fold(model, output)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    sent = False
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            reached = POINTS[point](output.parent)
        except FileNotFoundError:  # a staged file renamed or removed while looked at
            reached = False
        if reached:
            proc.send_signal(sig)
            sent = True
            break
        time.sleep(POLL_S)
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return proc, out, err, sent


def _assert_old_output_intact(output: Path, digests: dict[str, str]) -> None:
    assert _digests(output.parent) == digests  # the old model and its data file, byte for byte
    model = onnx.load(str(output))  # and it loads, with its external data
    assert [n.op_type for n in model.graph.node] == ["Conv"]


def _remove_staged(folder: Path) -> list[str]:
    """Remove the staging folders a killed run left (the names, for the assertion that follows)."""
    left = sorted(p.name for p in _staged(folder))
    for name in left:
        shutil.rmtree(folder / name, ignore_errors=True)
    return left


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_write_keeps_the_old_output(first_fold: tuple[Path, Path], point: str, sig: int) -> None:
    model, output = first_fold
    # digests: the old output and its data file, as an earlier run left them
    proc, err, sent, digests = _signal_at(model, output, point, sig)
    assert sent, f"the run ended (exit {proc.returncode}) before '{point}': {err[-400:]}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "bnfold: interrupted", err[-600:]
    else:  # SIGTERM unwinds like Ctrl-C (cli/signals.py): exit 128 + 15, its own line
        assert proc.returncode == 143 and err.strip().splitlines()[-1] == "bnfold: terminated", err[-600:]
    _assert_old_output_intact(output, digests)
    leftovers = sorted(p.name for p in output.parent.iterdir() if p.name not in digests)
    assert leftovers == [], f"left beside the output: {leftovers}"


def test_sigterm_during_the_write_leaves_no_staging_folder(first_fold: tuple[Path, Path]) -> None:
    model, output = first_fold
    proc, err, sent, digests = _signal_at(model, output, "data-written", signal.SIGTERM)
    assert sent, err[-400:]
    try:
        _assert_old_output_intact(output, digests)
        assert _staged(output.parent) == []
    finally:
        _remove_staged(output.parent)


@pytest.mark.parametrize("point", ["data-writing", "data-written"])
def test_sigkill_during_the_write_keeps_the_old_output(first_fold: tuple[Path, Path], point: str) -> None:
    model, output = first_fold
    proc, err, sent, digests = _signal_at(model, output, point, signal.SIGKILL)
    _remove_staged(output.parent)  # what SIGKILL leaves: the later run's cleanup is tested below
    assert sent and proc.returncode == -signal.SIGKILL, err[-400:]
    _assert_old_output_intact(output, digests)


def test_a_later_run_removes_the_staging_folder_sigkill_left(first_fold: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = first_fold
    output = tmp_path / "out" / "folded.onnx"
    proc, err, sent, _ = _signal_at(model, output, "data-writing", signal.SIGKILL)
    assert sent and proc.returncode == -signal.SIGKILL, err[-400:]
    assert _staged(output.parent), "SIGKILL left no staging folder to clean up"
    later = _fold(model, output)
    _, err = later.communicate(timeout=RUN_TIMEOUT_S)
    assert later.returncode == 0, err[-400:]
    assert _staged(output.parent) == []
    onnx.load(str(output))
