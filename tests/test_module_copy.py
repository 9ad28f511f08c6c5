"""The module copies behind calibrate's default (``bnfold.torch.module_copy``): the input module
is never changed, the copy is independent of it, and on the CPU the copy's tensors are
copy-on-write: they share the input's memory until either side writes, whatever does the write
(an in-place method, ``.data``, ``torch.ops``, another thread). Oracle:
``calibrate(copy.deepcopy(m), data, inplace=True)``, the plain copy."""
from __future__ import annotations

import copy
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnfold.torch
from bnfold.torch.module_copy import copy_module, lazy_clone


def _cow(t: torch.Tensor) -> bool:
    return bool(torch._C._is_cow_tensor(t))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _data(shape: tuple[int, ...] = (4, 3, 8, 8), n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) * 2 + 1 for _ in range(n)]


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


class _Sneaky(nn.Module):
    """Writes no torch-function mode sees (what stop 21's guarded copy could not catch):
    ``torch.ops`` called directly, and ``.data`` from a thread the forward starts. Copy-on-write is
    below the dispatcher, so both land in the copy."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.b, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            torch.ops.aten.mul_.Tensor(self.a.weight, 0.5)
        t = threading.Thread(target=lambda: self.b.weight.data.clamp_(-0.05, 0.05))
        t.start()
        t.join()
        return self.bn2(self.b(self.bn1(self.a(x))))


def _seq(first: nn.Module) -> nn.Module:
    return nn.Sequential(first, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("make", [
    lambda: _seq(nn.Conv2d(3, 8, 3)),
    lambda: _seq(_Clamps(3, 8, 3)),
    lambda: _seq(_ClampsData(3, 8, 3)),
    lambda: _seq(_Binarizes(3, 8, 3)),
    _Critic,
    _Sneaky,
], ids=["plain", "own-inplace", "own-data", "data-assigned", "root-writes-others", "torch-ops-and-a-thread"])
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
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(1.0)
    assert _same(_state(m), before)
    with torch.no_grad():
        for p in m.parameters():
            p.sub_(1.0)
    assert _same(_state(frozen), {k: v + 1.0 if k in dict(frozen.named_parameters()) else v
                                  for k, v in _state(oracle).items()})


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
    assert torch.equal(frozen.a.weight, m.a.weight)
    before = m.a.weight.detach().clone()
    with torch.no_grad():
        frozen.a.weight.mul_(2.0)
    assert torch.equal(m.a.weight, before) and m.a.weight is m.b.weight


def test_a_failing_first_forward_leaves_the_input_as_it_was() -> None:
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


def test_copy_module_is_a_deepcopy() -> None:
    """Empty containers come fresh (hooks added to the copy stay there); shared submodules stay
    shared; lazy parameters are copied uninitialised."""
    shared = nn.Conv2d(3, 3, 1)
    m = nn.Sequential(shared, nn.ReLU(), shared, nn.LazyConv2d(4, 1), nn.BatchNorm2d(4))
    c = copy_module(m)
    assert c[0] is c[2] and c[0] is not shared
    c[1].register_forward_hook(lambda *a: None)
    assert not m[1]._forward_hooks
    assert torch.equal(c[0].weight, shared.weight)
    c(torch.randn(2, 3, 4, 4))  # materialises the copy's lazy conv only
    assert isinstance(m[3].weight, nn.parameter.UninitializedParameter)


def _resnet_block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 64, 10))


def test_a_calibration_copies_no_weight_and_either_side_writes_alone() -> None:
    """No parameter is copied by a calibration (it only reads them): the copy's share the input's
    memory, copy-on-write. A later write into the copy, or into the input while the copy lives,
    gives the written side memory of its own and leaves the other's values as they were."""
    torch.manual_seed(0)
    m = _resnet_block()
    before = _state(m)
    frozen, _ = bnfold.torch.calibrate(m, _data((4, 3, 8, 8)))
    pairs = list(zip(m.parameters(), frozen.parameters()))
    assert all(_cow(a) and _cow(b) and a.const_data_ptr() == b.const_data_ptr() for a, b in pairs)
    frozen_state = _state(frozen)
    with torch.no_grad():
        frozen[0].weight.mul_(3.0)                       # the copy writes: only its tensor moves
        m[3].weight.add_(1.0)                            # the input writes, the copy alive: only the input's moves
    assert frozen[0].weight.const_data_ptr() != m[0].weight.const_data_ptr()
    assert frozen[3].weight.const_data_ptr() != m[3].weight.const_data_ptr()
    assert m[6].weight.const_data_ptr() == frozen[6].weight.const_data_ptr()  # untouched: still shared
    assert torch.equal(m[0].weight, before["0.weight"]) and torch.equal(frozen[3].weight, frozen_state["3.weight"])
    assert torch.equal(frozen[0].weight, before["0.weight"] * 3.0)
    assert torch.equal(m[3].weight, before["3.weight"] + 1.0)


