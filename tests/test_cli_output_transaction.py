"""The outputs of one ``bnfold fold`` (model, --frozen-output, reports) are staged and moved into
place together: an error leaves none of them (issue 14 point 7); runs racing for one -o end with
one complete model and its data (point 4); odd output paths (point 10)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_run import child_env, run_cli
from external_models import conv_bn_external, run_on_fixed_input
from onnx import helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def test_an_unwritable_report_leaves_no_model(tmp_path: Path) -> None:
    """Before: the model was moved into place, then writing the report failed: exit 3 with the
    model written. Now every output is staged first; the report's folder fails, nothing moves."""
    model = conv_bn_external(tmp_path / "in")
    out, frozen = tmp_path / "out" / "f.onnx", tmp_path / "out" / "frozen.onnx"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the report's folder would be")
    proc = run_cli("fold", model, "-o", out, "--frozen-output", frozen, "--report", blocker / "r.json")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"bnfold: error: cannot write {blocker / 'r.json'}: {blocker} is not a folder"), line
    assert not out.exists() and not frozen.exists()
    assert not (tmp_path / "out").exists()  # the folder bnfold made for -o is gone again, staging and all


def test_a_failed_move_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last rename (the HTML report) fails: the model moved just before is taken back and
    the old model at OUTPUT is restored; no frozen output, no report."""
    model = conv_bn_external(tmp_path / "in")
    out = tmp_path / "out" / "f.onnx"
    assert run_cli("fold", model, "-o", out).returncode == 0
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    html = tmp_path / "out" / "r.html"
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == html:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    proc = run_cli("fold", conv_bn_external(tmp_path / "in2", seed=5), "-o", out, "--frozen-output",
                   tmp_path / "out" / "fr.onnx", "--html", html, "--report", tmp_path / "out" / "r.json")
    monkeypatch.setattr(os, "replace", real)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == f"bnfold: error: cannot write {html}: No space left on device; nothing was written"
    assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == before


def test_a_missing_provider_writes_nothing(tmp_path: Path) -> None:
    """Exit 4 is an error, not a verdict: no model, no --frozen-output, no report."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is available here")
    model = conv_bn_external(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("fold", model, "-o", out / "f.onnx", "--frozen-output", out / "fr.onnx", "--report",
                   out / "r.json", "--providers", "cuda", "--no-repro")
    assert proc.returncode == 4, proc.stderr
    assert not out.exists() or os.listdir(out) == []


def test_a_failed_verification_writes_the_frozen_model_and_reports_but_no_model(tmp_path: Path) -> None:
    """Exit 1 is a verdict: --frozen-output and the reports are written (to debug with), the
    folded model is not."""
    model = conv_bn_external(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("fold", model, "-o", out / "f.onnx", "--frozen-output", out / "fr.onnx", "--report",
                   out / "r.json", "--atol", "0", "--rtol", "0", "--no-noise-floor", "--no-repro")
    if proc.returncode == 0:
        pytest.skip("the fold happened to be bit-exact, so a zero tolerance passed")
    assert proc.returncode == 1, proc.stderr
    assert sorted(os.listdir(out)) == sorted(["fr.onnx", "r.json", *[n for n in os.listdir(out)
                                                                      if n.startswith("fr.onnx.")]])
    assert not (out / "f.onnx").exists()


def test_output_naming_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    model = SAMPLES / "unfoldable.onnx"
    for option in ("-o", "--frozen-output", "--report"):
        args = ["fold", model, "-o", tmp_path / "o.onnx"] if option != "-o" else ["fold", model]
        proc = run_cli(*args, option, f"{tmp_path / 'newdir'}/")
        assert proc.returncode == 2, (option, proc.stderr)
        assert "ends with a path separator, so it names a folder" in proc.stderr
        assert os.listdir(tmp_path) == []
    with pytest.raises(BadInputError, match="names a folder"):
        bnfold.fold(model, output=f"{tmp_path / 'newdir'}/")


def test_a_long_output_name_with_external_data(tmp_path: Path) -> None:
    """A 250-character name is valid; its data file would need 264 bytes, so its name is cut and
    hashed. Before: the temporary name was too long (exit 3, 'File name too long')."""
    model = conv_bn_external(tmp_path / "in")
    out = tmp_path / "out" / ("f" * 245 + ".onnx")
    for _ in range(2):  # the second write removes the first one's data file
        proc = run_cli("fold", model, "-o", out)
        assert proc.returncode == 0, proc.stderr
    names = os.listdir(out.parent)
    assert len(names) == 2 and out.name in names and all(len(n.encode()) <= 255 for n in names)
    np.testing.assert_allclose(run_on_fixed_input(out), run_on_fixed_input(model), rtol=1e-4, atol=1e-4)


def test_output_on_a_symlink_replaces_the_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"someone else's file")
    link = tmp_path / "out.onnx"
    link.symlink_to(victim)
    proc = run_cli("fold", SAMPLES / "unfoldable.onnx", "-o", link)
    assert proc.returncode == 0, proc.stderr
    assert not link.is_symlink() and onnx.load(link).graph.node
    assert victim.read_bytes() == b"someone else's file"


def test_the_library_never_overwrites_its_input(tmp_path: Path) -> None:
    model = conv_bn_external(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    for kw in ({"output": model}, {"output": tmp_path / "o.onnx", "frozen_output": model}):
        with pytest.raises(BadInputError, match="is the input model; bnfold never overwrites its input"):
            bnfold.fold(model, **kw)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_a_write_error_names_the_users_path(tmp_path: Path) -> None:
    proc = run_cli("fold", SAMPLES / "unfoldable.onnx", "-o", "/proc/bnfold-test.onnx")
    assert proc.returncode == 3
    [line] = proc.stderr.strip().splitlines()
    assert "cannot write /proc/bnfold-test.onnx" in line and ".bnfold-" not in line and "tmp" not in line, line


# ---- point 4: runs racing for one -o ------------------------------------------------------------
_SLOW_RENAMES = textwrap.dedent("""
    import os, time
    _replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith((".onnx", ".data")):
            time.sleep(float(os.environ["BNFOLD_TEST_RENAME_DELAY"]))
        return _replace(src, dst, *a, **k)
    os.replace = replace
""")


@pytest.mark.slow
def test_concurrent_folds_to_one_output_keep_a_complete_model(tmp_path: Path) -> None:
    """Three folds of an external-data model to one -o, each rename delayed (a sitecustomize in
    the children): before, a run's stale-file cleanup deleted the data file the model of another
    run pointed to (deterministic with this delay); now the end state is one model and its data."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_RENAMES)
    models = [conv_bn_external(tmp_path / f"in{k}", seed=k) for k in range(3)]
    out = tmp_path / "out" / "o.onnx"
    env = child_env({"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
                     "BNFOLD_TEST_RENAME_DELAY": "0.7"})
    procs = [subprocess.Popen([sys.executable, "-m", "bnfold.cli.main", "fold", m, "-o", out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in models]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    names = sorted(os.listdir(out.parent))
    assert len(names) == 2 and names[0] == "o.onnx", names
    got = run_on_fixed_input(out)
    assert any(np.allclose(got, run_on_fixed_input(m), rtol=1e-4, atol=1e-4) for m in models)


def test_a_verification_error_names_no_staged_path(tmp_path: Path) -> None:
    """A model onnxruntime refuses at verification (a Reshape no shape fits): the one-line error names
    the user's model (here the input itself is the reference) or 'the frozen model', never bnfold's
    staged copy in .bnfold-*/ (before: its temporary path, when the reference was a staged copy)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w"),
             *(numpy_helper.from_array(np.full(4, v, np.float32), n) for n, v in
               (("s", 2.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))),
             numpy_helper.from_array(np.array([7, -1], np.int64), "shp")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("Reshape", ["y", "shp"], ["z"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)], inits)
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    proc = run_cli("fold", model, "-o", tmp_path / "out" / "f.onnx")
    assert proc.returncode == 3, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert str(model) in line and ".bnfold-" not in line, line
    assert not (tmp_path / "out").exists()
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.normal(size=(4, 3, 4, 4)).astype(np.float32))
    proc = run_cli("fold", model, "-o", tmp_path / "out" / "f.onnx", "--data", data, "--recalibrate", "all")
    assert proc.returncode == 3, proc.stderr  # calibrated: the reference is a frozen copy bnfold wrote
    [line] = proc.stderr.strip().splitlines()
    assert ".bnfold-" not in line and "tmp" not in line.split(str(tmp_path))[-1], line
