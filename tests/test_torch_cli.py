"""``bnfold fold`` on PyTorch models: ExportedProgram, TorchScript, factory + state_dict, pickles.

The tests run the CLI in this process (``bnfold.cli.main.main(argv)``, the console script's entry
point, with the working directory, environment, warning filters and streams a fresh process
would have) on real torch models saved under a temporary folder, with the model classes in a
module written there (importable, as a user's own code on PYTHONPATH would be). A few run
``python -m bnfold.cli.main`` in a child process to prove what only a process shows: its exit
status and which stream each line goes to. The reference for "matches" is the frozen model
computed here with :func:`bnfold.torch.calibrate` on the same data and batch size.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 8

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        """Conv -> BN -> ReLU -> Conv (no bias) -> BN -> pool -> Linear -> BN1d."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 5)
            self.bn3 = nn.BatchNorm1d(5)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            h = torch.relu(self.bn2(self.conv2(h)))
            return self.bn3(self.fc(h.mean((2, 3))))


    class TwoInputs(nn.Module):
        """forward(x, y): two inputs fed by name from an .npz keyed x, y."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.proj = nn.Conv2d(2, 6, 1)
            self.bn_y = nn.BatchNorm2d(6)

        def forward(self, x, y):
            return torch.relu(self.bn(self.conv(x))) + self.bn_y(self.proj(y))


    class Untraceable(nn.Module):
        """Python control flow on a tensor value: torch.fx cannot trace it."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn(self.conv(x))
            if h.abs().sum() > 0:
                return torch.relu(h)
            return h


    class KwOnly(nn.Module):
        """forward(x, *, y): y may only be passed by name."""

        def __init__(self):
            super().__init__()
            self.a, self.bna = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b, self.bnb = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x, *, y):
            return self.bna(self.a(x)) + self.bnb(self.b(y))


    class Optional(nn.Module):
        """forward(x, mask=None, scale: float = 1.0): defaults the data may leave alone."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, mask=None, scale: float = 1.0):
            y = self.bn(self.conv(x))
            if mask is not None:
                y = y * mask
            return y * scale


    class VarKw(nn.Module):
        """forward(x, **kw): the data's 'bias' arrives through **kwargs."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, **kw):
            return self.bn(self.conv(x)) + kw["bias"]


    class Mistraced(nn.Module):
        """isinstance(x, Tensor) is False for an fx proxy: the trace silently drops the residual."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if isinstance(x, torch.Tensor):
                y = y + x
            return y


    class _Double(torch.autograd.Function):
        """x * 2 in PyTorch, but exported to ONNX as Identity: an export that diverges."""

        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def symbolic(g, x):
            return g.op("Identity", x)


    class BadExport(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return _Double.apply(self.bn(self.conv(x)))


    def build_net():
        torch.manual_seed(1)
        return Net()


    def build_two():
        torch.manual_seed(2)
        return TwoInputs()


    def build_untraceable():
        torch.manual_seed(3)
        return Untraceable()


    def build_kwonly():
        torch.manual_seed(6)
        return KwOnly()


    def build_optional():
        torch.manual_seed(7)
        return Optional()


    def build_varkw():
        torch.manual_seed(8)
        return VarKw()


    def build_mistraced():
        torch.manual_seed(5)
        return Mistraced()


    def build_bad_export():
        torch.manual_seed(4)
        return BadExport()
''')


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    """The model module, saved models and calibration data, built once."""
    root = tmp_path_factory.mktemp("torch_cli")
    (root / "tmodels.py").write_text(MODELS, encoding="utf-8")
    sys.path.insert(0, str(root))
    try:
        import importlib

        tm = importlib.import_module("tmodels")
    finally:
        sys.path.remove(str(root))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 3, 8, 8)).astype(np.float32) * 2 + 0.5
    np.save(root / "calib.npy", x)
    y = rng.standard_normal((24, 2, 8, 8)).astype(np.float32)
    np.savez(root / "xy.npz", x=x, y=y)

    net = randomise_bn(tm.build_net(), 10).train()
    ex = torch.from_numpy(x[:4])
    ep = torch.export.export(net, (ex,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, root / "net.pt2")
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; users still have archives
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), root / "net.ts")
    torch.save(net, root / "whole.pt")
    two = randomise_bn(tm.build_two(), 11)
    torch.save(two.state_dict(), root / "two_sd.pt")
    partial = {k: v for k, v in two.state_dict().items() if not k.startswith("bn_y.")}
    torch.save(partial, root / "two_partial.pt")
    return {"root": root, "tm": tm, "net": net, "two": two, "x": x, "y": y}


def process_env(work: dict) -> dict[str, str]:
    """A child's environment: the models' folder on PYTHONPATH, no $GITHUB_STEP_SUMMARY."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(work["root"]), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("GITHUB_STEP_SUMMARY", None)
    return env


