"""Findings of a hostile review of issue 14's output handling, each reproduced: outputs that would
replace the input's data (F2), two paths to one folder (F3), a signal during the final moves (F5),
rollback without hard links (F6), onnxruntime writing into $HOME (F8)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from cli_run import child_env, run_cli
from external_models import conv_bn_external, run_on_fixed_input

from bnfold.errors import BadInputError
from bnfold.outputs import Outputs


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- F2: the input's data files are inputs too -------------------------------------------------
@pytest.mark.parametrize("option", ["-o", "--frozen-output", "--report"])
def test_an_output_never_replaces_a_data_file_of_the_input(tmp_path: Path, option: str) -> None:
    model = conv_bn_external(tmp_path / "in")
    data = model.parent / "m.onnx.data"
    before = _digest(data)
    args = ["fold", model, "-o", tmp_path / "o.onnx"] if option != "-o" else ["fold", model]
    proc = run_cli(*args, option, data)
    assert proc.returncode == 3, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"{data} is a data file of the input model" in line and "never overwrites its input" in line, line
    assert _digest(data) == before and run_on_fixed_input(model).shape == (2, 32, 8, 8)


def test_a_verify_report_never_replaces_a_models_data_file(tmp_path: Path) -> None:
    model = conv_bn_external(tmp_path / "q")
    data = model.parent / "m.onnx.data"
    before = _digest(data)
    proc = run_cli("verify", model, model, "--report", data)
    assert proc.returncode == 3, proc.stderr
    assert "is a data file of REFERENCE" in proc.stderr and _digest(data) == before


def test_the_cleanup_keeps_the_data_file_a_renamed_earlier_output_uses(tmp_path: Path) -> None:
    """Fold to out.onnx, rename it to in.onnx (it still names out.onnx.<hex>.data), fold in.onnx to
    out.onnx again: before, the stale-data cleanup of out.onnx deleted in.onnx's data."""
    first = conv_bn_external(tmp_path / "src")
    work = tmp_path / "w"
    assert run_cli("fold", first, "-o", work / "out.onnx").returncode == 0
    (work / "out.onnx").rename(work / "in.onnx")
    expect = run_on_fixed_input(work / "in.onnx")
    proc = run_cli("fold", work / "in.onnx", "-o", work / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(run_on_fixed_input(work / "in.onnx"), expect)  # its data file is still there
    np.testing.assert_allclose(run_on_fixed_input(work / "out.onnx"), expect, rtol=1e-4, atol=1e-4)


def test_outputs_refuse_a_protected_target(tmp_path: Path) -> None:
    victim = tmp_path / "weights.bin"
    victim.write_bytes(b"input")
    with Outputs() as outputs:
        outputs.protect("a data file of the input model", victim)
        with pytest.raises(BadInputError, match="is a data file of the input model"):
            outputs.write_text(victim, "report")
    assert victim.read_bytes() == b"input"


# ---- F3: two paths to one folder ----------------------------------------------------------------
def test_two_paths_to_one_folder_do_not_deadlock(tmp_path: Path) -> None:
    """A bind mount gives one folder two real paths; locks are taken per (device, inode), once.
    Before: the run locked the folder twice and waited for itself forever."""
    model = conv_bn_external(tmp_path / "in")
    real, alias = tmp_path / "real", tmp_path / "alias"
    real.mkdir()
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(real), str(alias)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need root and a mount namespace that allows them")
    try:
        proc = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "fold", str(model), "-o", str(real / "x.onnx"),
                               "--report", str(alias / "r.json")], capture_output=True, text=True, timeout=120,
                              env=child_env())
        assert proc.returncode == 0, proc.stderr
        assert (real / "x.onnx").exists() and (real / "r.json").exists()
    finally:
        subprocess.run(["umount", str(alias)], capture_output=True)


# ---- F5: a signal during the final moves --------------------------------------------------------
_SLOW = textwrap.dedent("""
    import os, time
    _r = os.replace
    def replace(src, dst, *a, **k):
        out = _r(src, dst, *a, **k)
        if str(dst).endswith((".onnx", ".json", ".data")) and ".bnfold-" not in str(dst):
            open(os.environ["BNFOLD_TEST_MOVED"], "a").write(str(dst) + "\\n")
            time.sleep(1.0)
        return out
    os.replace = replace
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_moves_waits_until_all_are_in_place(tmp_path: Path, sig: int) -> None:
    """Each move into place is slowed down (1 s); the signal comes after the first one. Before: the
    model was new and the report old (or a data file orphaned). Now the moves finish, then the
    signal ends the run: every output new and consistent (the report names the model's sha256)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW)
    model = conv_bn_external(tmp_path / "in")
    out = tmp_path / "out"
    moved = tmp_path / "moved.txt"
    env = child_env({"PYTHONPATH": str(hook), "BNFOLD_TEST_MOVED": str(moved)})
    proc = subprocess.Popen([sys.executable, "-m", "bnfold.cli.main", "fold", str(model), "-o", str(out / "o.onnx"),
                             "--report", str(out / "r.json")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not moved.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 143), err
    report = json.loads((out / "r.json").read_text())
    assert report["output"]["sha256"] == _digest(out / "o.onnx")  # the report and the model of one run
    names = sorted(os.listdir(out))
    assert len(names) == 3 and names[:2] == ["o.onnx", "o.onnx." + names[1].split(".", 2)[2]], names
    run_on_fixed_input(out / "o.onnx")


# ---- F6: rollback where no hard link can be made -------------------------------------------------
def test_rollback_without_hard_links_restores_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, report = tmp_path / "o.onnx", tmp_path / "r.json"
    old.write_text("OLD MODEL")

    def no_link(*a: object, **k: object) -> None:
        raise OSError(1, "Operation not permitted")

    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == report:
            raise OSError(1, "Operation not permitted")
        real(src, dst)

    with Outputs() as outputs:
        outputs.write_text(old, "NEW MODEL")
        outputs.write_text(report, "{}")
        monkeypatch.setattr(os, "link", no_link)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(BadInputError, match="nothing was written"):
            outputs.commit()
        monkeypatch.setattr(os, "replace", real)
    assert old.read_text() == "OLD MODEL" and not report.exists()
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]


# ---- F8: onnxruntime's telemetry database -------------------------------------------------------
def test_the_command_writes_nothing_into_home(tmp_path: Path) -> None:
    """onnxruntime creates ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ when imported; the
    command points XDG_CACHE_HOME at a private folder it removes (cli/private_cache.py)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in child_env({"HOME": str(home)}).items() if k != "XDG_CACHE_HOME"}
    proc = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "fold", str(conv_bn_external(tmp_path / "in")), "-o",
                           str(tmp_path / "o.onnx")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(home.iterdir()) == []
    shutil.rmtree(home)
