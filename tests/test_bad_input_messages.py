"""Issue 14 points 8 and 9: bad input is named as such (exit 3, one line naming the problem and the
fix, no "internal error", no traceback, nothing written), never crashes deep in the fold; and
onnxruntime's own colour-coded log line never reaches stderr.

Every model is built here with onnx.helper and run through the real command line (``run_cli``;
``run_process`` where onnxruntime's C++ logger writes to the process's stderr).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import onnx
import pytest
from cli_run import run_cli, run_process
from conftest import bn_params
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError
from bnfold.formulas import arith

W = np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1) / 10
A = np.arange(4, dtype=np.float32)


# ---- building -------------------------------------------------------------------------------
def _external(arr: np.ndarray, name: str, location: str, length: int | None = None) -> onnx.TensorProto:
    t = numpy_helper.from_array(arr, name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location)] + ([("length", str(length))] if length is not None else [])
    for key, value in entries:
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _model(weight: onnx.TensorProto, *, channels: int = 4, eps: float = 1e-5, var: np.ndarray | None = None,
           training: bool = False, extra_nodes: Sequence[onnx.NodeProto] = (),
           extra_inits: Sequence[onnx.TensorProto] = (), sparse: Sequence[onnx.SparseTensorProto] = (),
           output: str = "y", x_shape: Sequence[int | str] = ("N", 3, 4, 4)) -> onnx.ModelProto:
    """x -> Conv(weight) -> BN -> y (then ``extra_nodes``)."""
    p = bn_params(np.random.default_rng(0), channels)
    if var is not None:
        p["var"] = var
    names = [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(p[k], n) for k, n in zip(("scale", "bias", "mean", "var"), names)]
    attrs: dict[str, object] = {"epsilon": eps}
    if training:
        attrs["training_mode"] = 1
    nodes = [helper.make_node("Conv", ["x", weight.name], ["z"], name="conv"),
             helper.make_node("BatchNormalization", ["z", *names], ["y"], name="bn", **attrs), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [weight, *inits, *extra_inits], sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _good(tmp_path: Path) -> Path:
    return _save(_model(numpy_helper.from_array(W, "w")), tmp_path / "good" / "good.onnx")


def _calibration(tmp_path: Path, x: np.ndarray | None = None) -> Path:
    path = tmp_path / "cal.npz"
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.standard_normal((8, 3, 4, 4)).astype(np.float32) if x is None else x)
    return path


# ---- checking -------------------------------------------------------------------------------
def _bad_input(res: CompletedProcess[str], *needles: str) -> str:
    """Exit 3, exactly one line on stderr, bnfold's own error line containing every needle."""
    assert res.returncode == 3, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("bnfold: error: "), line
    assert "internal error" not in line and "Traceback" not in res.stderr
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _commands(model: Path, tmp_path: Path, good: Path) -> dict[str, list[object]]:
    out = tmp_path / "out" / "folded.onnx"
    return {"fold": ["fold", model, "-o", out, "--no-repro"], "inspect": ["inspect", model],
            "verify-reference": ["verify", model, good, "--no-repro"],
            "verify-candidate": ["verify", good, model, "--no-repro"]}


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- 1. an external-data file shorter than its tensor ------------------------------------------
@pytest.mark.parametrize("command", ["fold", "inspect", "verify-reference", "verify-candidate"])
def test_a_data_file_shorter_than_its_tensor_is_named(tmp_path: Path, command: str) -> None:
    # before: "internal error: ValueError: cannot reshape array of size 5 into shape (4,3,1,1)"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(W.tobytes()[:20])  # 20 of the 48 bytes, no "length": read to the end
    model = _save(_model(_external(W, "w", "w.bin")), folder / "m.onnx")
    res = run_cli(*_commands(model, tmp_path, _good(tmp_path))[command], cwd=tmp_path)
    _bad_input(res, "tensor 'w'", "[4, 3, 1, 1] (48 bytes)", "'w.bin' holds 20 bytes", "copy the model with its data")
    _nothing_written(tmp_path)