def run_process(work: dict, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m bnfold.cli.main ARGS`` in a child process (for what only a process shows)."""
    return subprocess.run([sys.executable, "-m", "bnfold.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=work["root"], env=process_env(work), timeout=timeout)


@contextlib.contextmanager
def fresh_process_state(work: dict) -> Iterator[None]:
    """What a child would see: the models' folder as working directory and on sys.path, no
    $GITHUB_STEP_SUMMARY, Python's default warning filters (pytest turns DeprecationWarnings on)."""
    cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(work["root"])
    os.environ.pop("GITHUB_STEP_SUMMARY", None)
    sys.path.insert(0, str(work["root"]))
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            yield
    finally:
        sys.path.remove(str(work["root"]))
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)


def run_cli(work: dict, *args: object) -> subprocess.CompletedProcess:
    """``bnfold ARGS`` in this process: exit code, stdout and stderr as a CompletedProcess."""
    from bnfold.cli.main import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with fresh_process_state(work), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(["bnfold", *argv], rc, out.getvalue(), err.getvalue())


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("bnfold: warning:")]


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), proc.stderr
    return lines[0]


def frozen_reference(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    """The frozen model the CLI calibrates: same data, batches of BATCH, Algorithm 2."""
    from bnfold.torch import calibrate

    n = next(iter(arrays.values())).shape[0]
    batches = [{k: torch.from_numpy(v[i:i + BATCH]) for k, v in arrays.items()} for i in range(0, n, BATCH)]
    frozen, _ = calibrate(model, batches)
    return frozen


def eager(model: nn.Module, **inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def positional(model: nn.Module, *arrays: np.ndarray) -> np.ndarray:
    """A written model is called like the original: positionally."""
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in arrays)).numpy()


def run_onnx(path: Path, **inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def onnx_ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def validate_report(path: Path) -> dict:
    report = json.loads(path.read_text(encoding="utf-8"))
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "docs" / "report-schema.json").read_text(encoding="utf-8"))
    jsonschema.validate(report, schema)
    return report


# --------------------------------------------------------------------------- ExportedProgram


def test_pt2_to_onnx(work: dict) -> None:
    root = work["root"]
    out, rep = root / "o1" / "net.onnx", root / "o1" / "report.json"
    proc = run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "--batch-size", BATCH, "-o", out,
                   "--report", rep, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Export check" in proc.stdout and "PASSED" in proc.stdout
    assert "BatchNormalization" not in onnx_ops(out)
    frozen = frozen_reference(work["net"], {"x": work["x"]})
    x = work["x"][:6]
    np.testing.assert_allclose(run_onnx(out, x=x), eager(frozen, x=x), atol=1e-4, rtol=1e-4)
    report = validate_report(rep)
    assert report["counts"] == {"bn": 3, "folded": 3, "frozen_kept": 0}
    assert report["input"]["path"] == "net.pt2" and report["output"]["path"] == str(out)
    check = report["extra"]["export_check"]
    assert check["passed"] is True and check["max_abs"] < 1e-4 and set(check) >= {"max_abs", "max_rel", "passed"}
    assert report["extra"]["source"]["kind"] == "exported_program"
    assert report["verification"]["passed"] is True


