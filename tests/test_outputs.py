"""bnfold/outputs.py: outputs staged beside their targets, moved into place together on commit,
nothing on an error; leftovers of killed runs swept only when provably bnfold's (issue 14,
points 4, 7 and 10)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnfold.errors import BadInputError
from bnfold.outputs import MARKER, Outputs, sweep_leftovers


def _stages(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".bnfold-"))


def test_nothing_reaches_a_target_before_commit(tmp_path: Path) -> None:
    a, b = tmp_path / "one" / "a.txt", tmp_path / "two" / "b.txt"
    with Outputs() as outputs:
        outputs.write_text(a, "A\n")
        outputs.write_text(b, "B\n")
        assert not a.exists() and not b.exists()
        for folder in (a.parent, b.parent):
            [stage] = _stages(folder)
            assert (folder / stage / MARKER).is_file()
        assert sorted(outputs.commit()) == sorted([a, b])
        assert a.read_text() == "A\n" and b.read_text() == "B\n"
    assert _stages(a.parent) == [] and _stages(b.parent) == []


def test_leaving_without_commit_keeps_the_old_files(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with Outputs() as outputs:
            outputs.write_text(target, "new")
            outputs.write_text(tmp_path / "new.txt", "x")
            raise RuntimeError("the run failed after staging")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_a_failed_move_undoes_the_moves_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, third = tmp_path / "m.onnx", tmp_path / "frozen.onnx", tmp_path / "report.json"
    first.write_text("old model")
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == third:
            raise OSError(28, "No space left on device")
        real(src, dst)

    with Outputs() as outputs:
        for path in (first, second, third):
            outputs.write_text(path, f"new {path.name}")
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(BadInputError, match=f"cannot write {third}: No space left on device; nothing was written"):
            outputs.commit()
        monkeypatch.setattr(os, "replace", real)
    assert first.read_text() == "old model"  # restored from its hard link
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # the new frozen model was taken back, no leftovers


def test_a_symlink_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("not bnfold's")
    link = tmp_path / "out" / "report.json"
    link.parent.mkdir()
    link.symlink_to(victim)
    with Outputs() as outputs:
        outputs.write_text(link, "{}")
        outputs.commit()
    assert not link.is_symlink() and link.read_text() == "{}"
    assert victim.read_text() == "not bnfold's"


def test_a_long_file_name_fits(tmp_path: Path) -> None:
    target = tmp_path / ("r" * 250 + ".json")  # 255 bytes: the longest name the file system takes
    with Outputs() as outputs:
        outputs.write_text(target, "{}")
        outputs.commit()
    assert target.read_text() == "{}" and os.listdir(tmp_path) == [target.name]


def test_an_unwritable_folder_names_the_target(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder would be")
    target = blocker / "r.json"
    with Outputs() as outputs, pytest.raises(BadInputError) as err:
        outputs.write_text(target, "{}")
    assert str(err.value).startswith(f"cannot write {target}: {blocker} is not a folder bnfold can write in")
    assert ".bnfold-" not in str(err.value)


# ---- leftovers of killed runs -------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bnfold.outputs import Outputs
    outputs = Outputs()
    staged = outputs.path_for(Path(sys.argv[1]) / "big.onnx")
    staged.write_bytes(b"x" * 1000)  # as if half of a model were written
    print(staged.parent.name, flush=True)
    time.sleep(60)
""")


def _holder(folder: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    name = proc.stdout.readline().strip()
    assert name.startswith(".bnfold-"), name
    return proc, name


def test_a_later_run_sweeps_the_folder_of_a_killed_run(tmp_path: Path) -> None:
    proc, name = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _stages(tmp_path) == [name]  # SIGKILL runs no cleanup: the staged half-model stays
    with Outputs() as outputs:
        outputs.write_text(tmp_path / "r.json", "{}")
        assert name not in _stages(tmp_path)
        outputs.commit()
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_the_folder_of_a_live_run_is_kept(tmp_path: Path) -> None:
    proc, name = _holder(tmp_path)
    try:
        with Outputs() as outputs:
            outputs.write_text(tmp_path / "r.json", "{}")
            outputs.commit()
        assert _stages(tmp_path) == [name] and (tmp_path / name / "o1.onnx").stat().st_size == 1000
    finally:
        proc.kill()
        proc.wait()


def test_only_provably_abandoned_folders_are_swept(tmp_path: Path) -> None:
    """Swept: the bnfold name, a real folder, the marker, nobody holding its lock. Kept: no marker
    (even empty), a longer or shorter name, a link to a folder that has a marker."""
    def folder(name: str, marker: bool, content: bool = True) -> Path:
        path = tmp_path / name
        path.mkdir()
        if marker:
            (path / MARKER).write_text("")
        if content:
            (path / "data").write_text("someone's")
        return path

    ours = folder(".bnfold-abcd1234", marker=True)
    kept = [folder(".bnfold-nomarker", marker=False), folder(".bnfold-empty___", marker=False, content=False),
            folder(".bnfold-toolong123", marker=True), folder(".bnfold-short", marker=True),
            folder("bnfold-abcd1234", marker=True)]
    target = folder("real-target", marker=True)
    link = tmp_path / ".bnfold-linklink"
    link.symlink_to(target)
    assert sweep_leftovers(tmp_path) == [ours]
    assert not ours.exists()
    for path in [*kept, target]:
        assert path.is_dir() and (path / "data").exists() == (path.name != ".bnfold-empty___")
    assert link.is_symlink() and (target / MARKER).exists()


# ---- concurrent commits into one folder ---------------------------------------------------------
def test_concurrent_writers_of_one_path_end_with_one_complete_file(tmp_path: Path) -> None:
    """Each writer stages, then commits under the folder lock; the data files of others are never
    deleted while their model is in place (the cleanup of point 4 runs under the same lock)."""
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        import numpy as np, onnx
        from onnx import helper, numpy_helper
        from bnfold.onnx.io import save_onnx
        k = int(sys.argv[2])
        w = numpy_helper.from_array(np.full((64, 64), k, np.float32), "w")
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        time.sleep(float(sys.argv[3]))
        for _ in range(5):
            save_onnx(model, Path(sys.argv[1]), external_data=True)
    """)
    out = tmp_path / "o.onnx"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(k), str(0.5 - 0.01 * k)])
             for k in (1, 2, 3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    import numpy as np
    import onnx
    from onnx import numpy_helper

    back = onnx.load(out)
    value = numpy_helper.to_array(back.graph.initializer[0])
    assert value.shape == (64, 64) and len(np.unique(value)) == 1 and value[0, 0] in (1, 2, 3)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == "o.onnx" and names[1].startswith("o.onnx."), names
