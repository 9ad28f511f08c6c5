"""Review 21b: copy_module must copy what copy.deepcopy copies, aliasing included."""
from __future__ import annotations

import copy
import copyreg
import functools
from collections import OrderedDict
from typing import Any, cast

import torch
from torch import nn

from bnfold.torch.module_copy import copy_module


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_buffer_and_view_in_list_attribute_stay_aliased() -> None:
    m: Any = nn.Module()
    t = torch.arange(8.0)
    m.register_buffer("a", t)
    m.cache = [t[2:5]]
    ref: Any = copy.deepcopy(m)
    got: Any = copy_module(m)
    assert _same_storage(ref.a, ref.cache[0])
    assert _same_storage(got.a, got.cache[0])
    got.a.add_(1)
    assert torch.equal(got.cache[0], got.a[2:5])


def test_buffer_and_view_in_partial_hook_stay_aliased() -> None:
    m = nn.Linear(2, 2)
    t = torch.arange(8.0)
    m.register_buffer("a", t)

    def hook(extra: torch.Tensor, mod: nn.Module, inp: Any) -> None:
        return None

    m.register_forward_pre_hook(functools.partial(hook, t[1:]))
    got: Any = copy_module(m)
    (h,) = got._forward_pre_hooks.values()
    assert _same_storage(got.a, h.args[0])


def test_buffer_and_view_in_unregistered_module_stay_aliased() -> None:
    m: Any = nn.Module()
    t = torch.arange(6.0)
    m.register_buffer("a", t)
    inner = nn.Module()
    inner.register_buffer("b", t[3:])
    m.hidden = [inner]
    got: Any = copy_module(m)
    assert _same_storage(got.a, got.hidden[0].b)
    assert not _same_storage(got.a, t)


def test_overlapping_buffer_keeps_strides_and_storage() -> None:
    for shape, stride in (((4,), (0,)), ((2, 2), (1, 1))):
        m = nn.Module()
        m.register_buffer("a", torch.arange(4.0).as_strided(shape, stride))
        ref: Any = copy.deepcopy(m)
        got: Any = copy_module(m)
        assert got.a.stride() == ref.a.stride() == stride
        assert torch.equal(torch.tensor(got.a.untyped_storage().tolist()), torch.tensor(ref.a.untyped_storage().tolist()))


def test_ordered_dict_attributes_are_copied() -> None:
    m = nn.Linear(2, 2)
    empty: Any = OrderedDict()
    empty.tag = 5
    full: Any = OrderedDict(a=1)
    full.tag = 6
    m.od, m.od2 = empty, full
    got: Any = copy_module(m)
    assert got.od.tag == 5 and got.od2.tag == 6
    assert got.od2 == {"a": 1}


def test_instance_level_deepcopy_is_honoured() -> None:
    lin = nn.Linear(2, 2)
    object.__setattr__(lin, "__deepcopy__", lambda memo: nn.Identity())
    m: Any = nn.Sequential(lin)
    assert type(copy.deepcopy(m)[0]) is nn.Identity
    assert type(cast(Any, copy_module(m))[0]) is nn.Identity


class _Registered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = 1


def _make_registered() -> _Registered:
    r = _Registered()
    r.x = 99
    return r


copyreg.pickle(_Registered, lambda o: (_make_registered, ()))


def test_copyreg_dispatch_table_is_honoured() -> None:
    m: Any = nn.Sequential(_Registered())
    assert copy.deepcopy(m)[0].x == 99
    assert cast(Any, copy_module(m))[0].x == 99


class _NewArgs(nn.Module):
    def __new__(cls, n: int) -> _NewArgs:  # noqa: PYI034 (a test double)
        return super().__new__(cls)

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __getnewargs__(self) -> tuple[int]:
        return (self.n,)


def test_getnewargs_is_honoured() -> None:
    m: Any = nn.Sequential(_NewArgs(3))
    assert copy.deepcopy(m)[0].n == 3
    assert cast(Any, copy_module(m))[0].n == 3


class _Delegating(nn.Module):
    """A wrapper whose ``__getattr__`` falls back to a module it wraps (as PEFT-style wrappers do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        self.lin = nn.Linear(2, 2)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._inner, name)


def test_custom_getattr_is_copied_as_deepcopy_copies_it() -> None:
    from torch.nn.utils import parametrizations

    # deepcopy finds the wrapped (parametrized) module's __deepcopy__ through __getattr__
    m: Any = nn.Sequential(_Delegating(parametrizations.weight_norm(nn.Linear(2, 2))))
    assert type(cast(Any, copy_module(m))[0]) is type(copy.deepcopy(m)[0])
