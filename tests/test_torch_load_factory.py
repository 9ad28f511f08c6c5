"""--model-factory code that calls sys.exit (on import or when called) is bad input (exit 3, one
line naming the factory), never bnfold's own exit code; nothing is written."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

pytest.importorskip("torch")

GOOD = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
"""


@pytest.mark.parametrize("code", [0, 1, 4])
@pytest.mark.parametrize("where", ["call", "import"])
def test_a_factory_that_exits_is_exit_3(tmp_path: Path, where: str, code: int) -> None:
    name = f"fac_{uuid.uuid4().hex[:8]}"  # a fresh module name: nothing cached from another test
    body = GOOD + (f"\nimport sys\nsys.exit({code})\n" if where == "import" else
                   f"\ndef leave():\n    import sys\n    sys.exit({code})\n")
    (tmp_path / f"{name}.py").write_text(body, encoding="utf-8")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    attr = "build" if where == "import" else "leave"
    proc = run_cli("fold", "--model-factory", f"{name}:{attr}", "--data", "calib.npy", "-o", "out.onnx",
                   cwd=tmp_path)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: ") and f"sys.exit({code})" in lines[0]
    assert name in lines[0]
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == {f"{name}.py", "calib.npy"}  # nothing written
