"""Review 25b: training_graph=True must switch off (or name) every random draw of the model, and
only the model's: RNN inter-layer dropout and nn.RReLU were left on silently, functional rrelu with
training=True and gumbel_softmax were not named, and bnfold's own once-per-process kernel probe
(a seeded torch.randint) was named as the model's random draw."""
from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.torch import moments  # noqa: E402


def _calibrate(model: nn.Module, data: list) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen, _ = bt.calibrate(model, data, training_graph=True)
    return frozen, [str(w.message) for w in caught]


def _random_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "draws random numbers" in m]


class _ConvBN(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = act
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


def _images() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def test_own_kernel_probe_is_not_the_models_random_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moments, "_EXACT", None)  # the probe runs again, as in a fresh process
    _, messages = _calibrate(_ConvBN(nn.ReLU()).train(), _images())
    assert _random_warnings(messages) == []


def test_rrelu_is_off_in_the_training_graph() -> None:
    model = _ConvBN(nn.RReLU()).train()
    a, messages = _calibrate(model, _images())
    b, _ = _calibrate(model, _images())
    assert torch.equal(a.bn.running_mean, b.bn.running_mean)
    assert torch.equal(a.bn.running_var, b.bn.running_var)
    assert _random_warnings(messages) == []
    assert model.act.training  # the input module's modes are restored
    # oracle: the deterministic (eval-mode) RReLU slope
    ref = copy.deepcopy(model).double()
    ref.act.eval()
    with torch.no_grad():
        ys = [ref.act(ref.conv(x.double())) for x in _images()]
    mu = torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0)
    torch.testing.assert_close(a.bn.running_mean.double(), mu, rtol=1e-5, atol=1e-6)


class _Functional(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.rrelu(y, training=True) if self.kind == "rrelu" else F.gumbel_softmax(y, dim=1)
        return self.bn(y)


@pytest.mark.parametrize("kind", ["rrelu", "gumbel_softmax"])
def test_functional_random_layers_are_named(kind: str) -> None:
    _, messages = _calibrate(_Functional(kind).train(), _images())
    assert any(kind in m for m in _random_warnings(messages)), messages


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(4, 6, num_layers=2, dropout=0.5, batch_first=True)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.bn(y[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_dropout_is_off_in_the_training_graph(cell: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    model = _Recurrent(cell).train()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 5, 4, generator=g) for _ in range(3)]
    a, messages = _calibrate(model, data)
    b, _ = _calibrate(model, data)
    assert torch.equal(a.bn.running_mean, b.bn.running_mean)
    ref = copy.deepcopy(model).double().eval()  # eval: no inter-layer dropout
    with torch.no_grad():
        mu = torch.stack([ref.rnn(x.double())[0][:, -1].mean(0) for x in data]).mean(0)
    torch.testing.assert_close(a.bn.running_mean.double(), mu, rtol=1e-5, atol=1e-6)
    assert model.rnn.training and model.training
