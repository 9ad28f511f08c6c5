"""Fuzz: adversarial external-data layouts through ``bnfold fold``, ``inspect`` and ``verify``,
with every Python ``open`` recorded by an audit hook (``sys.addaudithook``).

The model is x -> Conv(W) -> BN -> y with W's 48 bytes external, held by an initializer, by a
Constant node, or by a Constant inside an If's then-branch. Its ``location``/``offset``/``length``
are bent: ``..``, absolute paths, a symlink to a file outside, a symlinked folder, a directory, a
FIFO, ``/proc/self/...``, offsets and lengths out of range, negative, huge or not numbers. A decoy
with valid bytes lies outside the model's folder, so a read of it would succeed silently.

Each command must end in exit 0 (only the valid layouts) or exit 3 with one line, and no file
outside the model's folder (and the output folder, bnfold's own temporary folders, Python's and the
system's library files) may be opened. The audit sees Python's ``open``/``os.open`` only: files
that onnxruntime's C++ code opens by itself are not seen (bnfold hands it models already in memory).
Reads that the audit cannot see (onnx opens external data in C++) are caught by the decoy's
access time, set to 0 before each run (where the file system records access times).
A FIFO must not hang a run: a watchdog opens its write end after a few seconds, which ends any read.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import bn_params
from fuzz_graphs import report_line
from onnx import TensorProto, helper, numpy_helper

W = np.full((4, 3, 1, 1), 2.0, np.float32)
FIFO_WAIT_S = 5.0
EXITS: Counter[str] = Counter()

_opened: list[str] | None = None  # the paths opened while a command runs (None: not recording)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # for the life of the process (hooks cannot be removed); idle unless recording

# (name, location (``{outside}`` = the decoy folder's absolute path), offset, length, exits allowed)
LAYOUTS: list[tuple[str, str, str | None, str | None, tuple[int, ...]]] = [
    ("valid", "w.bin", "0", "48", (0,)),
    ("valid_no_offset_length", "w.bin", None, None, (0,)),
    ("valid_offset", "w_off.bin", "16", "48", (0,)),
    ("dotdot", "../outside/w.bin", "0", "48", (3,)),
    ("dotdot_inside_out_in", "../model/w.bin", "0", "48", (0, 3)),  # names the model's own folder
    ("deep_dotdot", "sub/../../outside/w.bin", "0", "48", (3,)),
    ("absolute", "{outside}/w.bin", "0", "48", (3,)),
    ("symlink_to_outside", "link.bin", "0", "48", (3,)),
    ("symlinked_folder", "linkdir/w.bin", "0", "48", (3,)),
    ("directory", "adir", "0", "48", (3,)),
    ("dot", ".", "0", "48", (3,)),
    ("empty_location", "", "0", "48", (3,)),
    ("fifo", "pipe", "0", "48", (3,)),
    ("proc_absolute", "/proc/self/environ", "0", "48", (3,)),
    ("proc_relative", "../../../../../../../../proc/self/environ", "0", "48", (3,)),
    ("dev_zero", "/dev/zero", "0", "48", (3,)),
    ("missing", "nothere.bin", "0", "48", (3,)),
    # verify hands the path to onnxruntime, which reads it up to the NUL: w.bin, in the folder
    ("nul_byte", "w.bin\x00.txt", "0", "48", (3,)),
    ("offset_past_end", "w.bin", "4096", "48", (3,)),
    ("length_past_end", "w.bin", "0", "4096", (3,)),
    ("length_short", "w.bin", "0", "24", (3,)),
    ("offset_plus_length_past_end", "w.bin", "16", "48", (3,)),
    ("negative_offset", "w.bin", "-16", "48", (3,)),
    ("negative_length", "w.bin", "0", "-1", (3,)),
    ("huge_offset", "w.bin", str(2**62), "48", (3,)),
    ("huge_length", "w.bin", "0", str(2**62), (3,)),
    ("non_numeric_offset", "w.bin", "zero", "48", (3,)),
]
HOLDERS = ["initializer", "constant", "if_branch"]

# layouts found failing, xfail(strict=True): (holder, layout, command) -> what failed
KNOWN: dict[tuple[str, str, str], str] = {
}


def _external(name: str, location: str, offset: str | None, length: str | None) -> TensorProto:
    t = numpy_helper.from_array(W, name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return t


def _model(holder: str, tensor: TensorProto) -> onnx.ModelProto:
    """x -> Conv(weight held by ``holder``) -> BN -> y."""
    p = bn_params(np.random.default_rng(3), 4)
    names = [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(p[k], n) for k, n in zip(("scale", "bias", "mean", "var"), names)]
    nodes = []
    if holder == "initializer":
        tensor.name = "w"
        inits.append(tensor)
    elif holder == "constant":
        nodes.append(helper.make_node("Constant", [], ["w"], name="c", value=tensor))
    else:  # a Constant in the then-branch of an If whose condition is a constant True
        out = helper.make_tensor_value_info("w_then", TensorProto.FLOAT, list(W.shape))
        then_g = helper.make_graph([helper.make_node("Constant", [], ["w_then"], name="ct", value=tensor)],
                                   "then", [], [out])
        else_out = helper.make_tensor_value_info("w_else", TensorProto.FLOAT, list(W.shape))
        else_g = helper.make_graph([helper.make_node("Constant", [], ["w_else"], name="ce",
                                                     value=numpy_helper.from_array(W, "we"))], "else", [], [else_out])
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["w"], name="if", then_branch=then_g, else_branch=else_g))
    nodes += [helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
              helper.make_node("BatchNormalization", ["z", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _layout(base: Path, holder: str, location: str, offset: str | None, length: str | None) -> Path:
    """The model folder, the decoy folder beside it, and every trap a layout names; returns the model."""
    folder, outside = base / "model", base / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "w.bin").write_bytes((W * 100).tobytes())  # the decoy: valid bytes, other values
    (folder / "w.bin").write_bytes(W.tobytes())
    (folder / "w_off.bin").write_bytes(b"\0" * 16 + W.tobytes())
    (folder / "adir").mkdir()
    (folder / "sub").mkdir()
    os.symlink(outside / "w.bin", folder / "link.bin")
    os.symlink(outside, folder / "linkdir")
    os.mkfifo(folder / "pipe")
    model = _model(holder, _external("wc", location.replace("{outside}", str(outside)), offset, length))
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _allowed_roots(base: Path) -> list[str]:
    """Where a run may open files: the model's and the output's folders, bnfold's temporary folders,
    Python's installation, the system's library and data files."""
    roots = {os.path.realpath(base / "model"), os.path.realpath(base / "out"), os.path.realpath(sys.prefix),
             os.path.realpath(sys.base_prefix), os.path.realpath(sys.exec_prefix), "/usr/lib", "/usr/lib64",
             "/usr/share", "/usr/local/lib", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime", "/dev/null"}
    roots |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p) and not p.startswith(str(base))}
    return sorted(roots)


def _outside_roots(path: str, base: Path, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    tmp = os.path.realpath(tempfile.gettempdir())
    if real.startswith(tmp + os.sep) and "bnfold" in real[len(tmp):] and not real.startswith(str(base)):
        return False  # bnfold's own temporary folders (calibration, staging)
    return not any(real == r or real.startswith(r + os.sep) for r in roots)


def _watchdog(fifo: Path) -> tuple[threading.Timer, list[bool]]:
    """After FIFO_WAIT_S, open the FIFO's write end (if a reader is blocked on it) and close it: the
    reader gets end-of-file instead of hanging the test run."""
    fired: list[bool] = []

    def release() -> None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader waiting
            return
        fired.append(True)
        os.close(fd)

    timer = threading.Timer(FIFO_WAIT_S, release)
    timer.start()
    return timer, fired


@pytest.fixture(scope="module", autouse=True)
def _report_exits(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report_line(request, "fuzz external data, exits: " + ", ".join(f"{k}={v}" for k, v in sorted(EXITS.items())))


@pytest.fixture(scope="module")
def atime_works(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether the temporary folder's file system updates the access time on a read of a file whose
    access time is older than its modification time (relatime and strictatime do; noatime does not)."""
    probe = tmp_path_factory.mktemp("atime") / "probe"
    probe.write_bytes(b"probe")
    os.utime(probe, (0, os.stat(probe).st_mtime))
    probe.read_bytes()
    return os.stat(probe).st_atime != 0


