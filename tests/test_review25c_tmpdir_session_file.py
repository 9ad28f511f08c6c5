"""Hostile review 25c: importing onnxruntime (1.32) writes its telemetry session file ``.ses`` into
``$TMPDIR``, following a symbolic link there. Before, ``bnfold inspect`` as root left ``$TMPDIR/.ses``
behind and overwrote the target of a ``.ses`` link planted there; docs/security.md: only
``bnfold-*`` folders, removed at the end. Now TMPDIR points at the run's private folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import child_env
from external_models import conv_bn_external


@pytest.mark.slow
def test_nothing_but_bnfolds_folders_lands_in_tmpdir(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("VICTIM")
    (tmp / ".ses").symlink_to(victim)
    model = conv_bn_external(tmp_path / "in")
    proc = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "fold", str(model), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, env=child_env({"TMPDIR": str(tmp)}), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "VICTIM"
    assert sorted(p.name for p in tmp.iterdir()) == [".ses"]  # the planted link only