def test_pt2_to_pt2(work: dict) -> None:
    root = work["root"]
    out, rep = root / "o2" / "net_folded.pt2", root / "o2" / "report.json"
    proc = run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "--batch-size", BATCH, "-o", out,
                   "--report", rep)
    assert proc.returncode == 0, proc.stderr
    folded = torch.export.load(str(out)).module()
    targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets), targets
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    frozen = frozen_reference(work["net"], {"x": work["x"]})
    for n in (1, 5):  # a dynamic batch axis: other batch sizes than the example's
        x = work["x"][:n]
        np.testing.assert_allclose(positional(folded, x), eager(frozen, x=x), atol=1e-4, rtol=1e-4)
    report = validate_report(rep)
    assert report["counts"]["folded"] == 3 and report["verification"] is None
    assert report["extra"]["torch_check"]["passed"] is True
    assert report["extra"]["export_check"]["passed"] is True
    assert {b["name"] for b in report["bns"]} == {"bn", "bn2", "bn3"}
    assert all(b["mode_before"] == "training" and b["stats"] is not None for b in report["bns"])


def test_pt2_after_run_decompositions_folds_linear_too(work: dict) -> None:
    """After ``run_decompositions`` a Linear is ``addmm(b, x, permute(w))`` (``mm`` without bias):
    bnfold reads it as ``F.linear`` again, so the BatchNorm1d after it folds like the others."""
    root = work["root"]
    net = randomise_bn(work["tm"].build_net(), 12)
    with torch.no_grad():  # stored statistics that fit the data, as a trained model's would
        net.train()
        for _ in range(3):
            net(torch.from_numpy(work["x"]))
    net.eval()
    ep = torch.export.export(net, (torch.from_numpy(work["x"][:4]),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).run_decompositions()
    ops = {str(n.target) for n in ep.graph_module.graph.nodes if n.op == "call_function"}
    assert "aten.addmm.default" in ops and "aten.linear.default" not in ops
    torch.export.save(ep, root / "net_decomposed.pt2")
    out, rep = root / "o_dec" / "net.pt2", root / "o_dec" / "report.json"
    proc = run_cli(work, "fold", "net_decomposed.pt2", "-o", out, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    report = validate_report(rep)
    assert report["counts"]["folded"] == 3, report["bns"]
    assert {b["name"]: b["target"] for b in report["bns"]}["bn3"] == "fc"
    folded = torch.export.load(str(out)).module()
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes if n.op == "call_function")
    x = work["x"][:5]
    np.testing.assert_allclose(positional(folded, x), eager(net, x=x), atol=1e-4, rtol=1e-4)


def test_pt2_dry_run_writes_nothing(work: dict) -> None:
    root = work["root"]
    out = root / "o3" / "net.pt2"
    proc = run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "-o", out, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "Dry run: no model written" in proc.stdout and "bn3" in proc.stdout
    assert not out.exists() and not out.parent.exists()


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_to_onnx(work: dict) -> None:
    root = work["root"]
    out, rep = root / "o4" / "net.onnx", root / "o4" / "report.json"
    proc = run_cli(work, "fold", "net.ts", "--data", "calib.npy", "--batch-size", BATCH, "-o", out, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert "BatchNormalization" not in onnx_ops(out)
    frozen = frozen_reference(work["net"], {"x": work["x"]})
    x = work["x"][:4]
    np.testing.assert_allclose(run_onnx(out, x=x), eager(frozen, x=x), atol=1e-4, rtol=1e-4)
    report = validate_report(rep)
    assert any("TorchScript" in w and "ONNX export" in w for w in report["warnings"]), report["warnings"]
    assert report["extra"]["export_check"]["passed"] is True


def test_torchscript_to_pt2_refused(work: dict) -> None:
    out = work["root"] / "o5" / "net.pt2"
    line = one_line_error(run_cli(work, "fold", "net.ts", "--data", "calib.npy", "-o", out), 3)
    assert ".onnx" in line
    assert not out.parent.exists()


# --------------------------------------------------------------------------- factory + weights


def test_factory_weights_two_inputs(work: dict) -> None:
    root = work["root"]
    out, rep = root / "o6" / "two.pt", root / "o6" / "report.json"
    proc = run_cli(work, "fold", "-", "--model-factory", "tmodels:build_two", "--weights", "two_sd.pt",
                   "--data", "xy.npz", "--batch-size", BATCH, "-o", out, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        folded = torch.jit.load(str(out))
    names = [getattr(m, "original_name", "") for m in folded.modules()]
    assert not any("BatchNorm" in n for n in names), names
    frozen = frozen_reference(work["two"], {"x": work["x"], "y": work["y"]})
    x, y = work["x"][:3], work["y"][:3]
    np.testing.assert_allclose(positional(folded, x, y), eager(frozen, x=x, y=y), atol=1e-4, rtol=1e-4)
    report = validate_report(rep)
    assert report["counts"] == {"bn": 2, "folded": 2, "frozen_kept": 0}
    assert report["input"]["path"] == "two_sd.pt" and report["extra"]["source"]["factory"] == "tmodels:build_two"
    assert report["extra"]["torch_check"]["passed"] is True


def test_factory_to_onnx_without_model_argument(work: dict) -> None:
    out = work["root"] / "o7" / "two.onnx"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_two", "--weights", "two_sd.pt",
                   "--data", "xy.npz", "--batch-size", BATCH, "-o", out)
    assert proc.returncode == 0, proc.stderr
    ops = onnx_ops(out)
    assert "BatchNormalization" not in ops and "Conv" in ops
    frozen = frozen_reference(work["two"], {"x": work["x"], "y": work["y"]})
    x, y = work["x"][:3], work["y"][:3]
    np.testing.assert_allclose(run_onnx(out, x=x, y=y), eager(frozen, x=x, y=y), atol=1e-4, rtol=1e-4)


def test_fx_untraceable_falls_back_to_onnx(work: dict) -> None:
    root = work["root"]
    out, rep = root / "o8" / "u.onnx", root / "o8" / "report.json"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_untraceable", "--data", "calib.npy",
                   "-o", out, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("bnfold: warning:")]
    assert any("torch.fx cannot trace" in w and "ONNX export" in w for w in warnings), proc.stderr
    report = validate_report(rep)
    assert any("torch.fx cannot trace" in w for w in report["warnings"])
    assert report["extra"]["route"] == "onnx-fallback" and report["counts"]["folded"] == 1
    assert "BatchNormalization" not in onnx_ops(out)

    out2 = root / "o8" / "u.pt2"
    line = one_line_error(run_cli(work, "fold", "--model-factory", "tmodels:build_untraceable", "--data",
                                  "calib.npy", "-o", out2), 3)
    assert "torch.fx cannot trace" in line and ".onnx" in line
    assert not out2.exists()


def test_fx_trace_that_computes_something_else_falls_back_to_onnx(work: dict) -> None:
    """The trace runs but drops a branch: caught by running it next to the module on the data."""
    root = work["root"]
    out, rep = root / "o8b" / "m.onnx", root / "o8b" / "report.json"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_mistraced", "--data", "calib.npy",
                   "--batch-size", BATCH, "-o", out, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("bnfold: warning:")]
    assert any("computes something else" in w and "ONNX export" in w for w in warnings), proc.stderr
    report = validate_report(rep)
    assert report["extra"]["route"] == "onnx-fallback" and report["counts"]["folded"] == 1
    x = work["x"][:3]
    model = work["tm"].build_mistraced()
    frozen = frozen_reference(model, {"x": work["x"]})
    np.testing.assert_allclose(run_onnx(out, x=x), eager(frozen, x=x), atol=1e-4, rtol=1e-4)

    out2 = root / "o8b" / "m.pt2"
    line = one_line_error(run_cli(work, "fold", "--model-factory", "tmodels:build_mistraced", "--data",
                                  "calib.npy", "-o", out2), 3)
    assert "computes something else" in line and ".onnx" in line
    assert not out2.exists()


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_keyword_only_input(work: dict, suffix: str) -> None:
    root = work["root"]
    out = root / "o12" / f"kw{suffix}"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_kwonly", "--data", "xy.npz",
                   "--batch-size", BATCH, "-o", out)
    assert proc.returncode == 0, proc.stderr
    frozen = frozen_reference(work["tm"].build_kwonly(), {"x": work["x"], "y": work["y"]})
    x, y = work["x"][:3], work["y"][:3]
    if suffix == ".onnx":
        got = run_onnx(out, x=x, y=y)
    else:
        with torch.no_grad():
            got = torch.export.load(str(out)).module()(torch.from_numpy(x), y=torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, eager(frozen, x=x, y=y), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_mask", [False, True])
def test_defaults_the_data_leaves_alone_are_no_onnx_inputs(work: dict, with_mask: bool) -> None:
    root = work["root"]
    data = root / f"xm{int(with_mask)}.npz"
    arrays = {"x": work["x"]}
    if with_mask:
        arrays["mask"] = (np.arange(4 * 8 * 8).reshape(1, 4, 8, 8) % 3).astype(np.float32).repeat(len(work["x"]), 0)
    np.savez(data, **arrays)
    out = root / "o14" / f"opt{int(with_mask)}.onnx"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_optional", "--data", data.name,
                   "--batch-size", BATCH, "-o", out)
    assert proc.returncode == 0, proc.stderr
    frozen = frozen_reference(work["tm"].build_optional(), arrays)
    sample = {k: v[:3] for k, v in arrays.items()}
    np.testing.assert_allclose(run_onnx(out, **sample), eager(frozen, **sample), atol=1e-4, rtol=1e-4)


