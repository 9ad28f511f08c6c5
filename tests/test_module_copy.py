"""The module copies behind calibrate's default (``bnfold.torch.module_copy``): the input module
is never changed, the copy is independent of it, and what a forward writes into its parameters
during the first pass (while the copy's parameters still share the original's storage) lands in
the copy alone. Oracle: ``calibrate(copy.deepcopy(m), data, inplace=True)``, the plain copy."""
from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
import torch
from torch import nn

import bnfold.torch
from bnfold.errors import UnsupportedModelError
from bnfold.torch.calibrate import spare_core
from bnfold.torch.module_copy import DeferredCopy, copy_module, deferred_copy


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _data(shape: tuple[int, ...] = (4, 3, 8, 8), n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) * 2 + 1 for _ in range(n)]


def _no_copy_thread() -> bool:
    return not any(t.name == "bnfold-copy" for t in threading.enumerate())


class _Clamps(nn.Conv2d):
    """Writes into its own weight in place, through autograd's view of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.clamp_(-0.05, 0.05)
        return super().forward(x)


class _ClampsData(nn.Conv2d):
    """The same through ``.data`` (no version counter sees it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight.data.clamp_(-0.05, 0.05)
        return super().forward(x)


class _Binarizes(nn.Conv2d):
    """BinaryNet style: replaces its weight's ``.data`` each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.weight, "org"):
            self.weight.org = self.weight.data.clone()  # type: ignore[attr-defined]
        self.weight.data = self.weight.org.sign()  # type: ignore[attr-defined]
        return super().forward(x)


class _Critic(nn.Module):
    """WGAN style: the root's forward clips every parameter through ``.data``, and scales another
    module's weight in place before that module runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.b, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parameters():
            p.data.clamp_(-0.1, 0.1)
        with torch.no_grad():
            self.b.weight.mul_(0.5)
        return self.bn2(self.b(self.bn1(self.a(x))))


def _seq(first: nn.Module) -> nn.Module:
    return nn.Sequential(first, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("make", [
    lambda: _seq(nn.Conv2d(3, 8, 3)),
    lambda: _seq(_Clamps(3, 8, 3)),
    lambda: _seq(_ClampsData(3, 8, 3)),
    lambda: _seq(_Binarizes(3, 8, 3)),
    _Critic,
], ids=["plain", "own-inplace", "own-data", "data-assigned", "root-writes-others"])
def test_the_input_is_untouched_and_the_copy_is_what_a_plain_copy_gives(make: Any) -> None:
    torch.manual_seed(0)
    m = make()
    before = _state(m)
    versions = [p._version for p in m.parameters()]
    oracle, oracle_stats = bnfold.torch.calibrate(copy.deepcopy(m), _data(), inplace=True)
    frozen, stats = bnfold.torch.calibrate(m, _data())
    assert _same(_state(m), before)
    assert [p._version for p in m.parameters()] == versions  # nothing the copy does reaches autograd's counters
    assert _same(_state(frozen), _state(oracle))
    assert stats.keys() == oracle_stats.keys()
    for (_, a), (_, b) in zip(m.named_parameters(), frozen.named_parameters()):
        assert a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(1.0)
    assert _same(_state(m), before)
    assert _no_copy_thread()


@pytest.mark.parametrize("make", [lambda: _seq(_Clamps(3, 8, 3)), _Critic], ids=["own-inplace", "root-writes-others"])
def test_with_a_spare_core_the_clones_run_in_the_thread_and_the_contract_holds(make: Any) -> None:
    """One torch thread leaves a core for the copy's thread (``spare_core``): the clones overlap the
    first forward, under the guard, and the input and the copy are still as a plain copy leaves them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if not spare_core():
            pytest.skip("a single core: calibrate makes the clones after the first forward")
        started: list[bool] = []
        real_start = DeferredCopy.start

        def start(self: DeferredCopy) -> None:
            real_start(self)
            started.append(self._thread is not None)

        torch.manual_seed(0)
        m = make()
        before = _state(m)
        oracle, _ = bnfold.torch.calibrate(copy.deepcopy(m), _data(), inplace=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DeferredCopy, "start", start)
            frozen, _ = bnfold.torch.calibrate(m, _data())
        assert started == [True]
        assert _same(_state(m), before)
        assert _same(_state(frozen), _state(oracle))
        assert _no_copy_thread()
    finally:
        torch.set_num_threads(threads)


def test_tied_parameters_stay_tied_in_the_copy() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(6, 6), nn.Linear(6, 6), nn.BatchNorm1d(6)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.b(self.a(x)))

    m = Tied()
    frozen, _ = bnfold.torch.calibrate(m, _data((8, 6)))
    assert frozen.a.weight is frozen.b.weight
    assert frozen.a.weight.data_ptr() != m.a.weight.data_ptr()
    assert torch.equal(frozen.a.weight, m.a.weight)


def test_a_failing_first_forward_leaves_the_input_as_it_was_and_no_thread() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv.weight.data.mul_(3.0)
            self.bn(self.conv(x))
            raise RuntimeError("boom")

    m = Fails()
    before = _state(m)
    with pytest.raises(Exception, match="boom"):
        bnfold.torch.calibrate(m, _data())
    assert _same(_state(m), before)
    assert _no_copy_thread()


def test_known_reads_leave_parameters_shared_and_anything_else_gives_them_storage() -> None:
    """The guard's rule: conv/linear/BN calls only read; a view (which a later write could go
    through) first gives the parameter its own storage."""
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
    m = nn.ModuleDict({"conv": conv, "lin": lin})
    dc = DeferredCopy(m)
    c = dc.module
    with torch.no_grad(), dc.guard():
        y = c["conv"](torch.randn(2, 3, 5, 5)).mean((2, 3))
        c["lin"](y)
    assert len(dc.pending) == 4  # nothing was swapped: every parameter still on the original's storage
    assert c["conv"].weight.data_ptr() == conv.weight.data_ptr()
    with dc.guard():
        c["lin"].weight.view(-1)
    assert id(c["lin"].weight) not in dc.pending
    assert c["lin"].weight.data_ptr() != lin.weight.data_ptr()
    out = dc.finish()
    assert not dc.pending
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(m.parameters(), out.parameters()))


def test_a_write_the_guard_cannot_see_is_put_back_from_a_clean_clone() -> None:
    conv = nn.Conv2d(3, 4, 1)
    m = nn.Sequential(conv)
    before = _state(m)
    version = conv.weight._version
    dc = DeferredCopy(m)
    dc.start()
    assert dc._thread is not None
    dc._thread.join()  # the clones were taken before the write below
    twin = dc.module[0].weight
    with torch.no_grad():
        torch.ops.aten.mul_.Tensor(twin, 2.0)  # torch.ops: no torch-function mode sees it
    out = dc.finish()
    assert _same(_state(m), before)  # the original got its values back
    assert conv.weight._version == version  # and nothing reached its autograd version counter
    assert torch.equal(out[0].weight, before["0.weight"] * 2.0)  # the copy keeps the write


def test_a_write_before_the_clone_is_an_error_that_says_so() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1))
    dc = DeferredCopy(m)
    with torch.no_grad():
        torch.ops.aten.mul_.Tensor(dc.module[0].weight, 2.0)  # before any clone: cannot be undone
    with pytest.raises(UnsupportedModelError, match="wrote in place into 1 parameter"):
        dc.finish()


def test_copy_module_is_a_deepcopy() -> None:
    """Empty containers come fresh (hooks added to the copy stay there); shared submodules stay
    shared; lazy parameters are copied uninitialised."""
    shared = nn.Conv2d(3, 3, 1)
    m = nn.Sequential(shared, nn.ReLU(), shared, nn.LazyConv2d(4, 1), nn.BatchNorm2d(4))
    c = copy_module(m)
    assert c[0] is c[2] and c[0] is not shared
    c[1].register_forward_hook(lambda *a: None)
    assert not m[1]._forward_hooks
    assert c[0].weight.data_ptr() != shared.weight.data_ptr() and torch.equal(c[0].weight, shared.weight)
    c(torch.randn(2, 3, 4, 4))  # materialises the copy's lazy conv only
    assert isinstance(m[3].weight, nn.parameter.UninitializedParameter)
    assert deferred_copy(m) is None  # a first forward materialises lazy parameters in place: a plain copy


def test_a_module_without_cpu_parameters_takes_the_plain_copy() -> None:
    assert deferred_copy(nn.Sequential(nn.ReLU())) is None