# ---- 2. epsilon = 0 over a channel of zero variance ------------------------------------------
@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_epsilon_zero_with_a_zero_variance_channel_in_inference_mode(tmp_path: Path, command: str) -> None:
    # before: "internal error: ValueError: var + eps must be positive and finite; it is not for channel(s) [1]"
    var = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
    model = _save(_model(numpy_helper.from_array(W, "w"), eps=0.0, var=var), tmp_path / "m.onnx")
    res = run_cli(*_commands(model, tmp_path, model)[command])
    _bad_input(res, "BN 'bn'", "epsilon=0", "channel(s) 1", "positive epsilon")
    _nothing_written(tmp_path)


def test_epsilon_zero_with_a_channel_constant_on_the_calibration_data(tmp_path: Path) -> None:
    # output channel 2 of the Conv has an all-zero weight: its calibrated variance is exactly 0
    w = W.copy()
    w[2] = 0
    model = _save(_model(numpy_helper.from_array(w, "w"), eps=0.0, training=True), tmp_path / "m.onnx")
    res = run_cli("fold", model, "--data", _calibration(tmp_path), "-o", tmp_path / "out" / "f.onnx", "--no-repro")
    _bad_input(res, "BN 'bn'", "channel(s) 2", "positive epsilon")
    _nothing_written(tmp_path)
    # the same model with a positive epsilon folds: only the division by zero is refused
    ok = _save(_model(numpy_helper.from_array(w, "w"), eps=1e-5, training=True), tmp_path / "ok.onnx")
    assert run_cli("fold", ok, "--data", _calibration(tmp_path), "-o", tmp_path / "ok" / "f.onnx",
                   "--no-repro").returncode == 0


def test_a_negative_stored_variance_is_named_as_corrupt_statistics(tmp_path: Path) -> None:
    var = np.array([1.0, 1.0, 1.0, -3.0], np.float32)
    model = _model(numpy_helper.from_array(W, "w"), var=var)
    with pytest.raises(BadInputError, match=r"BN 'bn' .*channel\(s\) 3 .*statistics are corrupt"):
        bnfold.fold(model, verify=False)


# ---- 3. huge declared dims without the data -------------------------------------------------
def _huge(name: str = "w") -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend([1 << 20, 1 << 20, 3, 3])  # 36 TiB declared
    return t


@pytest.mark.parametrize("raw", [None, b"", b"\0" * 12], ids=["no-data", "empty-raw", "short-raw"])
@pytest.mark.parametrize("command", ["fold", "inspect", "verify-reference"])
def test_huge_declared_dims_over_a_few_bytes_are_refused_before_allocating(tmp_path: Path, raw: bytes | None,
                                                                          command: str) -> None:
    # before: "internal error: ValueError: cannot reshape array of size 0 into shape (1048576,1048576,3,3)"
    t = _huge()
    if raw is not None:
        t.raw_data = raw
    model = _save(_model(t, channels=1 << 20), tmp_path / "m.onnx")
    res = run_cli(*_commands(model, tmp_path, _good(tmp_path))[command])
    held = "0 values" if raw is None else f"{len(raw)} bytes"
    _bad_input(res, "tensor 'w'", "[1048576, 1048576, 3, 3]", held, "truncated or corrupt")
    _nothing_written(tmp_path)


def test_huge_declared_dims_over_a_small_external_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(W.tobytes())
    t = _huge()
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    model = _save(_model(t, channels=1 << 20), folder / "m.onnx")
    for command in ("fold", "inspect", "verify-reference"):
        res = run_cli(*_commands(model, tmp_path, _good(tmp_path))[command])
        _bad_input(res, "tensor 'w'", "'w.bin' holds 48 bytes")


@pytest.mark.parametrize("command", ["fold", "verify"])
def test_random_inputs_for_a_huge_declared_input_are_refused(tmp_path: Path, command: str) -> None:
    # before: "internal error: MemoryError: Unable to allocate 96.0 PiB for an array with shape ..."
    model = _save(_model(numpy_helper.from_array(W, "w"), x_shape=(1 << 20, 3, 1 << 20, 1 << 12)),
                  tmp_path / "m.onnx")
    args = ["fold", model, "-o", tmp_path / "out" / "f.onnx"] if command == "fold" else ["verify", model, model]
    res = run_cli(*args, "--no-repro")
    _bad_input(res, "input 'x' declares shape (1048576, 3, 1048576, 4096)", "GiB of memory", "pass --data")
    _nothing_written(tmp_path)