def test_kwargs_inputs_fold_to_onnx_and_are_refused_for_pt2(work: dict) -> None:
    root = work["root"]
    arrays = {"x": work["x"], "bias": np.full((len(work["x"]), 4, 8, 8), 0.25, np.float32)}
    np.savez(root / "xbias.npz", **arrays)
    out = root / "o15" / "vk.onnx"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_varkw", "--data", "xbias.npz",
                   "--batch-size", BATCH, "-o", out)
    assert proc.returncode == 0, proc.stderr
    frozen = frozen_reference(work["tm"].build_varkw(), arrays)
    sample = {k: v[:3] for k, v in arrays.items()}
    np.testing.assert_allclose(run_onnx(out, **sample), eager(frozen, **sample), atol=1e-4, rtol=1e-4)
    out2 = root / "o15" / "vk.pt2"
    line = one_line_error(run_cli(work, "fold", "--model-factory", "tmodels:build_varkw", "--data", "xbias.npz",
                                  "--batch-size", BATCH, "-o", out2), 3)
    assert "**kwargs" in line and ".onnx" in line and not out2.exists()


def test_torchscript_with_two_inputs_to_onnx(work: dict) -> None:
    root = work["root"]
    ts = root / "two.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(work["two"]), ts)
    out = root / "o13" / "two.onnx"
    proc = run_cli(work, "fold", ts, "--data", "xy.npz", "--batch-size", BATCH, "-o", out)
    assert proc.returncode == 0, proc.stderr
    frozen = frozen_reference(work["two"], {"x": work["x"], "y": work["y"]})
    x, y = work["x"][:3], work["y"][:3]
    np.testing.assert_allclose(run_onnx(out, x=x, y=y), eager(frozen, x=x, y=y), atol=1e-4, rtol=1e-4)


