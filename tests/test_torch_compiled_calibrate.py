"""``bnfold.torch.calibrate`` / ``drift`` on a ``torch.compile``'d module (review24d left it): the run
replaces BN forwards with bnfold's own Python and numpy; called through the compiled wrapper,
dynamo compiled that code graph break after graph break (a two-BN network: 31 frames, 12 s, torch's
warnings on stderr). The forward passes now call the module the wrapper compiles; the result is
still the user's wrapper (a copy), with the same names and statistics as the plain module's."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch  # noqa: E402

pytestmark = pytest.mark.slow(reason="imports torch._dynamo (~2 s)")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))


def test_calibrating_a_compiled_module_compiles_nothing_and_matches_the_plain_one() -> None:
    from torch._dynamo.utils import counters

    plain = _model().train()
    compiled = torch.compile(_model().train())
    data = [torch.randn(4, 3, 16, 16) * 2 + 1 for _ in range(3)]
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    counters.clear()
    frozen, stats = bnfold.torch.calibrate(compiled, data, target_se=1.0)
    assert dict(counters["frames"]) == {}  # dynamo compiled nothing
    _, ref = bnfold.torch.calibrate(plain, data, target_se=1.0)
    assert sorted(stats) == ["_orig_mod.1", "_orig_mod.4"]
    for name, st in stats.items():
        assert (st.mean == ref[name.removeprefix("_orig_mod.")].mean).all()
        assert (st.var_unbiased == ref[name.removeprefix("_orig_mod.")].var_unbiased).all()
    assert type(frozen) is type(compiled) and frozen is not compiled and not frozen.training
    assert torch.equal(frozen._orig_mod[1].running_var, torch.as_tensor(stats["_orig_mod.1"].var_unbiased,
                                                                         dtype=torch.float32))
    # the input is untouched: its statistics and its modes
    assert all(torch.equal(v, before[k]) for k, v in compiled.state_dict().items())
    assert all(m.training for m in compiled._orig_mod.modules())
    drift = bnfold.torch.drift(compiled.eval(), data)
    assert sorted(drift) == ["_orig_mod.1", "_orig_mod.4"] and dict(counters["frames"]) == {}
