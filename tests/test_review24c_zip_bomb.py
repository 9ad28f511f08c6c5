"""review24c: a .pt2 (or --weights, or TorchScript) zip whose member is deflated zeros (2 MB on
disk, 2 GiB declared) was read whole by the archive checks before anything looked at its size:
14 s and 4.4 GB peak RSS for a 2 MB file, then a confusing 'needs more than weights_only' line.
torch's writers store members uncompressed, so a member set that inflates to >100x the bytes it is
stored in (and over 64 MiB) is refused from the zip's directory: exit 3, one line, nothing read."""
from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

torch = pytest.importorskip("torch")

FACTORY = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
"""


def _bombed(src: Path, dst: Path, member: str, size: int = 96 << 20) -> None:
    """``src`` with the member whose name ends in ``member`` replaced by ``size`` deflated zeros."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(member):
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(zi, "w", force_zip64=True) as fh:
                    block = b"\0" * (1 << 22)
                    for _ in range(size // len(block)):
                        fh.write(block)
            else:
                zout.writestr(info, zin.read(info))


def _one_line_bomb(proc: object, tmp_path: Path, before: set[str]) -> None:
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    lines = proc.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: ") and "zip bomb" in lines[0], lines
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == before


def test_pt2_zip_bomb_is_refused_from_the_directory(tmp_path: Path) -> None:
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.export.save(torch.export.export(m, (torch.randn(2, 3, 8, 8),)), tmp_path / "good.pt2")
    _bombed(tmp_path / "good.pt2", tmp_path / "bomb.pt2", "data/sample_inputs/model.pt")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    before = set(os.listdir(tmp_path))
    proc = run_cli("fold", "bomb.pt2", "--data", "calib.npy", "-o", "out.pt2", "--no-verify", cwd=tmp_path)
    _one_line_bomb(proc, tmp_path, before)
    proc = run_cli("fold", "good.pt2", "--data", "calib.npy", "-o", "out.pt2", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # an honest archive still loads


def test_weights_zip_bomb_is_refused(tmp_path: Path) -> None:
    name = f"fac_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY, encoding="utf-8")
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(m.state_dict(), tmp_path / "good.pt")
    _bombed(tmp_path / "good.pt", tmp_path / "w.pt", "data.pkl")
    (tmp_path / "good.pt").unlink()
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    before = set(os.listdir(tmp_path))
    proc = run_cli("fold", "--model-factory", f"{name}:build", "--weights", "w.pt", "--data", "calib.npy",
                   "-o", "out.pt2", "--no-verify", cwd=tmp_path)
    _one_line_bomb(proc, tmp_path, before)


def test_pt2_member_outside_the_archive_folder_names_the_reason(tmp_path: Path) -> None:
    """A .pt2 with a member '../../x' was refused with torch's 'Please check the warnings above for
    possible errors', and the warnings were muted: the line now carries torch's logged reason."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.export.save(torch.export.export(m, (torch.randn(2, 3, 8, 8),)), tmp_path / "good.pt2")
    with zipfile.ZipFile(tmp_path / "good.pt2") as zin, zipfile.ZipFile(tmp_path / "trav.pt2", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr("../../r24c_trav_x", b"x")
    (tmp_path / "good.pt2").unlink()
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    before = set(os.listdir(tmp_path))
    proc = run_cli("fold", "trav.pt2", "--data", "calib.npy", "-o", "out.pt2", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), lines
    assert "warnings above" not in lines[0] and "../../r24c_trav_x" in lines[0], lines
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == before
    assert not (tmp_path.parent.parent / "r24c_trav_x").exists()
