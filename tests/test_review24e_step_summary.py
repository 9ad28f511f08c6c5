"""review24e: ``$GITHUB_STEP_SUMMARY`` naming a missing folder or a directory made ``verify`` (and
``fold``) end with exit 3 and a bare ``No such file or directory: ...`` / ``Is a directory: ...``
line *after* the reports (and fold's model) were written, the verdict lost. It is checked before
any work now: exit 3, one line naming the variable and the fix, nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from cli_run import run_cli
from onnx import TensorProto, helper, numpy_helper


def _model(path: Path, k: float = 1.0) -> Path:
    kk = numpy_helper.from_array(np.array(k, np.float32), "k")
    g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [kk])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, path)
    return path


def _verify(tmp_path: Path, target: str):  # type: ignore[no-untyped-def]
    a = _model(tmp_path / "a.onnx")
    out = tmp_path / "out"
    return run_cli("verify", a, a, "--report", out / "r.json", "--summary-md", out / "s.md",
                   env={"GITHUB_STEP_SUMMARY": target}), out


def test_step_summary_in_a_missing_folder_is_bad_input_before_any_write(tmp_path: Path) -> None:
    res, out = _verify(tmp_path, str(tmp_path / "nope" / "summary.md"))
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "GITHUB_STEP_SUMMARY" in lines[0] and "does not exist" in lines[0], lines
    assert not out.exists()


def test_step_summary_naming_a_directory_is_bad_input_before_any_write(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    res, out = _verify(tmp_path, str(tmp_path / "d"))
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "GITHUB_STEP_SUMMARY" in lines[0] and "directory" in lines[0], lines
    assert not out.exists()


def test_step_summary_new_file_in_an_existing_folder_is_appended(tmp_path: Path) -> None:
    target = tmp_path / "summary.md"
    res, out = _verify(tmp_path, str(target))
    assert res.returncode == 0, res.stderr
    assert "bnfold verification" in target.read_text() and (out / "r.json").is_file()


def test_fold_checks_the_step_summary_before_writing_the_model(tmp_path: Path) -> None:
    a = _model(tmp_path / "a.onnx")
    res = run_cli("fold", a, "-o", tmp_path / "o" / "f.onnx", "--report", tmp_path / "o" / "r.json",
                  env={"GITHUB_STEP_SUMMARY": str(tmp_path / "nope" / "s.md")})
    assert res.returncode == 3, res.stderr
    assert "GITHUB_STEP_SUMMARY" in res.stderr and not (tmp_path / "o").exists()
    # nothing is appended without a verification (--no-verify, --dry-run): a broken variable is not in the way
    for extra in (["--no-verify"], ["--dry-run"]):
        done = run_cli("fold", a, "-o", tmp_path / "o2" / "f.onnx", *extra,
                       env={"GITHUB_STEP_SUMMARY": str(tmp_path / "nope" / "s.md")})
        assert done.returncode == 0, (extra, done.stderr)
        assert not (tmp_path / "nope").exists()
