"""Review 21 of calibrate's deferred copy (``bnfold.torch.module_copy``): forwards that write a
parameter through a torch call the guard took for a read, and modules whose numerics change under
any torch-function mode. Each must leave the input bitwise unchanged and give the copy that
``calibrate(copy.deepcopy(m), data, inplace=True)`` gives. The writes happen before the copy
thread could clone the parameter (a large parameter ahead of it keeps the thread busy, and
:class:`DeferredCopy` is also driven without the thread), which used to end in an
``UnsupportedModelError`` with the input changed."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import bnfold.torch
from bnfold.errors import BadInputError
from bnfold.torch.module_copy import DeferredCopy, deferred_copy


@pytest.fixture(autouse=True)
def spare_core_for_the_copy():
    """calibrate defers its copy only where torch's threads leave a core free (stop 23; else a plain
    copy first): one torch thread, so that these tests reach DeferredCopy on a 2-core machine too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _data(shape: tuple[int, ...], n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) * 2 + 1 for _ in range(n)]


class _EmbeddingMaxNorm(nn.Module):
    """Tabular style: an embedding with ``max_norm`` (F.embedding renormalises its weight in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1000, 1000)  # cloned first by the thread
        self.emb = nn.Embedding(50, 8, max_norm=1.0)
        self.bn = nn.BatchNorm1d(8)
        with torch.no_grad():
            self.emb.weight.mul_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.emb((x[:, 0].abs() * 10).long() % 50))


class _OutWrite(nn.Module):
    """Scales its weight with ``torch.mul(..., out=weight)``."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1000, 1000)
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.mul(self.lin.weight, 0.5, out=self.lin.weight)
        return self.bn(self.lin(x))


class _ParameterRunningStats(nn.Module):
    """A functional BN in training mode whose running statistics are (frozen) parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.rm = nn.Parameter(torch.zeros(4), requires_grad=False)
        self.rv = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.batch_norm(self.lin(x), self.rm, self.rv, training=True, momentum=0.5))


class _Attention(nn.Module):
    """torch's MultiheadAttention takes its fused fast path only when no torch-function mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.bn = nn.MultiheadAttention(16, 2, batch_first=True), nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.bn(y.flatten(0, 1))


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(layer, nn.Flatten(0, 1), nn.BatchNorm1d(16))


