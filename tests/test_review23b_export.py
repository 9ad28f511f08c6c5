"""review23b: a TorchScript forward that raises by itself (``raise ValueError(...)``, ``assert``,
``raise RuntimeError("")``) fails with ``torch.jit.Error``, which is no RuntimeError: export_onnx let
it through as 'internal error: Error: The following operation failed in the TorchScript interpreter
...'. It is the data's fault as much as a failing op: BadInputError with the exception's own line."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402
from bnfold.torch.export import export_onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_review23b_calibrate import Checks as EagerChecks  # noqa: E402  (batches of exactly 8)
from test_review23b_calibrate import _ModelsOwnError  # noqa: E402
from test_torch_convert import BATCH, Net  # noqa: E402


class Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 5:
            raise ValueError("need five features")
        return x


class Asserts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 5, "need five features"
        return x


class Bare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 5:
            raise RuntimeError("")
        return x


class Checked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("the net takes 3 channels")
        return self.net(x)


def _script(m: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(m)


@pytest.mark.parametrize(("cls", "why"), [(Raises, r"\(ValueError: need five features\)"),
                                          (Asserts, r"\(AssertionError: need five features\)"),
                                          (Bare, r"\(RuntimeError\)")])
def test_scripted_raise_is_bad_input(tmp_path: Path, cls: type, why: str) -> None:
    with pytest.raises(BadInputError, match="forward failed on the data samples " + why) as info:
        export_onnx(_script(cls()), {"x": torch.randn(3, 4)}, tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and "TorchScript interpreter" not in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_convert_scripted_raise_is_bad_input(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((24, 2, 8, 8)).astype(np.float32)
    np.save(tmp_path / "bad.npy", x)
    torch.manual_seed(0)
    net = _script(Checked().train())
    with pytest.raises(BadInputError, match=r"forward failed.*ValueError: the net takes 3 channels"):
        bt.convert(net, tmp_path / "bad.npy", tmp_path / "o" / "net.onnx", batch_size=BATCH, device="cpu")
    assert all(m.training for m in net.modules())
    assert not (tmp_path / "o" / "net.onnx").exists()


@pytest.mark.parametrize("error", [AssertionError, _ModelsOwnError, KeyError])
def test_eager_forward_own_exception_is_bad_input(tmp_path: Path, error: type[Exception]) -> None:
    """Calibrated on batches of 8, the export's forward on the 4 data samples raises the model's own
    exception: a BadInputError naming it (CLI: one line, not 'internal error: AssertionError')."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32))
    net = EagerChecks(error).train()
    with pytest.raises(BadInputError, match=rf"forward failed on the data samples \({error.__name__}: .*"
                                            "batch of 8 expected, got 4"):
        bt.convert(net, tmp_path / "x.npy", tmp_path / "o" / "net.onnx", batch_size=8, device="cpu")
    assert all(m.training for m in net.modules())
    assert not (tmp_path / "o" / "net.onnx").exists()


def test_bnfold_errors_from_the_forward_pass_unchanged(tmp_path: Path) -> None:
    net = EagerChecks(BadInputError)
    with pytest.raises(BadInputError, match=r"^batch of 8 expected, got 3$"):
        export_onnx(net.eval(), {"x": torch.randn(3, 3, 8, 8)}, tmp_path / "m.onnx")
