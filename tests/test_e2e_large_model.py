"""Models over 2 GiB (protobuf's limit for one message) in ``bnfold verify`` and ``bnfold fold``.

The model holds a float32 table of 2.125 GiB (2.28 GB) in an external-data file, written as a
sparse file (``truncate``) with only the few rows the graph reads filled in, so building it needs
neither 2 GiB of memory nor 2 GiB of disk. The graph is

    x -> Conv(3x3, pads 1) -> BatchNormalization (inference) -> Add -> y
    Gather(table, [C constant row indices]) -> Reshape(1, C, H, W) --^

so the table is used (not pruned) and folding has one Conv -> BN to do. The Conv weight lives in
the same data file *after* the table, at an offset above 2**31, and two of the rows read lie past
2 GiB too, so offsets beyond 2 GiB are read. Both commands run as subprocesses under
``/usr/bin/time -v`` where that exists; the time and peak memory are printed (``pytest -s``).

Skipped when the temporary folder has less than 12 GB free: ``fold`` writes the weights (no longer
sparse) of the folded model, about 2.3 GB, next to the sparse input, and of the frozen reference
too where it needs one (without calibration data the input file is the reference).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = [pytest.mark.large, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
C, H, W = 4, 8, 8  # channels, height, width of the conv path
COLS = H * W  # one table row reshapes to one channel of the output
ROWS = 2**23 + 2**19  # 8.5 Mi rows x 64 float32 = 2.125 GiB (2.28 GB)
TABLE_BYTES = ROWS * COLS * 4
PICK = np.array([0, ROWS // 2 + 3, 2**23 + 5, ROWS - 1], dtype=np.int64)  # rows read; the last two past 2 GiB
DATA = "weights.bin"
NEED_FREE = 12 * 10**9
TIME_V = Path("/usr/bin/time")

assert TABLE_BYTES > 2**31 and len(PICK) == C


def _external(tensor: TensorProto, offset: int, length: int) -> None:
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", DATA), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def build_large_model(folder: Path, rng: np.random.Generator) -> tuple[Path, dict[str, np.ndarray]]:
    """Write ``folder/model.onnx`` and its sparse ``folder/weights.bin``; return the path and the
    values the graph reads (for the expected output)."""
    rows = rng.standard_normal((C, COLS)).astype(np.float32)
    w = (rng.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32)
    w_offset = (TABLE_BYTES + 4095) // 4096 * 4096  # past the table: an offset above 2**31
    with open(folder / DATA, "wb") as fh:
        fh.truncate(w_offset + w.nbytes)  # sparse: zeros cost no disk
        for k, r in zip(PICK, rows):
            fh.seek(int(k) * COLS * 4)
            fh.write(r.tobytes())
        fh.seek(w_offset)
        fh.write(w.tobytes())

    table = TensorProto()
    table.name, table.data_type = "table", TensorProto.FLOAT
    table.dims.extend([ROWS, COLS])
    _external(table, 0, TABLE_BYTES)
    weight = TensorProto()
    weight.name, weight.data_type = "w", TensorProto.FLOAT
    weight.dims.extend(w.shape)
    _external(weight, w_offset, w.nbytes)
    bn = {"scale": rng.uniform(0.5, 2.0, C), "bias": rng.standard_normal(C),
          "mean": rng.standard_normal(C), "var": rng.uniform(0.5, 2.0, C)}
    bn = {k: v.astype(np.float32) for k, v in bn.items()}
    inits = [table, weight, numpy_helper.from_array(PICK, "pick"),
             numpy_helper.from_array(np.array([1, C, H, W], dtype=np.int64), "shape")]
    inits += [numpy_helper.from_array(v, f"bn.{k}") for k, v in bn.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["z", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"],
                         name="bn", epsilon=1e-5),
        helper.make_node("Gather", ["table", "pick"], ["rows"], name="gather", axis=0),
        helper.make_node("Reshape", ["rows", "shape"], ["rows4"], name="reshape"),
        helper.make_node("Add", ["b", "rows4"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, W])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, H, W])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())  # the tensors stay external: a few hundred bytes
    onnx.checker.check_model(str(path))  # by path: the checker sees the external data file
    return path, dict(rows=rows, w=w, **bn)


def expected(x: np.ndarray, v: dict[str, np.ndarray]) -> np.ndarray:
    """y in float64 by numpy (3x3 conv, pads 1, then BN, plus the gathered rows)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    z = np.zeros((x.shape[0], C, H, W))
    for i in range(3):
        for j in range(3):
            z += np.einsum("nchw,oc->nohw", xp[:, :, i:i + H, j:j + W], v["w"][:, :, i, j].astype(np.float64))
    s = v["scale"] / np.sqrt(v["var"].astype(np.float64) + 1e-5)
    b = (z - v["mean"][None, :, None, None]) * s[None, :, None, None] + v["bias"][None, :, None, None]
    return b + v["rows"].reshape(1, C, H, W)


