"""Hostile review 25c: $GITHUB_STEP_SUMMARY naming the input model or one of its data files. Before,
the Markdown summary was appended to it (exit 0, the input changed); docs/security.md: an output
never replaces the input model or its data. Now exit 3 before any work, the input unchanged."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli
from external_models import conv_bn_external


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", ["model", "data"])
@pytest.mark.parametrize("command", ["fold", "verify"])
def test_the_step_summary_never_appends_to_an_input(tmp_path: Path, which: str, command: str) -> None:
    model = conv_bn_external(tmp_path / "in")
    target = model if which == "model" else model.parent / "m.onnx.data"
    before = _digest(target)
    args = ["fold", model, "-o", tmp_path / "o.onnx"] if command == "fold" else ["verify", model, model]
    proc = run_cli(*args, env={"GITHUB_STEP_SUMMARY": str(target)})
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    [line] = proc.stderr.strip().splitlines()
    assert "$GITHUB_STEP_SUMMARY" in line and "never changes its input" in line, line
    assert _digest(target) == before
    assert not (tmp_path / "o.onnx").exists()


def test_the_step_summary_never_appends_to_a_file_of_the_data_folder(tmp_path: Path) -> None:
    model = conv_bn_external(tmp_path / "in")
    data = tmp_path / "data"
    data.mkdir()
    array = data / "a.npy"
    np.save(array, np.zeros((2, 3, 8, 8), np.float32))
    before = _digest(array)
    proc = run_cli("fold", model, "-o", tmp_path / "o.onnx", "--data", data, env={"GITHUB_STEP_SUMMARY": str(array)})
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "never changes its input" in proc.stderr and _digest(array) == before
