"""Hostile review 25c: an output at a file inside the --data folder. Before, `fold --data DIR
--report DIR/a.npy` replaced the calibration array with the JSON report (exit 0), though
`--report FILE --data FILE` is refused; docs/security.md: bnfold never overwrites its input."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli
from external_models import conv_bn_external


@pytest.mark.parametrize("command", ["fold", "verify"])
def test_an_output_never_replaces_a_file_of_the_data_folder(tmp_path: Path, command: str) -> None:
    model = conv_bn_external(tmp_path / "in")
    data = tmp_path / "data"
    data.mkdir()
    array = data / "a.npy"
    np.save(array, np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32))
    before = hashlib.sha256(array.read_bytes()).hexdigest()
    args = ["fold", model, "-o", tmp_path / "o.onnx"] if command == "fold" else ["verify", model, model]
    proc = run_cli(*args, "--data", data, "--report", array)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "the folder read as the --data file" in proc.stderr and "never overwrites its input" in proc.stderr
    assert hashlib.sha256(array.read_bytes()).hexdigest() == before
    assert not (tmp_path / "o.onnx").exists()
