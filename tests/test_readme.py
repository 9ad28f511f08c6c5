"""Every Python example in README.md runs as written (in a scratch folder that holds the samples)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((f"README.md:{line}", m.group(1)))
    return out


EXAMPLES = _examples()


def test_the_readme_has_python_examples() -> None:
    assert len(EXAMPLES) >= 2  # the ONNX API and the PyTorch API


@pytest.mark.parametrize("where,code", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_readme_example_runs(where: str, code: str, tmp_path: Path) -> None:
    if "torch" in code:
        pytest.importorskip("torch")
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    (tmp_path / "out").mkdir()
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{where} printed nothing"  # every example prints what it shows
