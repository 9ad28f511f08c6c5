"""review23: a TorchScript module whose forward fails on the data (wrong channel count) is the
user's bad input, as for an nn.Module: a BadInputError naming the forward (CLI: exit 3, one line,
not "internal error: RuntimeError: The following operation failed in the TorchScript
interpreter ..."), nothing written, the module's training flags put back."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_torch_convert import BATCH, make_net  # noqa: E402


def test_scripted_forward_failing_on_the_data_is_bad_input(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((24, 2, 8, 8)).astype(np.float32)  # the net takes 3 channels
    np.save(tmp_path / "bad.npy", x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.script(make_net())
    with pytest.raises(BadInputError, match="forward failed.*3 channels, but got 2"):
        bt.convert(net, tmp_path / "bad.npy", tmp_path / "o" / "net.onnx", batch_size=BATCH, device="cpu")
    assert all(m.training for m in net.modules())
    assert not (tmp_path / "o" / "net.onnx").exists()