def _numpy_backed() -> nn.Module:
    m = _resnet_block()
    m[0].weight = nn.Parameter(torch.from_numpy(m[0].weight.detach().numpy().copy()))
    return m


def _shared_memory() -> nn.Module:
    return _resnet_block().share_memory()


@pytest.mark.parametrize("make", [_numpy_backed, _shared_memory], ids=["from-numpy", "shared-memory"])
def test_memory_that_is_not_torchs_own_is_cloned(make: Any) -> None:
    """torch cannot make such memory copy-on-write (a numpy array's, shared memory): those tensors
    are cloned, as deepcopy does, so a write through the memory's other owner (the numpy array,
    another process) never reaches the copy, and the input keeps its storage (a later write into
    it is seen by that owner, as before)."""
    torch.manual_seed(0)
    m = make()
    frozen, _ = bnfold.torch.calibrate(m, _data((4, 3, 8, 8)))
    w = m[0].weight
    assert not _cow(w) and not _cow(frozen[0].weight) and frozen[0].weight.const_data_ptr() != w.const_data_ptr()
    kept = frozen[0].weight.detach().clone()
    ptr = w.const_data_ptr()
    with torch.no_grad():
        w.add_(1.0)
    assert w.const_data_ptr() == ptr and torch.equal(frozen[0].weight, kept)


_EXPORTED = """
import sys, torch
from torch import nn
from bnfold.torch.module_copy import copy_module
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
torch.export.save(torch.export.export(net.eval(), (torch.randn(2, 3, 8, 8),)), sys.argv[1])
loaded = torch.export.load(sys.argv[1]).module()
for m in (loaded, torch.load(sys.argv[2], weights_only=False)):
    c = copy_module(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for t in list(c.parameters()) + list(c.buffers()):
            t.add_(1)        # a write into the copy
        for t in m.parameters():
            t.mul_(1)        # and into the original while the copy lives
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
print("ok")
"""


def test_weights_torch_loaded_without_an_allocator_are_cloned_not_crashed(tmp_path: Path) -> None:
    """torch.export.load's and torch.load's tensors sit on storages without an allocator: torch
    2.13 gives them a copy-on-write clone and then kills the process (SIGSEGV) at the first write
    into either side. They are cloned instead. In a child process, so a crash fails this test
    rather than the suite."""
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), tmp_path / "full.pt")
    proc = subprocess.run([sys.executable, "-c", _EXPORTED, str(tmp_path / "m.pt2"), str(tmp_path / "full.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("layout", ["channels-last", "overlapping", "view-of-larger", "non-contiguous"])
def test_lazy_clone_is_clone_with_deepcopys_strides(layout: str) -> None:
    """``lazy_clone(t)`` equals ``t.clone(memory_format=torch.preserve_format)`` in values, shape
    and strides (what ``Parameter.__deepcopy__`` makes), copy-on-write or not."""
    base = torch.randn(2, 3, 4, 5)
    t = {"channels-last": base.contiguous(memory_format=torch.channels_last),
         "overlapping": torch.randn(5).as_strided((3, 5), (0, 1)),
         "view-of-larger": base[1],
         "non-contiguous": base.transpose(1, 3)}[layout]
    want = t.clone(memory_format=torch.preserve_format)
    got = lazy_clone(t)
    assert torch.equal(got, want) and got.stride() == want.stride() and got.storage_offset() == 0
    assert got.untyped_storage().nbytes() == want.untyped_storage().nbytes()
    assert _cow(got) == (layout in ("channels-last", "non-contiguous"))
    with torch.no_grad():
        got.add_(1.0)
    assert torch.equal(t, want)


def test_a_numpy_view_taken_from_the_copy_is_its_own() -> None:
    """``.numpy()`` asks for a writable pointer: the copy's tensor gets memory of its own first, so
    writing through the array changes the copy only."""
    m = _resnet_block()
    before = m[0].weight.detach().clone()
    c = copy_module(m)
    arr = c[0].weight.detach().numpy()
    arr[...] = 7.0
    assert torch.equal(m[0].weight, before) and bool(np.all(c[0].weight.detach().numpy() == 7.0))