@pytest.mark.parametrize(("make", "shape"), [
    (_EmbeddingMaxNorm, (16, 4)),
    (_OutWrite, (16, 4)),
    (_ParameterRunningStats, (16, 4)),
    (_Attention, (4, 5, 16)),
    (_encoder, (4, 5, 16)),
], ids=["embedding-max-norm", "out=", "batch-norm-on-parameters", "multihead-attention", "transformer-encoder"])
def test_the_input_is_untouched_and_the_copy_is_the_oracle(make: type[nn.Module], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m = make()
    before = _state(m)
    oracle, _ = bnfold.torch.calibrate(copy.deepcopy(m), _data(shape), inplace=True)
    frozen, _ = bnfold.torch.calibrate(m, _data(shape))
    assert _same(_state(m), before)
    assert _same(_state(frozen), _state(oracle))
    assert not any(t.name == "bnfold-copy" for t in threading.enumerate())


@pytest.mark.parametrize("make", [_EmbeddingMaxNorm, _OutWrite, _ParameterRunningStats])
def test_a_write_through_a_call_the_guard_sees_lands_in_the_copy_with_no_clone_taken(make: type[nn.Module]) -> None:
    """No thread: every clone is the guard's, so a write it let through could not be undone."""
    torch.manual_seed(0)
    m = make()
    before = _state(m)
    dc = DeferredCopy(m)
    with torch.no_grad(), dc.guard():
        dc.module(_data((16, 4))[0])
    dc.finish()
    assert _same(_state(m), before)


def test_modules_with_a_mode_sensitive_fast_path_take_the_plain_copy() -> None:
    assert deferred_copy(_Attention()) is None
    assert deferred_copy(_encoder()) is None
    assert deferred_copy(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) is not None


@pytest.mark.parametrize("inplace", [False, True])
def test_a_module_on_the_meta_device_is_a_one_line_bad_input(inplace: bool) -> None:
    """A module built on "meta" (shapes, no values) used to fail deep in the run with torch's
    NotImplementedError ("Cannot copy out of meta tensor")."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to("meta")
    with pytest.raises(BadInputError, match="meta.*to_empty") as info:
        bnfold.torch.calibrate(m, _data((4, 3, 8, 8)), inplace=inplace)
    assert "\n" not in str(info.value)
    with pytest.raises(BadInputError, match="meta"):
        bnfold.torch.fold(m, _data((4, 3, 8, 8)))


def test_a_torchscript_submodule_is_calibrated_around() -> None:
    """A scripted submodule's ``_buffers`` is torch.jit's ``OrderedDictWrapper`` (no ``.get``):
    calibrate used to die with AttributeError on any model holding one, even a scripted conv."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    scripted = copy.deepcopy(plain)
    scripted[0] = torch.jit.script(scripted[0])
    want, _ = bnfold.torch.calibrate(plain, _data((4, 3, 8, 8)))
    got, stats = bnfold.torch.calibrate(scripted, _data((4, 3, 8, 8)))
    assert set(stats) == {"1", "4"}
    for name in ("1", "4"):
        a, b = got.get_buffer(f"{name}.running_var"), want.get_buffer(f"{name}.running_var")
        assert torch.equal(a, b)


class _HoldsALock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.lock = threading.Lock()  # copy.deepcopy: TypeError, cannot pickle '_thread.lock'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _HoldsAGenerator(_HoldsALock):
    def __init__(self) -> None:
        super().__init__()
        self.lock = (i for i in range(3))  # type: ignore[assignment]  # copy.deepcopy: TypeError


@pytest.mark.parametrize("make", [_HoldsALock, _HoldsAGenerator], ids=["lock", "generator"])
def test_a_module_deepcopy_refuses_is_a_one_line_bad_input_naming_inplace(make: type[nn.Module]) -> None:
    """Used to end in deepcopy's own TypeError traceback; inplace=True works."""
    m = make()
    for call in (bnfold.torch.calibrate, bnfold.torch.fold):
        with pytest.raises(BadInputError, match="cannot be copied.*inplace=True") as info:
            call(m, _data((4, 3, 8, 8)))
        assert "\n" not in str(info.value)
    _, stats = bnfold.torch.calibrate(m, _data((4, 3, 8, 8)), inplace=True)
    assert set(stats) == {"bn"}


def _pruned() -> nn.Module:
    conv = nn.Conv2d(3, 8, 3)
    torch.nn.utils.prune.l1_unstructured(conv, "weight", 0.5)  # conv.weight: weight_orig * mask, a non-leaf
    return nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def _old_weight_norm() -> nn.Module:
    with pytest.warns(FutureWarning):
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 8, 3))  # conv.weight: computed from weight_g, weight_v
    return nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("make", [_pruned, _old_weight_norm], ids=["pruned", "old-weight-norm"])
def test_modules_whose_forward_recomputes_a_non_leaf_attribute_are_copied(make: type[nn.Module]) -> None:
    """Pruning (BN recalibration after pruning is the textbook use) and torch's old weight_norm keep
    the weight as a non-leaf tensor attribute, which copy.deepcopy refuses (RuntimeError, "Only
    Tensors created explicitly by the user"): calibrate and fold failed on them unless inplace=True.
    The pre-hook recomputes it every forward; the copy starts from its detached value."""
    torch.manual_seed(0)
    oracle = make()
    torch.manual_seed(0)
    m = make()
    before = _state(m)
    want, _ = bnfold.torch.calibrate(oracle, _data((4, 3, 8, 8)), inplace=True)
    got, _ = bnfold.torch.calibrate(m, _data((4, 3, 8, 8)))
    assert _same(_state(m), before)
    assert _same(_state(got), _state(want))
    assert got.get_submodule("0").weight is not m.get_submodule("0").weight
    result = bnfold.torch.fold(m, _data((4, 3, 8, 8)))
    assert _same(_state(m), before)
    assert len(result.report.bns) == 2


def test_no_thread_to_be_had_costs_the_overlap_not_the_run() -> None:
    """A process that cannot start one more thread (a thread limit; here, a stack size no
    allocation can meet: a real pthread_create failure) used to fail calibrate with "RuntimeError:
    can't start new thread", though the copy thread is only an overlap."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    before = _state(m)
    want, _ = bnfold.torch.calibrate(copy.deepcopy(m), _data((4, 3, 8, 8)), inplace=True)
    old = threading.stack_size(1 << 44)
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            threading.Thread(target=lambda: None).start()
        got, _ = bnfold.torch.calibrate(m, _data((4, 3, 8, 8)))
    finally:
        threading.stack_size(old)
    assert _same(_state(m), before)
    assert _same(_state(got), _state(want))