def test_a_short_typed_field_is_named_too() -> None:
    t = numpy_helper.from_array(W, "w")
    t.ClearField("raw_data")
    t.float_data.extend([1.0, 2.0])  # 2 of the 12 values
    with pytest.raises(BadInputError, match=r"tensor 'w' declares shape \[4, 3, 1, 1\] \(12 values\) but holds 2"):
        bnfold.inspect(_model(t))


# ---- 4. verify on files that are not ONNX ----------------------------------------------------
def _not_onnx(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.onnx"
    if kind == "text":
        path.write_text("hello world\nthis is not a model\n")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a.txt", "x" * 100)
    else:
        path.write_bytes(np.random.default_rng(3).bytes(4096))
    return path


@pytest.mark.parametrize("kind", ["text", "zip", "garbage"])
def test_verify_names_a_file_that_is_not_onnx_as_fold_and_inspect_do(tmp_path: Path, kind: str) -> None:
    # before (verify): "internal error: DecodeError: Error parsing message with type 'onnx.ModelProto'" for a
    # REFERENCE, and onnxruntime's "Protobuf parsing failed" for a CANDIDATE
    bad = _not_onnx(tmp_path, kind)
    lines = {command: _bad_input(run_cli(*args), "is not an ONNX model", "pass an .onnx file")
             for command, args in _commands(bad, tmp_path, _good(tmp_path)).items()}
    assert len(set(lines.values())) == 1, lines  # one loader, one message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
@pytest.mark.parametrize("command", ["fold", "inspect", "verify-reference", "verify-candidate"])
def test_an_unreadable_model_is_exit_3(tmp_path: Path, command: str) -> None:
    # the README's exit codes: "missing or unreadable model file" is 3 (not run here: these sessions run as root)
    model = _good(tmp_path / "unreadable")
    model.chmod(0)
    try:
        _bad_input(run_cli(*_commands(model, tmp_path, _good(tmp_path))[command]), "Permission denied")
    finally:
        model.chmod(0o644)
    _nothing_written(tmp_path)


def _not_a_regular_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(a path that exists and is no regular file, what bnfold.files calls it)."""
    if kind == "device":
        return Path(os.devnull), "a character device"
    if kind == "fifo":
        path = tmp_path / "pipe.onnx"
        os.mkfifo(path)
        return path, "a FIFO"
    path = tmp_path / "folder.onnx"
    path.mkdir()
    return path, "a directory"


@pytest.mark.parametrize("kind", ["device", "fifo", "directory"])
def test_a_model_path_that_is_no_regular_file_is_named_alike_by_every_command(tmp_path: Path, kind: str) -> None:
    # before: `verify /dev/null X` said "model file not found: /dev/null" while fold and inspect said
    # "model path '/dev/null' is not a file"; a directory was "model path is a directory, expected an ONNX file"
    path, what = _not_a_regular_file(tmp_path, kind)
    lines = {command: _bad_input(run_cli(*args), f"model path '{path}' is {what}, not a regular file",
                                 "pass the model file itself")
             for command, args in _commands(path, tmp_path, _good(tmp_path)).items()}
    assert len(set(lines.values())) == 1, lines  # one check, one message
    _nothing_written(tmp_path)


# ---- 5. an invalid grouped ConvTranspose / Conv ----------------------------------------------
def _conv_transpose_group3(tmp_path: Path) -> Path:
    """ConvTranspose with group 3 over 32 input channels (invalid: 3 does not divide 32) -> BN."""
    rng = np.random.default_rng(0)
    p = bn_params(rng, 12)
    names = [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(rng.standard_normal((32, 4, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(p[k], n) for k, n in zip(("scale", "bias", "mean", "var"), names)]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["z"], name="ct", group=3),
             helper.make_node("BatchNormalization", ["z", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return _save(model, tmp_path / "ct.onnx")


def _forward_conv_group3(tmp_path: Path) -> Path:
    """BN -> Conv with group 3 and 32 output channels (invalid): a forward-fold candidate."""
    rng = np.random.default_rng(0)
    p = bn_params(rng, 12)
    names = [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(rng.standard_normal((32, 4, 1, 1)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(p[k], n) for k, n in zip(("scale", "bias", "mean", "var"), names)]
    nodes = [helper.make_node("BatchNormalization", ["x", *names], ["b"], name="bn"),
             helper.make_node("Conv", ["b", "w"], ["y"], name="conv", group=3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return _save(model, tmp_path / "fwd.onnx")


@pytest.mark.parametrize("build, detail", [
    (_conv_transpose_group3, "ConvTranspose 'ct' has group=3, which does not divide its 32 input channels"),
    (_forward_conv_group3, "Conv 'conv' has group=3, which does not divide its 32 output channels"),
], ids=["conv-transpose", "forward-conv"])
def test_an_invalid_grouped_conv_is_kept_with_a_reason(tmp_path: Path, build, detail: str) -> None:
    # before: "internal error: ValueError: groups=3 does not divide C_in=32" (C_out=32 forward) from
    # arith._groups_of, in inspect and fold alike
    path = build(tmp_path)
    rows = bnfold.inspect(path)
    assert [(r.decision.action.value, r.decision.reason.value if r.decision.reason else None) for r in rows] \
        == [("frozen-kept", "CHANNEL_MISMATCH")]
    assert rows[0].decision.detail.startswith(detail), rows[0].decision.detail
    assert run_cli("inspect", path).returncode == 0
    # the model itself is invalid: fold keeps the BN, and onnxruntime's refusal of the node is bad input
    res = run_cli("fold", path, "-o", tmp_path / "out" / "f.onnx", "--no-repro")
    _bad_input(res, "onnxruntime", "group")
    _nothing_written(tmp_path)


def test_groups_divide() -> None:
    assert arith.groups_divide(4, 32) and arith.groups_divide(1, 7)
    assert not arith.groups_divide(3, 32)
    assert not arith.groups_divide(0, 32) and not arith.groups_divide(-2, 32)
    assert not arith.groups_divide(2.5, 10) and not arith.groups_divide("x", 10)


# ---- 6. external data anywhere: sparse initializers, subgraphs, attributes --------------------
def _if_node(sub_tensor: onnx.TensorProto, as_attribute: bool) -> onnx.NodeProto:
    """If(true) whose branch adds tensor ``c`` (a subgraph initializer, or a Constant's attribute) to y."""
    nodes = [helper.make_node("Constant", [], ["c"], name="sc", value=sub_tensor)] if as_attribute else []
    nodes.append(helper.make_node("Add", ["y", "c"], ["o"], name="sadd"))
    sub = helper.make_graph(nodes, "branch", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
                            [] if as_attribute else [sub_tensor])
    return helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=sub, else_branch=sub)


def _carrier_model(carrier: str, location: str) -> onnx.ModelProto:
    """A model whose only external tensor (A, shaped to add to y) sits in ``carrier``."""
    a4 = A.reshape(1, 4, 1, 1)
    add = helper.make_node("Add", ["y", "a"], ["y2"], name="add")
    cond = numpy_helper.from_array(np.array(True), "cond")
    w = numpy_helper.from_array(W, "w")
    if carrier == "initializer":
        return _model(w, extra_nodes=[add], extra_inits=[_external(a4, "a", location)], output="y2")
    if carrier == "constant":
        const = helper.make_node("Constant", [], ["a"], name="ca", value=_external(a4, "av", location))
        return _model(w, extra_nodes=[const, add], output="y2")
    if carrier in ("subgraph-initializer", "subgraph-attribute"):
        node = _if_node(_external(a4, "c", location), carrier == "subgraph-attribute")
        return _model(w, extra_nodes=[node], extra_inits=[cond], output="y2")
    if carrier == "sparse-initializer":
        sp = helper.make_sparse_tensor(_external(A, "a", location),
                                       numpy_helper.from_array(np.arange(4, dtype=np.int64), "a_idx"), [4])
        add_sp = helper.make_node("Add", ["y", "a"], ["y2"], name="add")  # broadcast over the last axis
        return _model(w, extra_nodes=[add_sp], sparse=[sp], output="y2")
    raise AssertionError(carrier)


CARRIERS = ["initializer", "constant", "subgraph-initializer", "subgraph-attribute", "sparse-initializer"]


def _escapes(folder: Path, kind: str) -> str:
    """A location in ``folder`` that must not be read: a link out of it, a folder, a missing file."""
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.bin").write_bytes((A * 100).tobytes())
    if kind == "symlink":
        os.symlink(outside / "secret.bin", folder / "link.bin")
        return "link.bin"
    if kind == "directory":
        (folder / "sub").mkdir()
        return "sub"
    if kind == "dotdot":
        return "../outside/secret.bin"
    return "missing.bin"


@pytest.mark.parametrize("kind", ["symlink", "directory", "dotdot", "missing"])
@pytest.mark.parametrize("carrier", CARRIERS)
def test_external_data_that_escapes_or_is_no_file_is_bad_input_everywhere(tmp_path: Path, carrier: str,
                                                                           kind: str) -> None:
    # before, for a sparse initializer: inspect exit 0 (never looked), fold exit 3 with onnxruntime
    # failing on bnfold's staged copy (the location was resolved against the staging folder)
    folder = tmp_path / "model"
    folder.mkdir()
    model = _save(_carrier_model(carrier, _escapes(folder, kind)), folder / "m.onnx")
    good = _good(tmp_path)
    for command in ("fold", "inspect", "verify-reference"):
        res = run_cli(*_commands(model, tmp_path, good)[command], cwd=tmp_path)
        _bad_input(res, "external data of", "keep the data files next to the model")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("carrier", CARRIERS)
def test_external_data_anywhere_is_read_from_the_model_folder(tmp_path: Path, carrier: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(A.tobytes())
    model = _save(_carrier_model(carrier, "a.bin"), folder / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.bin").write_bytes((A * 100).tobytes())  # a decoy where bnfold runs and writes
    out = elsewhere / "f.onnx"
    res = run_cli("fold", model, "-o", out, "--no-repro", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert run_cli("verify", model, out, "--no-repro", cwd=elsewhere).returncode == 0
    folded = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in folded.graph.initializer for e in t.external_data if e.key == "location"}
    assert "a.bin" not in locations  # the written model never points at a file bnfold did not write


# ---- 9. onnxruntime's own log line ----------------------------------------------------------
def _fails_when_run(tmp_path: Path) -> Path:
    """y = BN(Conv(x)) + ConstantOfShape([2**40, 4, 4, 4]): loads, and fails in onnxruntime when run."""
    shape = numpy_helper.from_array(np.array([1 << 40, 4, 4, 4], np.int64), "shp")
    fill = numpy_helper.from_array(np.array([1.0], np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["big"], name="cos", value=fill),
             helper.make_node("Add", ["y", "big"], ["y2"], name="add")]
    return _save(_model(numpy_helper.from_array(W, "w"), extra_nodes=nodes, extra_inits=[shape], output="y2"),
                 tmp_path / "m.onnx")


def _calibration_fails(tmp_path: Path) -> Path:
    """A training BN behind a Reshape to a fixed batch of 2: calibration batches of 8 fail in onnxruntime."""
    shape = numpy_helper.from_array(np.array([2, 4, 4, 4], np.int64), "shp")
    model = _model(numpy_helper.from_array(W, "w"), training=True, extra_inits=[shape])
    model.graph.node.insert(1, helper.make_node("Reshape", ["z0", "shp"], ["z"], name="rs"))
    model.graph.node[0].output[0] = "z0"
    return _save(model, tmp_path / "cal_fails.onnx")


@pytest.mark.parametrize("case", ["verify", "fold", "calibration"])
def test_onnxruntime_errors_leave_only_bnfolds_line(tmp_path: Path, case: str) -> None:
    # before: "\x1b[1;31m2026-... [E:onnxruntime:, sequential_executor.cc:677 ExecuteKernel] Non-zero status
    # code returned while running ConstantOfShape node ...\x1b[m" on stderr before bnfold's own line
    if case == "calibration":
        args: list[object] = ["fold", _calibration_fails(tmp_path), "--data", _calibration(tmp_path), "-o",
                              tmp_path / "out" / "f.onnx", "--no-repro"]
        node = "Reshape"
    else:
        model = _fails_when_run(tmp_path)
        args = ["verify", model, model] if case == "verify" else ["fold", model, "-o", tmp_path / "out" / "f.onnx"]
        args.append("--no-repro")
        node = "ConstantOfShape"
    res = run_process(*args, cwd=tmp_path)
    assert "\x1b[" not in res.stderr and "[E:onnxruntime" not in res.stderr, res.stderr
    _bad_input(res, "onnxruntime", node)  # bnfold's line still carries onnxruntime's error text
    _nothing_written(tmp_path)
