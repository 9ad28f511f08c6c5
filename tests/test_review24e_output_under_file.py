"""review24e: ``--report f/r.json`` (or ``-o``, ``--repro-dir``) where ``f`` is a regular file ran
the whole verification first, then printed two lines (a repro-bundle warning and an exit-3 error);
``--repro-dir f/rep`` lost the bundle with a warning. Such a path is refused before any work now,
with the one exit-3 line the failed write gave: nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_run import run_cli
from test_review24e_step_summary import _model  # one Mul model for both files


@pytest.mark.parametrize("option", ["--report", "--junit-xml", "--html", "--repro-dir"])
def test_an_output_under_a_regular_file_is_bad_input_before_any_work(tmp_path: Path, option: str) -> None:
    a, b = _model(tmp_path / "a.onnx", 1.0), _model(tmp_path / "b.onnx", 2.0)
    (tmp_path / "f").write_text("x")
    res = run_cli("verify", a, b, option, tmp_path / "f" / "sub" / "out", cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "f is not a folder bnfold can write in" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "f"]


def test_fold_output_under_a_regular_file_is_bad_input(tmp_path: Path) -> None:
    a = _model(tmp_path / "a.onnx", 1.0)
    (tmp_path / "f").write_text("x")
    res = run_cli("fold", a, "-o", tmp_path / "f" / "o.onnx")
    assert res.returncode == 3 and "is not a folder bnfold can write in" in res.stderr, res.stderr
