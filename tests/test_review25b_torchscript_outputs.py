"""Review 25b: a model whose output holds None, a number or a string next to its tensors cannot be
written as TorchScript (.pt); the error was torch's message with the output's tensor values dumped in
it and no way out. It is now one line naming the cause and the .pt2 / .onnx outputs that work."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402

_OUTPUTS = {
    "dict_with_none": lambda y: {"out": y, "none": None},
    "tuple_with_none": lambda y: (y, None),
    "tuple_with_int": lambda y: (y, 3),
    "list_with_str": lambda y: [y, "label"],
    "empty_containers": lambda y: (y, {}, ()),
}


class _Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        return _OUTPUTS[self.kind](self.bn(self.conv(x)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(_OUTPUTS))
def test_torchscript_output_refusal_is_one_line_with_the_fix(kind: str, tmp_path: Path) -> None:
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BnfoldError) as info:
            bt.convert(_Model(kind).train(), str(data), str(tmp_path / "out.pt"))
    message = str(info.value)
    assert "\n" not in message and "tensor" not in message.lower().replace("tensors", ""), message
    assert ".pt2" in message and "None" in message
    assert not (tmp_path / "out.pt").exists()
