"""The repro bundle a failed verification writes (``bnfold/verification/repro.py``, CLI ``--repro-dir`` /
``--no-repro``).

The CLI writes one on every failure unless ``--no-repro``: into ``--repro-dir``, else beside the
JSON report (``X.json`` -> ``X.repro/``), else ``./bnfold-repro``. Passing runs write nothing. The
library writes one only where ``VerifyConfig.repro_dir`` says. Every command runs in this process
(``cli_run.run_cli``: ``bnfold.cli.main.main(argv)`` with stdout and stderr captured apart) with a
temporary folder as its working directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import bn, bn_params, init, make_model, vi
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
C = 4


# --------------------------------------------------------------------------- helpers


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("bnfold: warning:")]


def read_pb(path: Path) -> tuple[str, np.ndarray]:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return tensor.name, numpy_helper.to_array(tensor)


def conv_bn_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv(3x3, pads 1) -> BN (inference) -> Relu -> Conv(1x1) -> BN -> y."""
    p0, p1 = bn_params(rng, C), bn_params(rng, C)
    n0, i0 = bn("bn0", "z0", "b0", p0)
    n1, i1 = bn("bn1", "z1", "y", p1)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["z0"], name="conv0", pads=[1, 1, 1, 1]), n0,
             helper.make_node("Relu", ["b0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["z1"], name="conv1"), n1]
    inits = [init("w0", (rng.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32)),
             init("w1", (rng.standard_normal((C, C, 1, 1)) * 0.3).astype(np.float32)), *i0, *i1]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", C, 6, 6])], inits)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ref.onnx; same.onnx (a copy); bad.onnx (one weight of conv1 moved by 0.5)."""
    root = tmp_path_factory.mktemp("repro_models")
    model = conv_bn_model(np.random.default_rng(77))
    paths = {"ref": root / "ref.onnx", "same": root / "same.onnx", "bad": root / "bad.onnx"}
    onnx.save(model, paths["ref"])
    onnx.save(model, paths["same"])
    w = next(t for t in model.graph.initializer if t.name == "w1")
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] += 0.5
    w.CopyFrom(numpy_helper.from_array(arr, "w1"))
    onnx.save(model, paths["bad"])
    return paths


def used_inputs(model: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The first batch ``bnfold verify`` feeds by default (seed 0, uniform in [0, 1), batch 1)."""
    from bnfold.onnx.runtime import input_specs
    from bnfold.verification.feeds import random_feeds

    feeds, _ = random_feeds(input_specs(onnx.load(model)), seed=seed, val_range=(0.0, 1.0), iterations=1,
                            batch_size=1)
    return feeds[0]


def rerun(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the command of a repro.json (``bnfold verify ...``) with this interpreter, no new bundle."""
    argv = shlex.split(command)
    assert argv[:2] == ["bnfold", "verify"], command
    return run_cli(*argv[1:], "--no-repro", cwd=cwd)


# --------------------------------------------------------------------------- verify: where the bundle goes


def test_failing_verify_writes_bnfold_repro_in_the_cwd(pair: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("verify", pair["ref"], pair["bad"], cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    [line] = error_lines(proc.stderr)
    assert line.startswith("bnfold: error: CANDIDATE does not match REFERENCE")
    bundle = tmp_path / "bnfold-repro"
    assert "Reproduction files: bnfold-repro" in proc.stdout

    # the inputs, in the ONNX test-data layout, equal to the ones compared
    name, x = read_pb(bundle / "test_data_set_0" / "input_0.pb")
    assert name == "x" and x.dtype == np.float32 and x.shape == (1, 3, 6, 6)
    np.testing.assert_array_equal(x, used_inputs(pair["ref"])["x"])
    # the reference's output on them
    out_name, y = read_pb(bundle / "test_data_set_0" / "output_0.pb")
    assert out_name == "y" and y.shape == (1, C, 6, 6)

    meta = json.loads((bundle / "repro.json").read_text(encoding="utf-8"))
    assert meta["reference"] == str(pair["ref"].resolve())
    assert meta["candidate"] == str(pair["bad"].resolve())
    assert meta["providers"] == ["cpu"] and meta["inputs"]["seed"] == 0
    assert meta["inputs_npz"] is None  # --seed / --val-range recreate these inputs
    assert meta["command"].startswith("bnfold verify ")
    # nothing else left behind: no temporary folders beside the bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bnfold-repro"]

    again = rerun(meta["command"], tmp_path)  # the command reproduces the failure
    assert again.returncode == 1, (again.stdout, again.stderr)
    assert not (tmp_path / "bnfold-repro-1").exists()


def test_failing_verify_with_report_writes_beside_it(pair: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "reports" / "X.json"
    proc = run_cli("verify", pair["ref"], pair["bad"], "--report", report, cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    bundle = tmp_path / "reports" / "X.repro"
    assert (bundle / "repro.json").is_file() and (bundle / "test_data_set_0" / "input_0.pb").is_file()
    assert not (tmp_path / "bnfold-repro").exists()
    doc = json.loads(report.read_text(encoding="utf-8"))
    assert doc["verification"]["repro_dir"] == str(bundle)
    # the pb holds exactly the values the report's sha256 was taken over (one batch)
    _, x = read_pb(bundle / "test_data_set_0" / "input_0.pb")
    assert hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() == doc["verification"]["inputs"]["sha256"]["x"]


def test_repro_dir_option_wins(pair: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "X.json"
    proc = run_cli("verify", pair["ref"], pair["bad"], "--report", report, "--repro-dir", "here/bundle", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "here" / "bundle" / "repro.json").is_file()
    assert not (tmp_path / "X.repro").exists() and not (tmp_path / "bnfold-repro").exists()
    assert json.loads(report.read_text())["verification"]["repro_dir"] == "here/bundle"


def test_no_repro_writes_none(pair: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "X.json"
    proc = run_cli("verify", pair["ref"], pair["bad"], "--report", report, "--no-repro", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.json"]
    assert json.loads(report.read_text())["verification"]["repro_dir"] is None
    assert "Reproduction files" not in proc.stdout


def test_passing_run_writes_none(pair: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("verify", pair["ref"], pair["same"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "X.json"
    proc = run_cli("verify", pair["ref"], pair["same"], "--report", report, "--repro-dir", "r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.json"]
    assert json.loads(report.read_text())["verification"]["repro_dir"] is None


# --------------------------------------------------------------------------- replacing, refusing


def test_an_earlier_bundle_is_replaced(pair: dict[str, Path], tmp_path: Path) -> None:
    assert run_cli("verify", pair["ref"], pair["bad"], cwd=tmp_path).returncode == 1
    bundle = tmp_path / "bnfold-repro"
    first = (bundle / "test_data_set_0" / "input_0.pb").read_bytes()
    proc = run_cli("verify", pair["ref"], pair["bad"], "--seed", "5", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (bundle / "test_data_set_0" / "input_0.pb").read_bytes() != first
    assert json.loads((bundle / "repro.json").read_text())["inputs"]["seed"] == 5
    _, x = read_pb(bundle / "test_data_set_0" / "input_0.pb")
    np.testing.assert_array_equal(x, used_inputs(pair["ref"], seed=5)["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bnfold-repro"]


def test_an_empty_folder_is_used(pair: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "repro").mkdir()
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", "repro", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "repro" / "repro.json").is_file()


def test_a_foreign_default_folder_is_kept(pair: dict[str, Path], tmp_path: Path) -> None:
    """./bnfold-repro that is not a bundle: left alone, the bundle goes to bnfold-repro-1."""
    mine = tmp_path / "bnfold-repro"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = run_cli("verify", pair["ref"], pair["bad"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (mine / "notes.txt").read_text() == "mine" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert (tmp_path / "bnfold-repro-1" / "repro.json").is_file()
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("bnfold: warning:")]
    assert any("bnfold-repro-1" in w and "not a bnfold repro bundle" in w for w in warnings), proc.stderr
    assert "Reproduction files: bnfold-repro-1" in proc.stdout


def test_a_foreign_repro_dir_is_a_usage_error(pair: dict[str, Path], tmp_path: Path) -> None:
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", mine, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "not a bnfold repro bundle" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(mine)) == ["keep.txt"]
    assert proc.stdout == ""  # refused before anything ran


def test_repro_dir_and_no_repro_exclude_each_other(pair: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", "r", "--no-repro", cwd=tmp_path)
    assert proc.returncode == 2 and "--no-repro" in proc.stderr, proc.stderr


def test_an_unwritable_place_warns_and_keeps_the_verdict(pair: dict[str, Path], tmp_path: Path) -> None:
    # a folder that cannot be made there, found only when the bundle is written (even root cannot make one in
    # /proc); a path under a regular file is refused before any work (test_review24e_output_under_file.py)
    report = tmp_path / "X.json"
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", "/proc/bnfold-repro", "--report", report,
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # still the verdict, not an I/O error
    [line] = error_lines(proc.stderr)
    assert line.startswith("bnfold: error: CANDIDATE does not match REFERENCE")
    assert any(ln.startswith("bnfold: warning: could not write the repro bundle") for ln in proc.stderr.splitlines())
    assert json.loads(report.read_text())["verification"]["repro_dir"] is None


# --------------------------------------------------------------------------- fold


def test_failing_fold_writes_a_bundle_with_the_models(pair: dict[str, Path], tmp_path: Path) -> None:
    """fold with zero tolerance and no noise floor fails on float rounding; its models and inputs go into the bundle
    and the bundle's command reproduces the failure from them."""
    out = tmp_path / "out" / "folded.onnx"
    proc = run_cli("fold", pair["ref"], "-o", out, "--atol", "0", "--rtol", "0", "--no-noise-floor",
                   cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert not out.exists()
    bundle = tmp_path / "bnfold-repro"
    meta = json.loads((bundle / "repro.json").read_text(encoding="utf-8"))
    assert meta["reference"] == str((bundle / "reference.onnx").resolve())
    assert meta["candidate"] == str((bundle / "candidate.onnx").resolve())
    ops = [n.op_type for n in onnx.load(bundle / "candidate.onnx").graph.node]
    assert "BatchNormalization" not in ops
    assert [n.op_type for n in onnx.load(bundle / "reference.onnx").graph.node].count("BatchNormalization") == 2
    # fold's inputs (standard normal) are not what verify's --seed draws: they travel as inputs.npz
    assert meta["inputs_npz"] == "inputs.npz"
    with np.load(bundle / "inputs.npz") as z:
        assert z["x"].shape == (4, 3, 6, 6)  # --verify-samples 4
        _, x0 = read_pb(bundle / "test_data_set_0" / "input_0.pb")
        np.testing.assert_array_equal(z["x"][:1], x0)
    assert "--atol=0.0" in meta["command"] and "--rtol=0.0" in meta["command"]
    again = rerun(meta["command"], tmp_path)
    assert again.returncode == 1, (again.stdout, again.stderr)
    m = re.search(r"max abs ([0-9.e+-]+)", again.stdout)
    m0 = re.search(r"max abs ([0-9.e+-]+)", proc.stdout)
    assert m and m0 and m.group(1) == m0.group(1)  # the same comparison, the same figures


def test_failing_fold_with_report_and_no_repro(pair: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "fold.json"
    proc = run_cli("fold", pair["ref"], "-o", tmp_path / "f.onnx", "--atol", "0", "--rtol", "0", "--report", report,
                   "--no-noise-floor", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "fold.repro" / "repro.json").is_file()
    assert json.loads(report.read_text())["verification"]["repro_dir"] == str(tmp_path / "fold.repro")
    proc = run_cli("fold", pair["ref"], "-o", tmp_path / "g.onnx", "--atol", "0", "--rtol", "0", "--no-repro",
                   "--no-noise-floor", cwd=tmp_path / "fold.repro")
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "fold.repro" / "bnfold-repro").exists()


def test_passing_fold_writes_none(pair: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("fold", pair["ref"], "-o", "f.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]


# --------------------------------------------------------------------------- the library


def test_the_library_writes_no_bundle_unless_told(pair: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from bnfold.api import verify
    from bnfold.verification.config import VerifyConfig

    monkeypatch.chdir(tmp_path)
    res = verify(pair["ref"], pair["bad"])
    assert not res.passed and res.repro_dir is None
    assert list(tmp_path.iterdir()) == []
    res = verify(pair["ref"], pair["bad"], config=VerifyConfig(repro_dir=str(tmp_path / "b")))
    assert res.repro_dir == str(tmp_path / "b") and (tmp_path / "b" / "repro.json").is_file()


def test_locations_and_bundle_detection(tmp_path: Path) -> None:
    from bnfold.verification.repro_location import default_location, is_bundle, replaceable

    assert default_location(None) == Path("bnfold-repro")
    assert default_location(Path("out/verify.json")) == Path("out/verify.repro")
    assert default_location("report") == Path("report.repro")
    assert replaceable(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert replaceable(empty) and not is_bundle(empty)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "repro.json").write_text("not json")
    assert not replaceable(foreign)
    # a repro.json with a command but without bnfold's marker is not enough (issue 14, F4):
    # see tests/test_verification_repro_location.py for what a bundle is
    (foreign / "repro.json").write_text(json.dumps({"command": "bnfold verify a b"}))
    assert not is_bundle(foreign) and not replaceable(foreign)
    (tmp_path / "file").write_text("x")
    assert not replaceable(tmp_path / "file")
    link = tmp_path / "link"
    link.symlink_to(foreign)
    assert not replaceable(link) and not is_bundle(link)


# --------------------------------------------------------------------------- documentation


@pytest.mark.parametrize("command", ["fold", "verify", "inspect"])
def test_every_help_flag_is_in_the_readme(command: str) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", proc.stdout))
    if command != "inspect":
        assert "--no-repro" in flags and "--repro-dir" in flags
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = sorted(f for f in flags if f"`{f}" not in readme)
    assert not missing, f"flags of 'bnfold {command} --help' not documented in README.md: {missing}"
