"""review23b: a model whose own forward raises on a calibration batch (an assert on its batch size,
an exception class of its own) is the data's or the model's fault, as a failing op is: BadInputError
naming the batch (CLI: one line, exit 3), not 'internal error: AssertionError: ...'. An exception
raised inside bnfold's own code during the forward still passes as it is."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402


class _ModelsOwnError(Exception):
    pass


class Checks(nn.Module):
    def __init__(self, error: type[Exception]) -> None:
        super().__init__()
        self.error = error
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 8:
            raise self.error(f"batch of 8 expected, got {x.shape[0]}")
        return self.bn(self.conv(x))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("error", [AssertionError, _ModelsOwnError])
def test_model_own_exception_on_batch_2_is_bad_input(error: type[Exception], threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the deferred copy (a core to spare) and the plain copy
    try:
        net = Checks(error).train()
        state = {k: v.clone() for k, v in net.state_dict().items()}
        data = [torch.randn(8, 3, 6, 6), torch.randn(5, 3, 6, 6)]
        with pytest.raises(BadInputError, match=rf"calibration batch 2 \({error.__name__}: batch of 8 expected"):
            bt.calibrate(net, data)
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
        assert all(m.training for m in net.modules())
    finally:
        torch.set_num_threads(before)


def test_bnfold_internal_exception_not_relabelled(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    cal = sys.modules["bnfold.torch.calibrate"]

    namespace: dict[str, object] = {}
    exec(compile("def broken(*args, **kwargs):\n    raise AssertionError(\"bnfold's own invariant\")\n",
                 cal.__file__, "exec"), namespace)  # a frame of bnfold's own code
    broken = namespace["broken"]
    monkeypatch.setattr(cal, "_batch_stat_forward", broken)
    with pytest.raises(AssertionError, match="bnfold's own invariant"):
        bt.calibrate(Checks(ValueError).train(), [torch.randn(8, 3, 6, 6)])
