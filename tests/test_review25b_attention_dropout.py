"""Review 25b: attention dropout (nn.MultiheadAttention(dropout=...), F.scaled_dot_product_attention's
dropout_p) stayed on in the training-time forward (training_graph=True), silently: the call that
draws the mask is one torch function, so neither the Dropout switch nor the random-draw check saw
it. It is now off; in the eval-mode pass an always-on dropout_p is named in a warning."""
from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold.torch as bt  # noqa: E402


class _Attention(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mha":
            y = self.mha(x, x, x, need_weights=False)[0]
        elif self.kind == "sdpa":
            y = F.scaled_dot_product_attention(x, x, x, dropout_p=0.5 if self.training else 0.0)
        else:  # always on, also in eval mode
            y = F.scaled_dot_product_attention(x, x, x, None, 0.5)
        return self.bn(y.transpose(1, 2))


def _data() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 5, 8, generator=g) for _ in range(3)]


def _calibrate(model: nn.Module, training_graph: bool) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen, _ = bt.calibrate(model, _data(), training_graph=training_graph)
    return frozen, [str(w.message) for w in caught if "random numbers" in str(w.message)]


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_attention_dropout_is_off_in_the_training_graph(kind: str) -> None:
    torch.manual_seed(0)
    model = _Attention(kind).train()
    a, messages = _calibrate(model, True)
    b, _ = _calibrate(model, True)
    assert messages == []
    assert torch.equal(a.bn.running_mean, b.bn.running_mean)
    ref = copy.deepcopy(model).double().eval()  # no attention dropout
    with torch.no_grad():
        mu = torch.stack([
            (ref.mha(x, x, x, need_weights=False)[0] if kind == "mha"
             else F.scaled_dot_product_attention(x, x, x)).mean((0, 1)) for x in (d.double() for d in _data())
        ]).mean(0)
    torch.testing.assert_close(a.bn.running_mean.double(), mu, rtol=1e-5, atol=1e-6)
    assert model.training and model.mha.training


def test_always_on_attention_dropout_is_named_in_eval_pass() -> None:
    _, messages = _calibrate(_Attention("always").train(), False)
    assert len(messages) == 1 and "eval-mode forward draws random numbers" in messages[0]


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_eval_attention_is_not_flagged(kind: str) -> None:
    assert _calibrate(_Attention(kind).train(), False)[1] == []
