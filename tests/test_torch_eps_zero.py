"""A BN with eps <= 0 cannot be calibrated (batch statistics divide by zero where a channel's batch
is constant; torch refuses eps <= 0 in training): one line naming the BN and the fix, not
"the module's forward failed ... check that the batches match the module's forward". An
eval-mode BN with eps = 0 that is not calibrated still folds."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402


class _HandWritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, 0.1, 0.0)


def _data() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


@pytest.mark.parametrize("bn", [lambda: nn.BatchNorm2d(4, eps=0.0), lambda: nn.BatchNorm2d(4, eps=-1e-3), _HandWritten])
@pytest.mark.parametrize("api", ["calibrate", "fold"])
def test_eps_zero_is_one_clear_line(bn, api: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BadInputError) as got:
        getattr(bt, api)(model, _data())
    message = str(got.value)
    assert "\n" not in message
    assert message.startswith("BN '1' has eps=") and "set a positive eps" in message, message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training  # modes restored


def test_eval_bn_with_eps_zero_still_folds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    res = bt.fold(model)
    x = _data()[0]
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)
