"""End-to-end tests of the ``bnfold`` command line.

Most tests run the CLI in this process (``cli_run.run_cli``: ``bnfold.cli.main.main(argv)`` with
stdout and stderr captured apart) on small models built here with onnx.helper; a few run
``cli.main.main`` with a stand-in library to reach paths a correct library never takes (an internal
error, a failed verification). The tests that prove process behaviour run ``python -m
bnfold.cli.main`` in a child process (``run_process``): the version on stdout with exit 0, exit 3
and exit 1 with one error line on stderr, a traceback under ``--debug``, ``--help`` importing no
heavy module in a fresh interpreter, the installed console script. Tests on the shipped sample
models skip while ``sample_models/`` lacks them.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from cli_run import run_cli, run_process
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"

FOLD_FLAGS = [
    "-o", "--output", "--data", "--batch-size", "--estimator", "--report", "--no-verify",
    "--dry-run", "--verify-samples", "--atol", "--rtol", "--debug", "--help",
]


# --------------------------------------------------------------------------- helpers


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def error_lines(stderr: str) -> list[str]:
    """stderr lines other than bnfold's own warnings."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("bnfold: warning:")]


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 3) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bnfold: error: "), proc.stderr
    return lines[0]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_params(prefix: str, c: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [
        _init(f"{prefix}_scale", rng.uniform(0.5, 1.5, c)),
        _init(f"{prefix}_bias", rng.normal(0, 0.1, c)),
        _init(f"{prefix}_mean", rng.normal(0, 0.1, c)),
        _init(f"{prefix}_var", rng.uniform(0.5, 1.5, c)),
    ]


def _bn(prefix: str, x: str, y: str, training: bool = False) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    if training:
        return helper.make_node(
            "BatchNormalization", inputs, [y, f"{prefix}_running_mean", f"{prefix}_running_var"],
            name=prefix, epsilon=1e-5, momentum=0.9, training_mode=1,
        )
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=1e-5)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_bn_model(path: Path, training: bool = False, channels: int = 4, seed: int = 0) -> Path:
    """images (N,3,8,8) -> Conv 'conv0' -> BN 'bn0' -> Relu -> out."""
    rng = np.random.default_rng(seed)
    c = channels
    nodes = [
        helper.make_node("Conv", ["images", "conv0_w", "conv0_b"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        _bn("bn0", "c0", "b0", training=training),
        helper.make_node("Relu", ["b0"], ["out"], name="relu0"),
    ]
    inits = [_init("conv0_w", rng.normal(0, 0.5, (c, 3, 3, 3))), _init("conv0_b", rng.normal(0, 0.1, c))]
    inits += _bn_params("bn0", c, rng)
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    return _save(graph, path)


def mixed_model(path: Path, seed: int = 1) -> Path:
    """Three inference BNs: 'bn_input' on the graph input, 'bn_fan' after a Conv whose output
    also feeds a Relu (PRODUCER_FANOUT), and 'bn_ok' after a plain Conv (foldable)."""
    rng = np.random.default_rng(seed)
    nodes = [
        _bn("bn_input", "images", "x0"),
        helper.make_node("Conv", ["x0", "conv1_w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        _bn("bn_fan", "c1", "y1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Add", ["y1", "r1"], ["a1"], name="add1"),
        helper.make_node("Conv", ["a1", "conv2_w", "conv2_b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        _bn("bn_ok", "c2", "out"),
    ]
    inits = [
        _init("conv1_w", rng.normal(0, 0.5, (4, 3, 3, 3))),
        _init("conv2_w", rng.normal(0, 0.5, (4, 4, 3, 3))),
        _init("conv2_b", rng.normal(0, 0.1, 4)),
    ]
    inits += _bn_params("bn_input", 3, rng) + _bn_params("bn_fan", 4, rng) + _bn_params("bn_ok", 4, rng)
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    return _save(graph, path)


def calib_npz(path: Path, key: str = "images", n: int = 20, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, **{key: rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32)})
    return path


def bn_ops(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]


def mentions_count(text: str, word: str, count: int) -> bool:
    """``text`` says ``count`` next to ``word`` ('1 folded', 'folded: 1', 'Folded 1 BN', ...)."""
    w = re.escape(word)
    return re.search(rf"\b{count}\b[^\n\d]{{0,30}}\b{w}|\b{w}\b[^\n\d]{{0,30}}\b{count}\b", text, re.I) is not None


@pytest.fixture
def inference_model(tmp_path: Path) -> Path:
    return conv_bn_model(tmp_path / "infer.onnx")


@pytest.fixture
def training_model(tmp_path: Path) -> Path:
    return conv_bn_model(tmp_path / "train.onnx", training=True)


# --------------------------------------------------------------------------- help, version, usage


def test_help_lists_every_option() -> None:
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    for word in ("fold", "inspect", "--version", "--debug", "Exit codes"):
        assert word in top.stdout
    fold = run_cli("fold", "--help")
    assert fold.returncode == 0, fold.stderr
    for flag in FOLD_FLAGS:
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", fold.stdout), flag
    assert "unbiased|pooled" in fold.stdout
    insp = run_cli("inspect", "--help")
    assert insp.returncode == 0, insp.stderr
    for flag in ("--json", "--debug", "--help"):
        assert flag in insp.stdout


def test_version() -> None:
    import bnfold

    proc = run_process("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"bnfold {bnfold.__version__}"


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from bnfold.cli.main import main\n"
        "rc = main(['fold', '--help'])\n"
        "heavy = sorted(m for m in ('onnxruntime', 'torch', 'onnx') if m in sys.modules)\n"
        "print('HEAVY', rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY 0 []" in proc.stdout, proc.stdout


def test_console_script_installed() -> None:
    exe = shutil.which("bnfold")
    if exe is None:
        pytest.skip("the bnfold console script is not on PATH (package not pip-installed here)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("bnfold ")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["fold", "{model}", "-o", "{out}", "--bogus"], id="unknown-option"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--data", "{data}", "--batch-size", "0"], id="batch-size-0"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--estimator", "foo"], id="estimator-foo"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--verify-samples", "0"], id="verify-samples-0"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--atol", "-1"], id="negative-atol"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--batch-size", "4"], id="batch-size-without-data"),
        pytest.param(["fold", "{model}"], id="missing-output"),
        pytest.param(["fold", "{model}", "-o", "{model}"], id="output-is-input"),
        pytest.param(["fold", "-o", "{out}"], id="missing-model"),
        pytest.param(["inspect"], id="inspect-missing-model"),
        pytest.param(["frobnicate"], id="unknown-command"),
    ],
)
def test_usage_errors_exit_2(args: list[str], tmp_path: Path, inference_model: Path) -> None:
    data = calib_npz(tmp_path / "calib.npz")
    out = tmp_path / "out" / "folded.onnx"
    before = snapshot(inference_model)
    argv = [a.format(model=inference_model, out=out, data=data) for a in args]
    proc = run_cli(*argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "Error:" in proc.stderr or "Usage:" in proc.stderr
    assert not out.exists() and not out.parent.exists()
    assert snapshot(inference_model) == before


@pytest.mark.parametrize(
    "args, hint",
    [
        pytest.param(["fold", "{model}", "-o", "{out}", "--report", "{model}"], "--report", id="report-is-model"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--data", "{data}", "--report", "{data}"], "--report",
                     id="report-is-data"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--report", "{out}"], "--report", id="report-is-output"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--frozen-output", "{frozen}", "--html", "{frozen}"],
                     "--html", id="html-is-frozen-output"),
        pytest.param(["fold", "{model}", "-o", "{out}", "--report", "{rep}", "--summary-md", "{rep}"],
                     "--summary-md", id="two-reports-one-file"),
        pytest.param(["verify", "{model}", "{model2}", "--junit-xml", "{model2}"], "--junit-xml",
                     id="verify-junit-is-candidate"),
        pytest.param(["verify", "{model}", "{model2}", "--report", "{model}"], "--report",
                     id="verify-report-is-reference"),
    ],
)
def test_no_output_may_overwrite_an_input_or_another_output(args: list[str], hint: str, tmp_path: Path,
                                                             inference_model: Path) -> None:
    """A report path is an output like -o: it may not be MODEL, the data, a verified model, or
    another output (exit 2, nothing written, the inputs untouched)."""
    data = calib_npz(tmp_path / "calib.npz")
    model2 = tmp_path / "copy.onnx"
    shutil.copy(inference_model, model2)
    out, frozen, rep = tmp_path / "out" / "folded.onnx", tmp_path / "out" / "frozen.onnx", tmp_path / "r" / "x.json"
    inputs = [inference_model, data, model2]
    before = [snapshot(p) for p in inputs]
    argv = [a.format(model=inference_model, model2=model2, out=out, data=data, frozen=frozen, rep=rep) for a in args]
    proc = run_cli(*argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and hint in proc.stderr, proc.stderr
    assert [snapshot(p) for p in inputs] == before
    assert not out.parent.exists() and not rep.parent.exists()


# --------------------------------------------------------------------------- bad input: exit 3


def test_missing_model_file(tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    for cmd in (["fold", tmp_path / "nope.onnx", "-o", out], ["inspect", tmp_path / "nope.onnx"]):
        line = assert_one_line_error(run_process(*cmd))
        assert "not found" in line and "nope.onnx" in line
    assert not out.exists()


def test_garbage_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xffthis is not an onnx model\x13\x37" * 10)
    before = snapshot(bad)
    out = tmp_path / "out" / "folded.onnx"
    assert_one_line_error(run_cli("fold", bad, "-o", out))
    assert_one_line_error(run_cli("inspect", bad))
    assert not out.exists() and not out.parent.exists()
    assert snapshot(bad) == before


def test_training_bn_without_data(tmp_path: Path, training_model: Path) -> None:
    before = snapshot(training_model)
    out = tmp_path / "folded.onnx"
    line = assert_one_line_error(run_cli("fold", training_model, "-o", out))
    assert "bn0" in line, line
    assert "--data" in line, line
    assert not out.exists()
    assert snapshot(training_model) == before


def test_data_file_missing_an_input(tmp_path: Path, training_model: Path) -> None:
    data = calib_npz(tmp_path / "wrong.npz", key="not_images")
    before = snapshot(training_model)
    out = tmp_path / "folded.onnx"
    report = tmp_path / "report.json"
    line = assert_one_line_error(run_cli("fold", training_model, "--data", data, "-o", out, "--report", report))
    assert "images" in line, line
    assert not out.exists() and not report.exists()
    assert snapshot(training_model) == before


def test_missing_data_file(tmp_path: Path, training_model: Path) -> None:
    out = tmp_path / "folded.onnx"
    line = assert_one_line_error(run_cli("fold", training_model, "--data", tmp_path / "nope.npz", "-o", out))
    assert "nope.npz" in line
    assert not out.exists()


@pytest.mark.parametrize("where", ["group", "subcommand"])
def test_debug_shows_traceback(tmp_path: Path, where: str) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not onnx at all")
    out = tmp_path / "folded.onnx"
    argv = ["--debug", "fold", bad, "-o", out] if where == "group" else ["fold", bad, "-o", out, "--debug"]
    proc = run_process(*argv)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("bnfold: error: ")
    assert not out.exists()


# --------------------------------------------------------------------------- successful runs


def test_fold_inference_model(tmp_path: Path, inference_model: Path) -> None:
    before = snapshot(inference_model)
    out = tmp_path / "deep" / "dir" / "folded.onnx"
    report = tmp_path / "reports" / "report.json"
    proc = run_cli("fold", inference_model, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.is_file() and bn_ops(out) == []
    onnx.checker.check_model(onnx.load(str(out)))
    doc = json.loads(report.read_text())
    assert isinstance(doc, dict) and doc
    assert mentions_count(proc.stdout, "folded", 1), proc.stdout
    assert str(out) in proc.stdout
    assert snapshot(inference_model) == before


def test_fold_training_model_with_data(tmp_path: Path, training_model: Path) -> None:
    data = calib_npz(tmp_path / "calib.npz")
    out = tmp_path / "folded.onnx"
    report = tmp_path / "report.json"
    proc = run_cli(
        "fold", training_model, "--data", data, "--batch-size", 4, "--estimator", "pooled",
        "--verify-samples", 2, "-o", out, "--report", report,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and bn_ops(out) == []
    json.loads(report.read_text())
    assert mentions_count(proc.stdout, "folded", 1), proc.stdout
    # no progress bar when stderr is not a terminal
    assert "\r" not in proc.stderr and "calibrating [" not in proc.stderr


def test_fold_no_verify(tmp_path: Path, inference_model: Path) -> None:
    out = tmp_path / "folded.onnx"
    proc = run_cli("fold", inference_model, "-o", out, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_dry_run_writes_nothing(tmp_path: Path, training_model: Path) -> None:
    data = calib_npz(tmp_path / "calib.npz")
    out = tmp_path / "out" / "folded.onnx"
    before = tree(tmp_path)
    proc = run_cli("fold", training_model, "--data", data, "-o", out, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert tree(tmp_path) == before
    assert "bn0" in proc.stdout
    proc = run_cli("fold", training_model, "--data", data, "--dry-run")  # -o is optional here
    assert proc.returncode == 0, proc.stderr
    assert tree(tmp_path) == before


def test_dry_run_writes_only_the_report(tmp_path: Path, inference_model: Path) -> None:
    out = tmp_path / "folded.onnx"
    report = tmp_path / "report.json"
    proc = run_cli("fold", inference_model, "-o", out, "--dry-run", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()
    json.loads(report.read_text())


def test_inspect_table_and_json(tmp_path: Path) -> None:
    model = mixed_model(tmp_path / "mixed.onnx")
    before = snapshot(model)
    table = run_cli("inspect", model)
    assert table.returncode == 0, table.stderr
    for name in ("bn_input", "bn_fan", "bn_ok", "inference", "PRODUCER_FANOUT"):
        assert name in table.stdout, (name, table.stdout)

    proc = run_cli("inspect", model, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"bn_input", "bn_fan", "bn_ok"}
    keys = {"name", "mode", "producer", "producer_op", "channels", "action", "target", "direction", "reason", "detail"}
    for row in rows.values():
        assert set(row) == keys
        assert row["mode"] == "inference"
    assert rows["bn_ok"]["action"] == "folded" and rows["bn_ok"]["target"] == "conv2"
    assert rows["bn_ok"]["producer"] == "conv2" and rows["bn_ok"]["producer_op"] == "Conv"
    assert rows["bn_fan"]["action"] == "frozen-kept" and rows["bn_fan"]["reason"] == "PRODUCER_FANOUT"
    assert rows["bn_input"]["action"] == "frozen-kept"
    assert rows["bn_input"]["producer"] is None
    assert rows["bn_input"]["reason"] in ("NO_PRODUCER", "PADDED_FORWARD_FOLD")
    assert snapshot(model) == before


def test_inspect_shows_training_mode(training_model: Path) -> None:
    proc = run_cli("inspect", training_model, "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["name"] == "bn0" and row["mode"] == "training" and row["producer"] == "conv0"


def test_fold_mixed_model_keeps_and_folds(tmp_path: Path) -> None:
    model = mixed_model(tmp_path / "mixed.onnx")
    out = tmp_path / "folded.onnx"
    proc = run_cli("fold", model, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(bn_ops(out)) == ["bn_fan", "bn_input"]
    assert mentions_count(proc.stdout, "folded", 1), proc.stdout


def test_verification_failure_exit_1(tmp_path: Path) -> None:
    model = conv_bn_model(tmp_path / "wide.onnx", channels=64, seed=5)
    out = tmp_path / "folded.onnx"
    report = tmp_path / "report.json"
    proc = run_process("fold", model, "-o", out, "--report", report, "--atol", 0, "--rtol", 0, "--no-noise-floor",
                       "--verify-samples", 4)
    if proc.returncode == 0:
        pytest.skip("folded and frozen outputs agree bit for bit; cannot provoke a verification failure")
    line = assert_one_line_error(proc, code=1)
    assert "verification" in line
    assert not out.exists()
    json.loads(report.read_text())


# --------------------------------------------------------------------------- shipped sample models


def _need(*names: str) -> list[Path]:
    paths = [SAMPLES / n for n in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"sample model files not built yet: {', '.join(missing)} (sample_models/)")
    return paths


def test_sample_resnet_train(tmp_path: Path) -> None:
    model, data = _need("resnet_train.onnx", "resnet_calib.npz")
    before = snapshot(model)
    out, report = tmp_path / "resnet_folded.onnx", tmp_path / "resnet_report.json"
    proc = run_cli("fold", model, "--data", data, "--batch-size", 16, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    json.loads(report.read_text())
    assert "folded" in proc.stdout.lower()
    assert snapshot(model) == before


def test_sample_unfoldable(tmp_path: Path) -> None:
    (model,) = _need("unfoldable.onnx")
    out = tmp_path / "unfoldable_folded.onnx"
    proc = run_cli("fold", model, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert bn_ops(out), "the unfoldable sample should keep at least one BN"
    rows = {r["name"]: r for r in json.loads(run_cli("inspect", model, "--json").stdout)}
    kept = [r for r in rows.values() if r["action"] == "frozen-kept"]
    assert kept and all(r["reason"] for r in kept)
    assert rows["bn_b_producer_fanout"]["reason"] == "PRODUCER_FANOUT"
    assert rows["bn_d_foldable"]["action"] == "folded" and rows["bn_d_foldable"]["target"] == "conv_c"
    assert sorted(bn_ops(out)) == sorted(r["name"] for r in kept)


def test_sample_trs(tmp_path: Path) -> None:
    model, data = _need("resnet_trs.onnx", "trs_calib.npz")
    out = tmp_path / "trs_folded.onnx"
    no_data = run_cli("fold", model, "-o", out)
    assert_one_line_error(no_data)
    # the TorchScript exporter baked batch 8 into this model: calibrate in batches of 8
    proc = run_cli("fold", model, "--data", data, "--batch-size", 8, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


# --------------------------------------------------------------------------- in-process: exit mapping


@pytest.fixture
def cli_main():
    from bnfold.cli import main as cli_main

    return cli_main


def _fake_report(verified: bool | None):
    import numpy as np

    from bnfold.records import Action, Mode
    from bnfold.run_records import BnRecord, ProviderRun, Report, VerifyResult
    from bnfold.verification.metrics import compute_metrics

    verification = None
    if verified is not None:
        ref = np.zeros(4, np.float32)
        out = compute_metrics("out", ref, ref + (0.0 if verified else 0.5), atol=1e-5, rtol=1e-4)
        run = ProviderRun("cpu", "ran", ("CPUExecutionProvider",), verified, (out,))
        verification = VerifyResult(passed=verified, samples=4, runs=(run,))
    return Report(
        input_path="m.onnx", output_path=None, input_sha256=None, output_sha256=None,
        estimator="unbiased", batch_size=None, calibrated=False,
        bns=[BnRecord("bn0", Mode.INFERENCE, Action.FOLDED, target="conv0", direction="backward")],
        verification=verification,
    )


def _install_fake(monkeypatch, cli_main, fold_impl, calls: dict) -> None:
    def fold(model, **kwargs):
        calls.update(kwargs)
        return fold_impl(model, **kwargs)

    monkeypatch.setattr(cli_main, "_api", lambda: SimpleNamespace(fold=fold, inspect=lambda m, **k: []))
    monkeypatch.setattr(cli_main, "_summary", lambda: SimpleNamespace(
        summary_text=lambda r: f"{r.folded} folded, {r.kept} kept", plan_table=lambda rows: "PLAN"))
    monkeypatch.setattr(cli_main, "to_json", lambda r: json.dumps({"folded": r.folded}))


def test_internal_error_is_one_line(monkeypatch, capsys, tmp_path: Path, cli_main) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")

    def boom(model, **kwargs):
        raise RuntimeError("boom\nsecond line")

    _install_fake(monkeypatch, cli_main, boom, {})
    rc = cli_main.main(["fold", str(model), "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 3
    assert err.strip() == "bnfold: internal error: RuntimeError: boom second line (rerun with --debug for the traceback)"

    rc = cli_main.main(["--debug", "fold", str(model), "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" in err and "RuntimeError: boom" in err


def test_verification_failure_maps_to_exit_1(monkeypatch, capsys, tmp_path: Path, cli_main) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    report = tmp_path / "r" / "report.json"
    calls: dict = {}
    _install_fake(monkeypatch, cli_main, lambda m, **k: SimpleNamespace(model=None, report=_fake_report(False), ok=False), calls)
    rc = cli_main.main(["fold", str(model), "-o", str(tmp_path / "o" / "o.onnx"), "--report", str(report)])
    captured = capsys.readouterr()
    assert rc == 1
    assert json.loads(report.read_text()) == {"folded": 1}
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: the folded model failed verification at output(s) out")
    assert "1 folded, 0 kept" in captured.out
    assert not (tmp_path / "o").exists(), "the output folder made for a model that was not written is removed"
    assert calls["progress"] is None  # stderr is not a terminal here


def test_options_reach_the_library(monkeypatch, capsys, tmp_path: Path, cli_main) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    calls: dict = {}
    _install_fake(monkeypatch, cli_main, lambda m, **k: SimpleNamespace(model=None, report=_fake_report(True), ok=True, rows=[]), calls)
    out = tmp_path / "o.onnx"
    rc = cli_main.main([
        "fold", str(model), "-o", str(out), "--data", str(data), "--batch-size", "7", "--estimator", "pooled",
        "--verify-samples", "3", "--atol", "0.01,logits:0.5", "--rtol", "0.02", "--providers", "cpu",
        "--check-error-stat", "quantile", "--quantile", "0.9",
    ])
    assert rc == 0, capsys.readouterr().err
    assert calls["output"] == out and calls["data"] == data and calls["batch_size"] == 7
    assert calls["estimator"] == "pooled" and calls["verify"] is True and calls["dry_run"] is False
    cfg = calls["verify_config"]
    assert calls["verify_samples"] == 3
    assert (cfg.atol, cfg.rtol) == ((0.01, {"logits": 0.5}), (0.02, {}))
    assert (cfg.providers, cfg.error_stat, cfg.quantile) == (("cpu",), "quantile", 0.9)
    capsys.readouterr()

    rc = cli_main.main(["fold", str(model), "--no-verify", "--dry-run"])
    assert rc == 0
    assert calls["verify"] is False and calls["dry_run"] is True and calls["output"] is None
    assert calls["batch_size"] is None and calls["data"] is None and calls["estimator"] == "unbiased"
    assert "PLAN" in capsys.readouterr().out


# --------------------------------------------------------------------------- progress bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    from bnfold.cli.progress import calibration_progress, make_progress

    assert make_progress(io.StringIO()) is None
    stream = _Tty()
    with calibration_progress(stream) as bar:
        assert bar is not None
        bar.min_interval = 0.0
        bar(12, 40)
        bar(40, 40)
    text = stream.getvalue()
    assert "\rcalibrating [######..............] 12/40 batches" in text
    assert "\rcalibrating [####################] 40/40 batches" in text
    assert text.endswith("\n") and text.count("\n") == 1
    stream = _Tty()
    with calibration_progress(stream) as bar:
        bar.min_interval = 0.0
        bar(3, 0)  # unknown total
    assert stream.getvalue() == "\rcalibrating batch 3\n"  # issue 17: a stream has no total


def test_verification_progress_bar_only_on_a_terminal() -> None:
    from bnfold.cli.progress import verification_progress

    with verification_progress(io.StringIO()) as bar:
        assert bar is None  # logs and pipes stay free of carriage returns
    stream = _Tty()
    with verification_progress(stream) as bar:
        assert bar is not None
        bar.min_interval = 0.0
        bar(4096, 16384)
        bar(16384, 16384)
    text = stream.getvalue()
    assert "\rverifying [#####...............] 4096/16384 model runs" in text
    assert text.endswith("16384/16384 model runs\n") and text.count("\n") == 1


# --------------------------------------------------------------------------- each command's help


def _help(command: str) -> str:
    proc = run_cli(command, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _exit_codes(text: str) -> list[str]:
    lines = text.split("Exit codes:")[1].strip().splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def test_verify_help_describes_only_what_verify_does() -> None:
    """Issue 15 point 5: verify's help described fold's calibration, --dry-run and 'fold writes the
    report, not the model'."""
    text = _help("verify")
    assert "fold:" not in text and "--dry-run" not in text and "calibrat" not in text
    assert "writes the report, not the model" not in text
    assert _exit_codes(text) == ["0", "1", "2", "3", "4"]
    assert "1  CANDIDATE does not match REFERENCE, or cannot run" in text


def test_inspect_help_lists_only_its_exit_codes() -> None:
    """inspect runs no model: no verification (exit 1) and no execution provider (exit 4)."""
    text = _help("inspect")
    assert _exit_codes(text) == ["0", "2", "3"]
    assert "verification" not in text and "provider" not in text


def test_fold_help_keeps_fold_words() -> None:
    text = _help("fold")
    assert "--dry-run" in text and "calibration" in text
    assert _exit_codes(text) == ["0", "1", "2", "3", "4"]
