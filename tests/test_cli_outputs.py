"""Outputs that name something other than a regular file (a device, a FIFO, a directory) are
refused before any work (CLI: exit 2; library: BadInputError), and left as they were: bnfold's
atomic rename would otherwise replace them by a regular file (as root, even /dev/null)."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from cli_run import run_cli

import bnfold

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MODEL = "unfoldable.onnx"


def _special(tmp_path: Path, kind: str) -> Path:
    """A FIFO, a character device (the null device's numbers, made in tmp_path: root only) or a
    directory in ``tmp_path``; never the system's own /dev/null."""
    path = tmp_path / f"target-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    else:
        path.mkdir()
    return path


def _unchanged(path: Path, kind: str) -> bool:
    mode = os.lstat(path).st_mode
    return {"fifo": stat.S_ISFIFO, "chardev": stat.S_ISCHR, "dir": stat.S_ISDIR}[kind](mode)


KINDS = ["fifo", "chardev", "dir"]
FOLD_OPTIONS = ["-o", "--frozen-output", "--report", "--junit-xml", "--summary-md", "--html"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", FOLD_OPTIONS)
def test_fold_refuses_a_special_output(tmp_path: Path, option: str, kind: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model = work / MODEL
    shutil.copyfile(SAMPLES / MODEL, model)
    target = _special(tmp_path, kind)
    args = ["fold", model, "-o", work / "out.onnx"] if option != "-o" else ["fold", model]
    proc = run_cli(*args, option, target, "--no-repro", cwd=work)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    error = proc.stderr.strip().splitlines()[-1]  # click's usage error: "Error: Invalid value for ..."
    assert error.startswith("Error: Invalid value for") and str(target.name) in error
    assert ("is a directory" if kind == "dir" else "not a regular file") in error
    assert _unchanged(target, kind)
    assert sorted(os.listdir(work)) == [MODEL]  # nothing written, not even the other outputs


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
@pytest.mark.parametrize("option", ["--report", "--junit-xml", "--summary-md", "--html", "--repro-dir"])
def test_verify_refuses_a_special_output(tmp_path: Path, option: str, kind: str) -> None:
    ref = tmp_path / MODEL
    shutil.copyfile(SAMPLES / MODEL, ref)
    target = _special(tmp_path, kind)
    proc = run_cli("verify", ref, ref, option, target, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert _unchanged(target, kind)


def test_a_link_to_a_regular_file_is_still_an_output(tmp_path: Path) -> None:
    """A symbolic link to a regular file is judged by its target (a file), so it stays a valid
    output; the atomic write replaces the link itself and leaves the file it pointed to alone."""
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    proc = run_cli("fold", SAMPLES / MODEL, "-o", tmp_path / "o.onnx", "--report", link, "--no-repro",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert real.read_text() == "{}" and not link.is_symlink() and '"kind": "fold"' in link.read_text()


@pytest.mark.parametrize("what", ["output", "frozen_output"])
def test_library_fold_refuses_a_fifo_before_any_work(tmp_path: Path, what: str) -> None:
    target = _special(tmp_path, "fifo")
    kwargs = {"output": tmp_path / "o.onnx", what: target}
    with pytest.raises(bnfold.BadInputError, match=f"{what} .* is a FIFO, not a regular file"):
        bnfold.fold(SAMPLES / MODEL, **kwargs)
    assert _unchanged(target, "fifo") and not (tmp_path / "o.onnx").exists()
