"""Review 25b: a random draw left in the eval-mode calibration forward (``F.dropout(x, 0.5)``, on by
default; ``torch.randn_like`` noise not behind ``self.training``) gave noisy statistics with no
word from calibrate or drift. It is now a warning (torch's generator advanced during a forward);
nn.Dropout and ``F.dropout(x, p, training=self.training)`` in eval mode are not, nor is a
DataLoader's own draw of its workers' seed, and the eval-mode pass runs under no torch-function
mode (torch's fast paths stay, and no Python call per torch op)."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold.torch as bt  # noqa: E402

_KINDS = {
    "dropout_default_on": (lambda m, y: F.dropout(y, 0.5), "dropout"),
    "noise": (lambda m, y: y + torch.randn_like(y), "randn_like"),
    "rrelu_train": (lambda m, y: F.rrelu(y, training=True), "rrelu"),
}
_QUIET = {
    "module_dropout": lambda m, y: m.drop(y),
    "functional_follows_training": lambda m, y: F.dropout(y, 0.5, training=m.training),
    "rrelu_module": lambda m, y: m.rrelu(y),
}


class _Model(nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.rrelu = nn.RReLU()
        self.bn = nn.BatchNorm2d(4)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fn(self, self.conv(x)))  # type: ignore[operator]


def _data() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def _messages(fn: object, api: str) -> list[str]:
    model = _Model(fn).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if api == "calibrate":
            bt.calibrate(model, _data())
        else:
            bt.drift(model, _data())
    return [str(w.message) for w in caught if "draws random numbers" in str(w.message)]


@pytest.mark.parametrize("api", ["calibrate", "drift"])
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_eval_mode_random_draw_is_named(kind: str, api: str) -> None:
    fn, _name = _KINDS[kind]
    messages = _messages(fn, api)
    assert len(messages) == 1 and "torch's random generator advanced" in messages[0], messages


@pytest.mark.parametrize("kind", sorted(_QUIET))
def test_deterministic_eval_forward_is_not_flagged(kind: str) -> None:
    assert _messages(_QUIET[kind], "calibrate") == []


@pytest.mark.parametrize("training_graph", [False, True])
def test_dataloader_seed_draw_is_not_the_model_s(training_graph: bool) -> None:
    """A DataLoader draws its base seed from torch's default generator when its iterator is made:
    that is not the forward's draw (a false warning for every DataLoader user, both passes)."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.cat(_data())), batch_size=8, shuffle=True)
    model = _Model(lambda m, y: m.drop(y)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bt.calibrate(model, loader, training_graph=training_graph)
    assert [str(w.message) for w in caught if "random numbers" in str(w.message)] == []


def test_eval_pass_runs_under_no_torch_function_mode() -> None:
    seen: list[int] = []

    def look(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
        seen.append(len(torch.overrides._get_current_function_mode_stack()))
        return y

    bt.calibrate(_Model(look).train(), _data())
    assert seen == [0, 0, 0]