def test_report_may_not_overwrite_the_weights(work: dict) -> None:
    root = work["root"]
    weights = root / "two_sd.pt"
    before = weights.read_bytes()
    out = root / "o10" / "two.pt2"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_two", "--weights", "two_sd.pt",
                   "--data", "xy.npz", "--batch-size", BATCH, "-o", out, "--report", weights)
    assert proc.returncode == 2 and "--weights file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert weights.read_bytes() == before and not out.exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc, where no file can be made")
def test_frozen_output_is_not_left_behind_on_an_error(work: dict) -> None:
    """The frozen model is written before the folded one; an error writing the folded one (exit 3)
    must not leave it behind (it stays only beside a verdict: exit 0 or 1)."""
    root = work["root"]
    frozen = root / "o11" / "frozen.pt2"
    proc = run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "--batch-size", BATCH, "-o", "/proc/bnfold.pt2",
                   "--frozen-output", frozen)
    line = one_line_error(proc, 3)
    assert "cannot write /proc/bnfold.pt2" in line and ".bnfold-" not in line, line
    assert not frozen.exists()
    if frozen.parent.exists():
        assert not list(frozen.parent.glob(".bnfold-*"))


def test_checks_take_atol_and_rtol(work: dict) -> None:
    """--atol/--rtol (global, and per output name) are the torch and export checks' tolerances;
    zero tolerance is below the fold's own float32 round-off, so the torch check fails (exit 1)."""
    root = work["root"]
    out, rep = root / "o14" / "net_folded.pt2", root / "o14" / "report.json"
    proc = run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "--batch-size", BATCH, "-o", out,
                   "--report", rep, "--atol", "0.5", "--rtol", "output:0.25,0.125")
    assert proc.returncode == 0, proc.stderr
    report = validate_report(rep)
    for key in ("torch_check", "export_check"):
        outs = report["extra"][key]["outputs"]
        assert [(o["name"], o["atol"], o["rtol"]) for o in outs] == [("output", 0.5, 0.25)], outs
    out0, rep0 = root / "o15" / "net_folded.pt2", root / "o15" / "report.json"
    proc = run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "--batch-size", BATCH, "-o", out0,
                   "--report", rep0, "--atol", "0", "--rtol", "0", "--no-noise-floor")
    line = one_line_error(proc, 1)
    assert "folded module diverged" in line, line
    check = validate_report(rep0)["extra"]["torch_check"]
    assert check["passed"] is False and check["max_abs"] > 0 and check["outputs"][0]["atol"] == 0.0
    assert not out0.exists()