def run_measured(*args: object, cwd: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float, int | None]:
    """bnfold in a subprocess: (process, wall seconds, peak RSS in MiB where /usr/bin/time -v says)."""
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    cmd = [sys.executable, "-m", "bnfold.cli.main", *map(str, args)]
    if TIME_V.exists():
        cmd = [str(TIME_V), "-v", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    peak = int(m.group(1)) // 1024 if m else None
    print(f"\nbnfold {args[0]} on a {TABLE_BYTES / 2**30:.2f} GiB model: exit {proc.returncode}, "
          f"{wall:.1f} s, peak RSS {peak if peak is not None else '?'} MiB")
    return proc, wall, peak


def bnfold_stderr(proc: subprocess.CompletedProcess) -> str:
    """stderr without /usr/bin/time's report."""
    return proc.stderr.split("\tCommand being timed:")[0]


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory):
    """(folder, model path, values); the folder (gigabytes once fold has written) is removed after
    the module, since pytest keeps the temporary folders of the last runs."""
    root = tmp_path_factory.mktemp("large")
    free = shutil.disk_usage(root).free
    if free < NEED_FREE:
        pytest.skip(f"needs {NEED_FREE / 1e9:.0f} GB free in {root} for a >2 GiB model, has {free / 1e9:.1f} GB")
    try:
        path, values = build_large_model(root, np.random.default_rng(2024))
        yield root, path, values
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_the_model_is_over_2_gib_and_onnxruntime_runs_it(large) -> None:
    root, path, values = large
    assert (root / DATA).stat().st_size > 2**31
    x = np.random.default_rng(0).standard_normal((2, 3, H, W)).astype(np.float32)
    [y] = _session(path).run(None, {"x": x})
    np.testing.assert_allclose(y, expected(x, values), rtol=1e-4, atol=1e-4)


def test_verify_large_model_against_its_copy(large) -> None:
    root, path, _ = large
    cand = root / "copy.onnx"  # same folder: it reads the same weights.bin
    shutil.copyfile(path, cand)
    work = root / "verify_cwd"
    work.mkdir()
    report = work / "verify.json"
    proc, wall, _ = run_measured("verify", path, cand, "--report", report, cwd=work)
    assert proc.returncode == 0, (proc.stdout, bnfold_stderr(proc))
    assert "PASSED" in proc.stdout and "Fold sites: all 1 within tolerance" in proc.stdout, proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["verify.json"]  # no repro bundle on a pass
    assert wall < 300


def test_fold_large_model(large) -> None:
    root, path, values = large
    work = root / "fold_cwd"
    work.mkdir()
    out = work / "out" / "folded.onnx"
    try:
        proc, wall, peak = run_measured("fold", path, "-o", out, cwd=work)
        assert proc.returncode == 0, (proc.stdout, bnfold_stderr(proc))
        assert "folded 1" in proc.stdout and "PASSED" in proc.stdout, proc.stdout
        assert "Fold sites: all 1 within tolerance" in proc.stdout, proc.stdout
        assert wall < 300
        # the table is never needed, so it stays in its file and is copied in 16 MiB pieces (about
        # 100 MiB measured; reading it in cost 4.3 GiB, a writer reading it back 8.5 GiB)
        assert peak is None or peak * 2**20 < TABLE_BYTES / 4, f"peak RSS {peak} MiB"

        folded = onnx.load(str(out), load_external_data=False)
        assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
        # every external tensor points at a file beside the model that holds its bytes
        for t in folded.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                data = out.parent / info["location"]
                assert data.is_file() and not os.path.isabs(info["location"])
                assert data.stat().st_size >= int(info.get("offset", 0)) + int(info["length"])
                assert int(info["offset"]) % 4096 == 0
        table = next(t for t in folded.graph.initializer if t.name == "table")
        assert table.data_location == TensorProto.EXTERNAL
        x = np.random.default_rng(1).standard_normal((2, 3, H, W)).astype(np.float32)
        [y] = _session(out).run(None, {"x": x})
        np.testing.assert_allclose(y, expected(x, values), rtol=1e-4, atol=1e-4)
        assert sorted(p.name for p in work.iterdir()) == ["out"]  # no repro bundle, no leftovers
        assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".data")) == ["folded.onnx"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