def _params() -> list[object]:
    params: list[object] = []
    for holder in HOLDERS:
        for name, location, offset, length, allowed in LAYOUTS:
            for cmd in ("fold", "inspect", "verify"):
                marks = [pytest.mark.xfail(strict=True, reason=KNOWN[holder, name, cmd])] \
                    if (holder, name, cmd) in KNOWN else []
                params.append(pytest.param(holder, location, offset, length, allowed, cmd,
                                           id=f"{holder}-{name}-{cmd}", marks=marks))
    return params


def _command(cmd: str, path: Path, out: Path) -> Callable[[], Any]:
    if cmd == "fold":
        return lambda: run_cli("fold", path, "-o", out / "folded.onnx")
    if cmd == "inspect":
        return lambda: run_cli("inspect", path)
    return lambda: run_cli("verify", path, path)


@pytest.mark.parametrize("holder,location,offset,length,allowed,cmd", _params())
def test_an_external_data_layout_stays_in_the_model_folder(holder: str, location: str, offset: str | None,
                                                           length: str | None, allowed: tuple[int, ...],
                                                           cmd: str, tmp_path: Path, atime_works: bool) -> None:
    global _opened
    path = _layout(tmp_path, holder, location, offset, length)
    out = tmp_path / "out"
    out.mkdir()
    roots = _allowed_roots(tmp_path)
    run = _command(cmd, path, out)
    os.utime(tmp_path / "outside" / "w.bin", (0, os.stat(tmp_path / "outside" / "w.bin").st_mtime))
    timer, fired = _watchdog(path.parent / "pipe")
    _opened = []
    try:
        r = run()
    finally:
        opened, _opened = _opened, None
        timer.cancel()
    EXITS[f"{cmd}:{r.returncode}"] += 1
    assert not fired, f"bnfold {cmd} blocked reading the FIFO"
    assert str(path) in opened  # the hook records this run's opens
    if atime_works:  # a read of the decoy, by Python or C++ (onnx, onnxruntime), sets its access time
        assert os.stat(tmp_path / "outside" / "w.bin").st_atime == 0, f"bnfold {cmd} read the decoy outside"
    escaped = sorted({p for p in opened if _outside_roots(p, tmp_path, roots)})
    assert escaped == [], f"bnfold {cmd} opened files outside the model's folder: {escaped}"
    assert r.returncode in allowed, f"bnfold {cmd} exit {r.returncode}: {r.stderr[-600:]}"
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-600:]
    if r.returncode == 3:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), r.stderr[-600:]
        assert os.listdir(out) == []  # nothing written


def test_the_audit_and_the_access_time_see_a_read_outside(tmp_path: Path, atime_works: bool) -> None:
    """The two detectors above catch what they are for: a Python open of the decoy, and a read."""
    global _opened
    _layout(tmp_path, "initializer", "w.bin", "0", "48")
    decoy = tmp_path / "outside" / "w.bin"
    os.utime(decoy, (0, os.stat(decoy).st_mtime))
    _opened = []
    try:
        decoy.read_bytes()
    finally:
        opened, _opened = _opened, None
    assert [p for p in opened if _outside_roots(p, tmp_path, _allowed_roots(tmp_path))] == [str(decoy)]
    assert not atime_works or os.stat(decoy).st_atime != 0
