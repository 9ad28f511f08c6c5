"""Issue 17 point 2: ``--data-factory MODULE:CALLABLE`` through the real CLI, for ONNX model files
and the ``--model-factory`` PyTorch route: the same statistics as ``--data`` on the same samples,
mutually exclusive with ``--data`` (exit 2), and every factory failure one line, exit 3."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from test_data_stream import _model, _x

from bnfold.data.factory import accepted_keywords, call_data_factory
from bnfold.errors import BadInputError

MODULE = "s17_data_factories"  # one module (imported once per process) for every factory below

_SOURCE = '''
import sys
import numpy as np

def _x():
    return np.load("calib.npz")["x"]

def gen():
    x = _x()
    return ({"x": x[i:i + 3]} for i in range(0, len(x), 3))

def listed():
    x = _x()
    return [x[i:i + 4] for i in range(0, len(x), 4)]

def loader():
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(torch.from_numpy(_x())), batch_size=4)

def ranked(rank, world_size):
    return [{"x": _x()[rank::world_size]}]

def with_nan():
    x = _x().copy()
    x[5, 0, 0, 0] = float("nan")
    return ({"x": x[i:i + 4]} for i in range(0, len(x), 4))

def raises():
    raise ValueError("no such bucket")

def exits():
    sys.exit(7)

def number():
    return 5

def broken_stream():
    yield {"x": _x()[:2]}
    raise OSError("connection reset")

not_callable = 3
'''

_TORCH_MODELS = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))

def build():
    torch.manual_seed(0)
    return Net().train()
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datafactory")
    rng = np.random.default_rng(17)
    onnx.save(_model(rng), root / "m.onnx")
    np.savez(root / "calib.npz", x=_x(rng))
    (root / f"{MODULE}.py").write_text(textwrap.dedent(_SOURCE))
    (root / "s17_torch_models.py").write_text(textwrap.dedent(_TORCH_MODELS))
    return root


def _cli(work: Path, *args: object) -> Any:
    return run_cli(*args, cwd=work)


def _one_line(proc: Any, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _stats(path: Path) -> list[Any]:
    report = json.loads(path.read_text())
    return [b["stats"] for b in report["bns"]], report["extra"].get("calibration_samples")


def test_onnx_fold_with_factories_equals_npz(work: Path) -> None:
    ref = _cli(work, "fold", "m.onnx", "--data", "calib.npz", "--batch-size", 4, "-o", "ref.onnx",
               "--report", "ref.json")
    assert ref.returncode == 0, ref.stderr
    for name, batch in (("gen", ["--batch-size", 4]), ("listed", []), ("loader", [])):
        proc = _cli(work, "fold", "m.onnx", "--data-factory", f"{MODULE}:{name}", *batch, "-o", f"{name}.onnx",
                    "--report", f"{name}.json")
        assert proc.returncode == 0, proc.stderr
        # the same samples in the same batches: bitwise the same float64 statistics
        assert _stats(work / f"{name}.json") == _stats(work / "ref.json"), name
        assert (work / f"{name}.onnx").read_bytes() == (work / "ref.onnx").read_bytes()


def test_inspect_with_a_factory(work: Path) -> None:
    ref = _cli(work, "inspect", "m.onnx", "--data", "calib.npz", "--batch-size", 4, "--json")
    proc = _cli(work, "inspect", "m.onnx", "--data-factory", f"{MODULE}:listed", "--json")
    assert proc.returncode == 0 and ref.returncode == 0, proc.stderr + ref.stderr
    assert json.loads(proc.stdout) == json.loads(ref.stdout) and "drift" in json.loads(proc.stdout)[0]


def test_verify_with_a_factory(work: Path) -> None:
    assert _cli(work, "fold", "m.onnx", "--data", "calib.npz", "-o", "v.onnx", "--frozen-output",
                "vf.onnx").returncode == 0
    proc = _cli(work, "verify", "vf.onnx", "v.onnx", "--data-factory", f"{MODULE}:gen", "--iterations", 2)
    assert proc.returncode == 0, proc.stderr


def test_data_and_data_factory_are_exclusive(work: Path) -> None:
    proc = _cli(work, "fold", "m.onnx", "--data", "calib.npz", "--data-factory", f"{MODULE}:gen", "-o", "x.onnx")
    assert proc.returncode == 2 and "--data and --data-factory are mutually exclusive" in proc.stderr
    assert not (work / "x.onnx").exists()
    assert _cli(work, "fold", "m.onnx", "--data-factory", "no colon", "--dry-run").returncode == 2


@pytest.mark.parametrize(("spec", "text"), [
    ("s17_missing_module:gen", "cannot import data factory module 's17_missing_module'"),
    (f"{MODULE}:absent", f"data factory module '{MODULE}' has no attribute 'absent'"),
    (f"{MODULE}:not_callable", f"data factory '{MODULE}:not_callable' is a int, not a callable"),
    (f"{MODULE}:raises", f"calling data factory '{MODULE}:raises' failed: ValueError: no such bucket"),
    (f"{MODULE}:exits", f"calling data factory '{MODULE}:exits' called sys.exit(7)"),
    (f"{MODULE}:number", f"data factory '{MODULE}:number' returned a int, not an iterable of batches"),
    (f"{MODULE}:broken_stream", "calibration data source raised OSError on batch 2: connection reset"),
    (f"{MODULE}:with_nan", r"input 'x' has NaN or Inf values in batch 2 (samples 4..7 of the stream)"),
])
def test_factory_errors_are_one_line_exit_3(work: Path, spec: str, text: str) -> None:
    out = work / "err" / "o.onnx"
    line = _one_line(_cli(work, "fold", "m.onnx", "--data-factory", spec, "-o", out), 3)
    assert text in line, line
    assert not out.parent.exists()


def test_torch_model_factory_with_a_data_factory(work: Path) -> None:
    pytest.importorskip("torch")
    ref = _cli(work, "fold", "--model-factory", "s17_torch_models:build", "--data", "calib.npz", "--batch-size", 4,
               "-o", "t_ref.pt2", "--report", "t_ref.json")
    assert ref.returncode == 0, ref.stderr
    for name in ("listed", "loader"):
        proc = _cli(work, "fold", "--model-factory", "s17_torch_models:build", "--data-factory", f"{MODULE}:{name}",
                    "-o", f"t_{name}.pt2", "--report", f"t_{name}.json")
        assert proc.returncode == 0, proc.stderr
        assert _stats(work / f"t_{name}.json")[0] == _stats(work / "t_ref.json")[0], name
    onnx_out = _cli(work, "fold", "--model-factory", "s17_torch_models:build", "--data-factory", f"{MODULE}:listed",
                    "-o", "t.onnx")
    assert onnx_out.returncode == 0, onnx_out.stderr
    line = _one_line(_cli(work, "fold", "--model-factory", "s17_torch_models:build", "--data-factory",
                          f"{MODULE}:gen", "-o", "t_gen.onnx"), 3)
    assert "one-shot iterator" in line and not (work / "t_gen.onnx").exists()


def test_rank_and_world_size_reach_only_a_factory_that_takes_them(work: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)

    def plain() -> None: ...
    def kw(**extra: Any) -> None: ...
    def only_rank(data: Any = None, *, rank: int = 0) -> None: ...

    assert accepted_keywords(plain, rank=1, world_size=2) == {}
    assert accepted_keywords(kw, rank=1, world_size=2) == {"rank": 1, "world_size": 2}
    assert accepted_keywords(only_rank, rank=1, world_size=2) == {"rank": 1}
    assert accepted_keywords(kw, rank=None, world_size=None) == {}
    [part] = call_data_factory(f"{MODULE}:ranked", rank=1, world_size=3)
    np.testing.assert_array_equal(part["x"], np.load(work / "calib.npz")["x"][1::3])
    with pytest.raises(BadInputError, match="calling data factory .* failed: TypeError"):
        call_data_factory(f"{MODULE}:ranked")  # a single process passes nothing: the factory must default them
    assert isinstance(call_data_factory(f"{MODULE}:listed"), list)