def test_export_divergence_is_exit_1(work: dict) -> None:
    root = work["root"]
    out, rep = root / "o9" / "bad.onnx", root / "o9" / "report.json"
    proc = run_cli(work, "fold", "--model-factory", "tmodels:build_bad_export", "--data", "calib.npy",
                   "-o", out, "--report", rep)
    line = one_line_error(proc, 1)
    assert "export diverged" in line, line
    assert not out.exists()
    assert "producer" not in proc.stdout, "a plan table is printed on --dry-run only"
    report = validate_report(rep)
    assert report["extra"]["export_check"]["passed"] is False and report["output"]["path"] is None


# --------------------------------------------------------------------------- pickles


def test_whole_pickle_needs_unsafe_flag(work: dict) -> None:
    root = work["root"]
    out = root / "o10" / "whole.onnx"
    line = one_line_error(run_cli(work, "fold", "whole.pt", "--data", "calib.npy", "-o", out), 3)
    assert "--unsafe-pickle" in line and "pickled" in line
    assert not out.exists() and not out.parent.exists()

    proc = run_cli(work, "fold", "whole.pt", "--unsafe-pickle", "--data", "calib.npy", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert any(ln.startswith("bnfold: warning: --unsafe-pickle") and "arbitrary code" in ln
               for ln in proc.stderr.splitlines()), proc.stderr
    assert out.exists() and "BatchNormalization" not in onnx_ops(out)


def test_help_warns_about_unsafe_pickle(work: dict) -> None:
    proc = run_cli(work, "fold", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--model-factory", "--weights", "--unsafe-pickle", "--device", "--allow-reused-bn"):
        assert flag in text
    assert "arbitrary code" in text


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(work: dict) -> None:
    """Each case: exit 3 with one line, nothing written."""
    root = work["root"]
    (root / "garbage.pt").write_bytes(b"definitely not a torch file" * 4)
    out = root / "bad" / "m.onnx"
    cases = {
        "missing file": (["fold", "nope.pt2", "--data", "calib.npy", "-o", out], "not found"),
        "not a torch file": (["fold", "garbage.pt", "--data", "calib.npy", "-o", out], "not a PyTorch model"),
        "factory module": (["fold", "--model-factory", "no_such_module:build", "--data", "calib.npy", "-o", out],
                           "no_such_module"),
        "factory attribute": (["fold", "--model-factory", "tmodels:nope", "--data", "calib.npy", "-o", out],
                              "nope"),
        "weights keys": (["fold", "--model-factory", "tmodels:build_two", "--weights", "two_partial.pt",
                          "--data", "xy.npz", "-o", out], "missing keys"),
        "state_dict as MODEL": (["fold", "two_sd.pt", "--data", "xy.npz", "-o", out], "--model-factory"),
        "data key": (["fold", "--model-factory", "tmodels:build_two", "--weights", "two_sd.pt",
                      "--data", "calib.npy", "-o", out], ".npy"),
    }
    for name, (argv, expected) in cases.items():
        line = one_line_error(run_cli(work, *argv), 3)
        assert expected in line, (name, line)
        if name == "weights keys":
            assert "bn_y.weight" in line and "bn_y.running_var" in line, line
    assert not out.exists() and not out.parent.exists()


def test_usage_and_device_errors(work: dict) -> None:
    root = work["root"]
    out = root / "usage" / "m.onnx"
    for argv in (["fold", "net.pt2", "--data", "calib.npy", "-o", root / "usage" / "m.bin"],
                 ["fold", "net.pt2", "--weights", "two_sd.pt", "--data", "calib.npy", "-o", out],
                 ["fold", "--model-factory", "not-a-spec", "--data", "calib.npy", "-o", out]):
        proc = run_cli(work, *argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Error:" in proc.stderr and "Traceback" not in proc.stderr
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is not an error here")
    line = one_line_error(run_cli(work, "fold", "net.pt2", "--data", "calib.npy", "-o", out, "--device", "cuda"), 4)
    assert "cuda" in line.lower()
    assert not out.parent.exists()



def test_missing_cuda_is_found_before_the_model_is_read(work: dict) -> None:
    """--device cuda without CUDA is exit 4 even where reading MODEL would fail (exit 3)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is not an error here")
    (work["root"] / "garbage2.pt").write_bytes(b"definitely not a torch file" * 4)
    line = one_line_error(run_cli(work, "fold", "garbage2.pt", "--data", "calib.npy", "-o",
                                  work["root"] / "cuda2" / "m.onnx", "--device", "cuda"), 4)
    assert line.startswith("bnfold: error: --device cuda was requested") and "use --device cpu" in line, line


# --------------------------------------------------------------------------- real processes


def test_real_process_exit_status_and_streams(work: dict) -> None:
    """What only a process shows: its exit status, results on stdout, errors (one line) on stderr.
    Exit 0, 1 (a check failed), 2 (usage), 3 (bad input) and 4 (cuda missing), side by side."""
    root = work["root"]
    out = root / "proc"
    cases: dict[int, list[object]] = {
        0: ["fold", "net.pt2", "--data", "calib.npy", "--batch-size", BATCH, "-o", out / "ok.onnx", "--device", "cpu"],
        1: ["fold", "--model-factory", "tmodels:build_bad_export", "--data", "calib.npy", "-o", out / "bad.onnx"],
        2: ["fold", "net.pt2", "--data", "calib.npy", "-o", out / "m.bin"],
        3: ["fold", "nope.pt2", "--data", "calib.npy", "-o", out / "missing.onnx"],
    }
    if not torch.cuda.is_available():
        cases[4] = ["fold", "net.pt2", "--data", "calib.npy", "-o", out / "cuda.onnx", "--device", "cuda"]
    procs = {code: subprocess.Popen([sys.executable, "-m", "bnfold.cli.main", *map(str, argv)], cwd=root,
                                    env=process_env(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for code, argv in cases.items()}
    done = {}
    for code, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        done[code] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)

    ok = done[0]
    assert ok.returncode == 0, ok.stderr
    assert "Export check" in ok.stdout and f"Wrote {out / 'ok.onnx'}" in ok.stdout
    assert error_lines(ok.stderr) == [], ok.stderr
    assert (out / "ok.onnx").exists()

    line = one_line_error(done[1], 1)
    assert "export diverged" in line and "Export check" in done[1].stdout and "export diverged" not in done[1].stdout

    usage = done[2]
    assert usage.returncode == 2 and "Error:" in usage.stderr and usage.stdout == "", usage
    for code in (3, 4):
        if code in done:
            assert one_line_error(done[code], code) and done[code].stdout == "", done[code]
    assert not (out / "bad.onnx").exists() and not (out / "missing.onnx").exists()


@pytest.mark.parametrize("model, extra, suffix", [
    ("net.pt2", (), ".pt2"),  # the torch route: fold(inplace=True) on the loaded module
    ("whole.pt", ("--unsafe-pickle",), ".onnx"),  # an ONNX route: calibrated in PyTorch, then exported
])
def test_the_model_read_from_a_file_is_calibrated_without_a_copy(work: dict, monkeypatch: pytest.MonkeyPatch,
                                                                  model: str, extra: tuple[str, ...],
                                                                  suffix: str) -> None:
    """The command reads the model for this run alone, so it calibrates that module itself: no copy
    of its weights (ResNet-50: 100 MB and ~40 ms). Seen from outside: the module the loader
    returned ends with the calibrated statistics, and no module copy was made."""
    import importlib

    import bnfold.torch as bt

    # the submodules (bnfold.torch.convert etc. are also the names of functions in bnfold.torch)
    cal_mod, conv_mod, fold_mod = (importlib.import_module(f"bnfold.torch.{n}") for n in ("calibrate", "convert", "fold"))

    loaded: list = []
    real_load = bt.load_model_file

    def load(*a, **k):
        loaded.append(real_load(*a, **k))
        return loaded[-1]
    monkeypatch.setattr(bt, "load_model_file", load)
    copies: list[str] = []
    for mod, name in ((conv_mod, "copy_module"), (cal_mod, "copy_module"), (cal_mod, "deferred_copy"),
                      (fold_mod, "copy_module")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda m, real=real, where=f"{mod.__name__}.{name}": (copies.append(where),
                                                                                             real(m))[1])
    root = work["root"]
    out, rep = root / f"nocopy_{model}" / f"folded{suffix}", root / f"nocopy_{model}" / "report.json"
    proc = run_cli(work, "fold", model, *extra, "--data", "calib.npy", "--batch-size", BATCH, "-o", out,
                   "--report", rep, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert copies == []
    (one,) = loaded
    report = validate_report(rep)
    frozen = frozen_reference(work["net"], {"x": work["x"]})
    bns = {n: m for n, m in one.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert sorted(bns) == ["bn", "bn2", "bn3"] and report["counts"] == {"bn": 3, "folded": 3, "frozen_kept": 0}
    for name, m in bns.items():
        assert not m.training
        ref = dict(frozen.named_modules())[name]
        np.testing.assert_allclose(m.running_var.numpy(), ref.running_var.numpy(), rtol=1e-6)
        np.testing.assert_allclose(m.running_mean.numpy(), ref.running_mean.numpy(), rtol=1e-6, atol=1e-7)
